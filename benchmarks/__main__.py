"""Every benchmark in one run: replay, generation, weight sync, pipeline (sync vs async), time to quality and the
TRL peer.

    python -m benchmarks --quick               # about 8 minutes on the 2-core CPU machine
    python -m benchmarks                       # the full sizes (longer)
    python -m benchmarks --quick --only pipeline,peer

Writes one JSON file with every benchmark's output (`--out`, default docs/benchmarks.json), one PNG plot per
benchmark (`--plots`, default docs/img/bench-*.png), and the tables of the generated section of
docs/benchmarks.md (between its `<!-- benchmarks:begin -->` and `<!-- benchmarks:end -->` markers; the rest of the
page, the analysis, is written by hand). A benchmark that fails is recorded with its error and the others still
run; the exit status is then 1. The ratios are printed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ("replay", "generation", "weight_sync", "pipeline", "time_to_quality", "peer")
BEGIN, END = "<!-- benchmarks:begin -->", "<!-- benchmarks:end -->"


def run_one(name: str, quick: bool) -> dict:
    """One benchmark in a process of its own, as its own command: nothing one leaves behind (vLLM binds its
    process's threads to cores, which every process it starts later would inherit) can skew the next."""
    command = [sys.executable, "-m", f"benchmarks.{name}", *(["--quick"] if quick else [])]
    run = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)  # stderr: progress, shown as it comes
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    for line in run.stdout.splitlines():
        if not line.startswith("{"):  # its progress lines ([pipeline] 1:1: sync … → async …)
            print(line, file=sys.stderr)
    if run.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(command[1:])} exited with {run.returncode}"
                           + ("" if lines else " without its JSON line"))
    return json.loads(lines[-1])


# -- tables ---------------------------------------------------------------------------------------------------------


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(_fmt(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def _pm(summary: dict, mode: str, suffix: str = "_final") -> str:
    """A win rate with its s.e. over seeds (one seed: the figure alone; not measured: —)."""
    if f"{mode}{suffix}" not in summary:
        return "—"
    se = summary[f"{mode}{suffix}_se"]
    return f"{summary[f'{mode}{suffix}']:.3f}" + ("" if se is None else f" ± {se:.3f}")


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.3g}" if abs(x) < 10 else f"{x:.1f}"
    return f"{x:,}" if isinstance(x, int) else str(x)


def tables(results: dict[str, dict]) -> str:
    out = []
    for name, r in results.items():
        out.append(f"### {name} — `{r.get('command', '')}`\n")
        if "error" in r:
            out.append(f"Failed: `{r['error']}`\n")
            continue
        if r.get("skipped"):
            out.append(f"Skipped: {r['skipped']}\n")
            continue
        out.append(f"Machine: {r.get('machine', '?')}; took {r.get('seconds', '?')} s.\n")
        rows = r.get("results", [])
        if name == "replay":
            out.append(_table(["rows", "shards", "add rows/s", "sample rows/s", "floor rows/s", "sample / floor"],
                              [[x["rows"], x["shards"], x["add_rows_per_s"], x["sample_rows_per_s"],
                                x["floor_sample_rows_per_s"], x["sample_ratio_to_floor"]] for x in rows]))
        elif name == "generation":
            out.append(_table(["backend", "batch", "direct tokens/s", "actor tokens/s", "direct / actor"],
                              [[x["backend"], x["batch"], x["direct_tokens_per_s"], x["actor_tokens_per_s"],
                                x["actor_overhead_ratio"]] for x in rows]))
            flight = r.get("in_flight", {})
            if flight.get("rows"):
                out.append(f"\nvLLM, {flight['requests']} requests of {flight['prompts_per_request']} prompts "
                           f"({'/'.join(map(str, flight['lengths']))} new tokens), kept N in flight:\n")
                out.append(_table(["in flight", "seconds", "samples/s", "vs one at a time"],
                                  [[x["window"], x["seconds"], x["samples_per_s"], f"{x['speedup']:.2f}×"]
                                   for x in flight["rows"]]))
            sppo = r.get("sppo_round")
            if sppo:
                out.append(f"\nhf, one SPPO round ({sppo['prompts']} prompts × {sppo['k']}, ≤ {sppo['max_new_tokens']} "
                           f"tokens, the demo's warmed-up policy, one thread, median of {sppo['repeats']}):\n")
                out.append(_table(["way", "seconds per round", "mean tokens per sample"],
                                  [["`decode` (one prefill per prompt, finished rows leave)", sppo["decode_seconds"],
                                    sppo["mean_tokens"]["decode"]],
                                   ["`model.generate`", sppo["generate_seconds"], sppo["mean_tokens"]["generate"]],
                                   ["speed-up", f"**{sppo['speedup']:.2f}×**", ""]]))
        elif name == "weight_sync":
            keys = [k for k in rows[0] if k.endswith("_s") and not k.startswith("floor")] if rows else []
            out.append(_table(["MB", "raw broadcast (floor) s", *[k.removesuffix("_s") + " s" for k in keys]],
                              [[x["mb"], x["floor_raw_broadcast_s"],
                                *[f"{x[k]:.3f} ({x[k] / x['floor_raw_broadcast_s']:.2f}×)" for k in keys]]
                               for x in rows]))
        elif name == "pipeline":
            out.append(_table(
                ["layout", "mode", "samples trained/s", "generator idle", "learner idle", "loop s", "async / sync"],
                [[x["layout"], mode, x[mode]["samples_trained_per_s"], f"{x[mode]['generator_idle_fraction']:.0%}",
                  f"{x[mode]['learner_idle_fraction']:.0%}", x[mode]["loop_seconds"],
                  f"**{x['async_over_sync']:.2f}×**" if mode == "async" else ""]
                 for x in rows if "skipped" not in x for mode in ("sync", "async")]))
            out += [f"\n{x['layout']}: not measured, {x['skipped']}." for x in rows if "skipped" in x]
        elif name == "time_to_quality":
            out.append(_table(
                ["algorithm", "seeds", "sync final", "async final, same wall time", "async at sync's steps",
                 "loop s", "async steps/s over sync", "async s to sync final (per seed)", "async / sync time",
                 "ideal (busiest stage)"],
                [[a, len(x["seeds"]), _pm(x["summary"], "sync"), _pm(x["summary"], "async"),
                  _pm(x["summary"], "async_at_sync_steps", ""), x["summary"]["sync_seconds"],
                  f"{x['summary'].get('async_speedup', '—')}×",
                  ", ".join("—" if t is None else f"{t:.0f}" for t in x["summary"]["async_seconds_to_sync_final"]),
                  "not reached" if x["summary"]["async_time_ratio"] is None else f"**{x['summary']['async_time_ratio']}×**",
                  f"{x['summary']['ideal_overlap_ratio']}×"]
                 for a, x in r["results"].items()]))
        elif name == "peer":
            out.append(_table(
                ["system", "pairs trained/s", "distinct pairs judged", "win rate vs initial", "task score"],
                [[r[s]["system"], r[s]["pairs_per_s"], r[s]["pairs_judged"],
                  f"{r[s]['winrate_vs_initial']:.3f} ± {r[s]['winrate_stderr']:.3f}", r[s]["task_score"]]
                 for s in ("ours", "trl")]))
            out.append(f"\nEqual training budget: {r['budget_seconds']} s each; initial task score "
                       f"{r['initial_task_score']}; {r['eval_prompts']} held-out prompts; 1-minute load average "
                       f"before/after {r['load_average_1min']}.")
        out.append("")
    return "\n".join(out)


def write_docs(page: Path, results: dict[str, dict], meta: dict) -> None:
    """Replace the generated block of docs/benchmarks.md (appended when the markers are missing)."""
    text = page.read_text() if page.exists() else "# Benchmarks\n"
    block = (f"{BEGIN}\n<!-- written by `{meta['command']}`: do not edit by hand -->\n\n"
             f"Last run: `{meta['command']}` on {meta['machine']}, {meta['finished']}, {meta['seconds']} s in all.\n"
             f"Plots: `docs/img/bench-*.png`. All figures: `{meta['json']}`.\n\n{tables(results)}\n{END}")
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + "\n\n## Latest run of every benchmark\n\n" + block + "\n"
    page.write_text(text)


# -- plots ----------------------------------------------------------------------------------------------------------


def plots(results: dict[str, dict], directory: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, name):
        path = directory / f"bench-{name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    ok = {n: r for n, r in results.items() if r.get("results") or n == "peer" and "ours" in r}
    if "pipeline" in ok:
        rows = [r for r in ok["pipeline"]["results"] if "skipped" not in r]
        fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
        x = range(len(rows))
        for offset, mode in ((-0.2, "sync"), (0.2, "async")):
            a.bar([i + offset for i in x], [r[mode]["samples_trained_per_s"] for r in rows], 0.4, label=mode)
            b.bar([i + offset for i in x], [r[mode]["generator_idle_fraction"] for r in rows], 0.4, label=f"{mode} generators")
            b.scatter([i + offset for i in x], [r[mode]["learner_idle_fraction"] for r in rows], color="k", zorder=3,
                      label="learner" if mode == "sync" else None)
        for ax in (a, b):
            ax.set_xticks(list(x), [r["layout"] for r in rows])
            ax.set_xlabel("generators : learners")
        a.set_ylabel("samples trained / s")
        a.set_title("sync vs async, same work")
        b.axhline(0.15, ls="--", c="gray")
        b.set_ylabel("idle fraction")
        b.set_title("idle (bars: generators, dots: learner)")
        a.legend()
        save(fig, "pipeline")
    if "peer" in ok:
        r = ok["peer"]
        fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3.2))
        names = ["ours", "TRL"]
        a.bar(names, [r["ours"]["pairs_per_s"], r["trl"]["pairs_per_s"]])
        a.set_ylabel("preference pairs trained / s")
        b.bar(names, [r["ours"]["winrate_vs_initial"], r["trl"]["winrate_vs_initial"]],
              yerr=[r["ours"]["winrate_stderr"], r["trl"]["winrate_stderr"]])
        b.axhline(0.5, ls="--", c="gray")
        b.set_ylabel(f"win rate vs initial after {r['budget_seconds']:.0f} s")
        save(fig, "peer")
    if "replay" in ok:
        rows = ok["replay"]["results"]
        fig, ax = plt.subplots(figsize=(5, 3.2))
        labels = [f"{r['rows']:,} rows\n{r['shards']} shard(s)" for r in rows]
        ax.bar(labels, [r["sample_rows_per_s"] for r in rows])
        ax.set_yscale("log")
        ax.set_ylabel("sampled rows / s (batches of 256)")
        save(fig, "replay")
    if "weight_sync" in ok:
        rows = ok["weight_sync"]["results"]
        keys = [k for k in rows[0] if k.endswith("_s")]
        fig, ax = plt.subplots(figsize=(6, 3.4))
        for k in keys:
            ax.plot([r["mb"] for r in rows], [r[k] for r in rows], marker="o", label=k.removesuffix("_s"))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("model MB")
        ax.set_ylabel("seconds to both receivers")
        ax.legend(fontsize=7)
        save(fig, "weight-sync")
    if "generation" in ok:
        rows = ok["generation"]["results"]
        fig, ax = plt.subplots(figsize=(6, 3.2))
        for backend in sorted({r["backend"] for r in rows}):
            sub = [r for r in rows if r["backend"] == backend]
            ax.plot([r["batch"] for r in sub], [r["actor_tokens_per_s"] for r in sub], marker="o", label=f"{backend} actor")
            ax.plot([r["batch"] for r in sub], [r["direct_tokens_per_s"] for r in sub], ls="--", label=f"{backend} direct")
        ax.set_xscale("log")
        ax.set_xlabel("prompts per request")
        ax.set_ylabel("new tokens / s")
        ax.legend(fontsize=7)
        save(fig, "generation")
    return written


# -- the run --------------------------------------------------------------------------------------------------------


def headline(results: dict[str, dict]) -> list[str]:
    lines = []
    for row in results.get("pipeline", {}).get("results", []):
        if "skipped" in row:
            lines.append(f"pipeline {row['layout']}: not measured, {row['skipped']}")
            continue
        a = row["async"]
        lines.append(f"pipeline {row['layout']}: async/sync = {row['async_over_sync']:.2f}× samples trained/s "
                     f"(target 1.6×); async idle: generators {a['generator_idle_fraction']:.0%}, learner "
                     f"{a['learner_idle_fraction']:.0%} (target < 15%)")
    for algorithm, x in results.get("time_to_quality", {}).get("results", {}).items():
        t = x["summary"]
        reached = "never reaches" if t["async_time_ratio"] is None else f"reaches at {t['async_time_ratio']}× sync's wall time"
        lines.append(f"time to quality {algorithm}: async {reached} sync's final {t['sync_final']:.3f} "
                     f"(target 0.6×; busiest stage {t['ideal_overlap_ratio']}×); "
                     f"at sync's wall time {t['async_final']:.3f} vs {t['sync_final']:.3f}")
    peer = results.get("peer", {})
    if "ours" in peer:
        lines.append(f"peer: ours {peer['ours']['pairs_per_s']:.1f} vs TRL {peer['trl']['pairs_per_s']:.1f} pairs "
                     f"trained/s ({peer['ours']['pairs_per_s'] / peer['trl']['pairs_per_s']:.2f}×); win rate vs "
                     f"initial at equal time {peer['ours']['winrate_vs_initial']:.3f} vs "
                     f"{peer['trl']['winrate_vs_initial']:.3f}")
    for row in results.get("weight_sync", {}).get("results", [])[-1:]:
        lines.append(f"weight sync {row['mb']} MB: " + ", ".join(f"{k.removesuffix('_s')} {v:.3f}s" for k, v in row.items()
                                                                   if k.endswith("_s")))
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="each benchmark's --quick sizes")
    parser.add_argument("--only", default=",".join(BENCHMARKS), help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.json"), help="the JSON file to write")
    parser.add_argument("--plots", default=str(ROOT / "docs" / "img"), help="directory for the PNG plots")
    parser.add_argument("--docs", default=str(ROOT / "docs" / "benchmarks.md"),
                        help="page whose generated block gets the tables ('' to leave it alone)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        parser.error(f"--only: unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)}")
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    t0, results = time.perf_counter(), {}
    for i, name in enumerate(names, 1):
        print(f"[benchmarks] {i}/{len(names)} {name} …", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            results[name] = run_one(name, args.quick)
        except Exception as e:  # the others still run; the failure is in the JSON and the exit status
            traceback.print_exc()
            results[name] = {"command": f"python -m benchmarks.{name}" + (" --quick" if args.quick else ""),
                             "error": f"{type(e).__name__}: {e}"}
        print(f"[benchmarks] {name} done in {time.perf_counter() - start:.0f}s", file=sys.stderr, flush=True)
    command = "python -m benchmarks" + (" --quick" if args.quick else "") + (
        f" --only {','.join(names)}" if names != list(BENCHMARKS) else "")
    meta = {"command": command, "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()} "
                                            f"{platform.release()}, Python {platform.python_version()}",
            "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "seconds": round(time.perf_counter() - t0, 1), "json": os.path.relpath(args.out, ROOT)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**meta, "benchmarks": results}, indent=1) + "\n")
    written = plots(results, Path(args.plots))
    if args.docs:
        write_docs(Path(args.docs), results, meta)
    print(f"\n[benchmarks] {meta['seconds']:.0f}s in all → {out}, {len(written)} plot(s) in {args.plots}"
          + (f", tables in {args.docs}" if args.docs else ""))
    for line in headline(results):
        print("  " + line)
    failed = [n for n, r in results.items() if "error" in r]
    if failed:
        print(f"[benchmarks] failed: {', '.join(failed)} (errors in {out})", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
