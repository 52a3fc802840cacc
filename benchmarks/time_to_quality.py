"""Time to quality: how soon sync and async self-play reach a given policy quality, side by side in one run.

For each algorithm and seed, the embedded demo runs twice on the same machine, task, prompts and warm-up: first in
sync mode for its `train.steps`, then in async mode (the demo's async settings: `train.max_policy_lag` 1, a buffer
of one round) for the same wall time — sync's loop seconds, as `train.max_seconds` — with the same step-based
schedules (SPPO's iterations keep their length). The generator runs on one core and the learner on the
other, in both modes (`--unpinned`: wherever the OS puts them), as in `benchmarks.pipeline`. During each run the
driver keeps a copy of the policy every `--every` seconds of the training loop (`eval.every_seconds`) and evaluates
the copies after the loop, so evaluation never runs inside the timed loop (docs/benchmarks.md, "Time to quality").

Reported per algorithm (mean ± s.e. over seeds): sync's final win rate vs the initial policy, async's at the same
wall time and after sync's step count (what `selfplay demo --mode async` ends at), async's steps per second over
sync's, the wall time async needs to reach sync's final win rate — per seed (that seed's sync final) and over seeds
(the mean async curve against the mean sync final: `async_time_ratio`, its ratio to sync's loop time, at the first
kept policy that reaches it; `async_time_ratio_interpolated`, between the kept policies on either side) — and the
ideal overlap bound measured in the sync run: max(generator busy, learner busy) / sync loop, the ratio of a
pipeline that only ever waits on its busiest stage. A plot of win rate vs wall time (one line per mode, shaded
± s.e. over seeds).

    python -m benchmarks.time_to_quality --quick     # SPPO, 1 seed, 100 steps: a few minutes
    python -m benchmarks.time_to_quality             # SPPO, SAPO and SRPO, seeds 0,1,2, 300 steps (long)
    python -m benchmarks.time_to_quality --algorithms sppo --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import ray

from actors.driver import Driver
from benchmarks.pipeline import PinnedDriver
from selfplay.demo import ALGORITHM, demo_config

ROOT = Path(__file__).resolve().parent.parent
QUICK = ["train.steps=100", "eval.prompts=100"]


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.system()


def run_once(algorithm: str, mode: str, seed: int, every: float, quick: bool, out: Path, extra: list[str],
             budget: float | None = None, pin: bool = True) -> dict:
    """One run. `budget` (async): train for that many loop seconds — sync's loop time for the same seed — instead
    of sync's step count, with the same step-based schedules (SPPO's 60-step iterations) and the policy also kept at
    sync's last step (its win rate there is what `selfplay demo --mode async` ends at). `pin`: the generator on one
    core and the learner on the other, in both modes (`benchmarks.pipeline.PinnedDriver`)."""
    sets = [f"seed={seed}", f"out_dir={out}", "eval.every=0", f"eval.every_seconds={every}", "logging.log_every=1000",
            *(QUICK if quick else []), *extra]
    cfg = demo_config(algorithm, mode, extra=sets)
    steps = cfg.train.steps
    if budget is not None:  # room for every step the budget allows (3× sync's: async runs ~1.5–2× as fast)
        cfg = demo_config(algorithm, mode, extra=[*sets, f"train.max_seconds={budget}", f"train.steps={3 * steps}",
                                                  f"sppo.iterations={3 * cfg.sppo.iterations}", f"eval.every={steps}"])
    s = (PinnedDriver if pin else Driver)(cfg, out, log=lambda m: print(f"  {m}", file=sys.stderr, flush=True)
               if m.startswith("[eval]") else None).run()
    busy_generator = s["loop_seconds"] * (1 - s["generator_idle_fraction"])
    busy_learner = s["loop_seconds"] * (1 - s["learner_idle_fraction"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    lags = [r["trained_version_lag"] for r in records if "trained_version_lag" in r]
    at_steps = next((e for e in s["evals"] if e["step"] == steps), None)
    return {"seed": seed, "mode": mode, "loop_seconds": s["loop_seconds"], "steps": s["learner_steps"],
            "winrate": round(s["winrate_vs_initial"], 4), "stderr": round(s["winrate_stderr"], 4),
            # the win rate after as many steps as the sync run makes (async: passed on the way)
            "winrate_at_sync_steps": at_steps and round(at_steps["winrate_vs_initial"], 4),
            "busy_generator_seconds": round(busy_generator, 1), "busy_learner_seconds": round(busy_learner, 1),
            "mean_trained_version_lag": round(sum(lags) / max(len(lags), 1), 3),
            "rows_added": s["rows_added"], "samples_trained": s["samples_trained"],
            "curve": [[e["seconds"], round(e["winrate_vs_initial"], 4)] for e in s["timed_evals"]]}


def mean_se(values: list[float]) -> tuple[float, float | None]:
    """Mean and its standard error over seeds (None from one seed: then each run's own s.e. is the figure)."""
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, None
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1) / len(values))


def at(curve: list[list[float]], t: float) -> float:
    """The win rate of the newest evaluated policy at loop time t (0.5, the initial policy's, before the first)."""
    value = 0.5
    for seconds, winrate in curve:
        if seconds <= t:
            value = winrate
    return value


def first_reach(curve: list[list[float]], target: float) -> float | None:
    return next((seconds for seconds, winrate in curve if winrate >= target), None)


def line_at(curve: list[list[float]], t: float) -> float:
    """The curve joined by straight lines from (0 s, 0.5: the initial policy) through its kept policies, at loop time
    t (its last value after the last)."""
    before_t, before_w = 0.0, 0.5
    for seconds, winrate in curve:
        if t <= seconds:
            if seconds == before_t:
                return winrate
            return before_w + (winrate - before_w) * (t - before_t) / (seconds - before_t)
        before_t, before_w = seconds, winrate
    return before_w


def interpolated_reach(line: list[list[float]], target: float) -> float | None:
    """When a curve joined by straight lines from (0 s, 0.5) through `line`'s points first reaches `target`: an
    estimate between two kept policies, where `first_reach` gives the later one (an upper bound)."""
    if target <= 0.5:
        return 0.0
    before_t, before_w = 0.0, 0.5
    for seconds, winrate in line:
        if winrate >= target:
            return before_t + (target - before_w) / (winrate - before_w) * (seconds - before_t)
        before_t, before_w = seconds, winrate
    return None


def summarize(runs: list[dict]) -> dict:
    by_mode = {m: [r for r in runs if r["mode"] == m] for m in ("sync", "async")}
    sync_seconds = sum(r["loop_seconds"] for r in by_mode["sync"]) / len(by_mode["sync"])
    out = {}
    for mode, rs in by_mode.items():
        final, se = mean_se([r["winrate"] for r in rs])
        out[f"{mode}_final"], out[f"{mode}_final_se"] = round(final, 4), se and round(se, 4)
        out[f"{mode}_seconds"] = round(sum(r["loop_seconds"] for r in rs) / len(rs), 1)
        # per seed: that seed's sync final is the target (same prompts and warm-up), reached at which loop time?
        out[f"{mode}_seconds_to_sync_final"] = [first_reach(r["curve"], s["winrate"])
                                                 for r, s in zip(rs, by_mode["sync"])]
    reached = [t for t in out["async_seconds_to_sync_final"] if t is not None]
    out["async_reached_sync_final"] = f"{len(reached)}/{len(by_mode['async'])} seeds"
    # over seeds: the first evaluation time at which async's mean curve reaches sync's mean final win rate
    times = sorted({t for r in by_mode["async"] for t, _ in r["curve"]})
    mean_async = [(t, sum(at(r["curve"], t) for r in by_mode["async"]) / len(by_mode["async"])) for t in times]
    t_mean = first_reach([[t, w] for t, w in mean_async], out["sync_final"])
    out["async_seconds_to_mean_sync_final"] = t_mean
    out["async_time_ratio"] = None if t_mean is None else round(t_mean / sync_seconds, 3)
    # the same with each seed's curve joined by lines (their mean is a line between any two kept times)
    mean_line = [[t, sum(line_at(r["curve"], t) for r in by_mode["async"]) / len(by_mode["async"])] for t in times]
    t_line = interpolated_reach(mean_line, out["sync_final"])
    out["async_time_ratio_interpolated"] = None if t_line is None else round(t_line / sync_seconds, 3)
    at_steps = [r["winrate_at_sync_steps"] for r in by_mode["async"] if r["winrate_at_sync_steps"] is not None]
    if at_steps:  # async after sync's step count: where `selfplay demo --mode async` ends
        m, se = mean_se(at_steps)
        out["async_at_sync_steps"], out["async_at_sync_steps_se"] = round(m, 4), se and round(se, 4)
    # steps per loop second, async over sync: the overlap's speed-up alone
    rate = {m: sum(r["steps"] / r["loop_seconds"] for r in rs) / len(rs) for m, rs in by_mode.items()}
    out["async_speedup"] = round(rate["async"] / rate["sync"], 3)
    # a pipeline is no faster than its busiest stage: sync's generator or learner busy time over sync's loop
    bound = [max(r["busy_generator_seconds"], r["busy_learner_seconds"]) / r["loop_seconds"] for r in by_mode["sync"]]
    out["ideal_overlap_ratio"] = round(sum(bound) / len(bound), 3)
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    algorithms = list(results)
    fig, axes = plt.subplots(1, len(algorithms), figsize=(5 * len(algorithms), 3.6), squeeze=False)
    for ax, algorithm in zip(axes[0], algorithms):
        runs = results[algorithm]["runs"]
        for mode, color in (("sync", "tab:blue"), ("async", "tab:orange")):
            rs = [r for r in runs if r["mode"] == mode]
            end = max(r["loop_seconds"] for r in rs)
            grid = [end * i / 100 for i in range(101)]
            stats = [mean_se([at(r["curve"], t) for r in rs]) for t in grid]
            mean = [m for m, _ in stats]
            se = [s or 0.0 for _, s in stats]
            ax.plot(grid, mean, color=color, label=f"{mode} ({len(rs)} seed{'s' * (len(rs) > 1)})")
            ax.fill_between(grid, [m - s for m, s in zip(mean, se)], [m + s for m, s in zip(mean, se)],
                            color=color, alpha=0.2)
        ax.axhline(results[algorithm]["summary"]["sync_final"], color="gray", ls="--", lw=0.8,
                   label="sync final")
        ax.set_title(algorithm.upper())
        ax.set_xlabel("training-loop seconds")
        ax.set_ylabel("win rate vs initial")
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="SPPO, seed 0, 100 steps, 100 evaluation prompts")
    parser.add_argument("--algorithms", default=None, help="comma-separated (default sppo,sapo,srpo; quick: sppo)")
    parser.add_argument("--seeds", default=None, help="comma-separated (default 0,1,2; quick: 0)")
    parser.add_argument("--every", type=float, default=None, help="seconds between kept policies (default 30; quick 15)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides, both modes")
    parser.add_argument("--unpinned", action="store_true", help="let the OS place the generator and the learner "
                        "(default: one core each, as in benchmarks.pipeline: the nearest thing to a device each)")
    parser.add_argument("--out", default=None, help="the JSON file to write (default docs/time_to_quality.json; "
                        "quick: docs/time_to_quality-quick.json); other algorithms' results in it are kept")
    parser.add_argument("--plot", default=None, help="the PNG (default docs/img/bench-time-to-quality[-quick].png)")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    algorithms = (args.algorithms or ("sppo" if args.quick else "sppo,sapo,srpo")).split(",")
    unknown = [a for a in algorithms if a not in ALGORITHM]
    if unknown:
        parser.error(f"--algorithms: unknown {', '.join(unknown)}; use some of {', '.join(ALGORITHM)}")
    try:
        seeds = [int(s) for s in (args.seeds or ("0" if args.quick else "0,1,2")).split(",")]
    except ValueError:
        parser.error(f"--seeds: expected integers such as 0,1,2; got {args.seeds!r}")
    every = args.every or (15.0 if args.quick else 30.0)
    suffix = "-quick" if args.quick else ""
    args.out = args.out or str(ROOT / "docs" / f"time_to_quality{suffix}.json")
    args.plot = args.plot or str(ROOT / "docs" / "img" / f"bench-time-to-quality{suffix}.png")
    workdir = Path(tempfile.mkdtemp(prefix="bench-ttq-"))
    t0 = time.perf_counter()
    os.environ.setdefault("WANDB_MODE", "offline")
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    results = {}
    try:
        for algorithm in algorithms:
            runs = []
            for seed in seeds:
                for mode in ("sync", "async"):  # side by side: same seed, prompts, warm-up and machine
                    # async gets sync's wall time (equal-time comparison), not its step count
                    budget = runs[-1]["loop_seconds"] if mode == "async" else None
                    run = run_once(algorithm, mode, seed, every, args.quick, workdir / f"{algorithm}-{mode}-{seed}",
                                   args.set, budget, pin=not args.unpinned)
                    runs.append(run)
                    print(f"[time_to_quality] {algorithm} seed {seed} {mode}: {run['winrate']:.3f} ± {run['stderr']:.3f}"
                          f" after {run['steps']} steps in {run['loop_seconds']:.0f}s (at step "
                          f"{runs[-2 if mode == 'async' else -1]['steps']}: {run['winrate_at_sync_steps']}; trained "
                          f"version lag {run['mean_trained_version_lag']:.2f})",
                          file=sys.stderr, flush=True)
            results[algorithm] = {"summary": summarize(runs), "seeds": seeds, "every_seconds": every, "runs": runs}
            print(f"[time_to_quality] {algorithm}: {json.dumps(results[algorithm]['summary'])}", file=sys.stderr,
                  flush=True)
    finally:
        ray.shutdown()
    command = " ".join(["python -m benchmarks.time_to_quality", *argv])
    placement = "OS" if args.unpinned else "generator on core 0, learner on core 1"
    for entry in results.values():
        entry["command"], entry["placement"] = command, placement
    previous = Path(args.out)
    if previous.exists():  # the algorithms this command did not run keep their last results (and their command)
        kept = json.loads(previous.read_text()).get("results", {})
        results = {**{a: r for a, r in kept.items() if a not in results}, **results}
    out = {"benchmark": "time_to_quality", "command": command,
           "machine": f"{platform.machine()}, {os.cpu_count()} cores, {cpu_model()}",
           "model": "tiny (0.44M params), warmed up", "task": "sort", "every_seconds": every,
           "placement": placement,
           "results": results, "seconds": round(time.perf_counter() - t0, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    plot(results, Path(args.plot))
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
