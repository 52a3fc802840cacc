"""End-to-end pipeline throughput: the same SPPO work in sync and in async mode, side by side in one run.

Same tiny policy (warmed up once, then shared), same prompts, K, batch size and number of learner steps; every
actor is limited to one CPU thread, emulating one device each. `replay.max_reuse=1` in both modes: every
preference pair is trained on exactly once, so async cannot look faster by re-training old rows — it must
generate the same pairs the sync loop does, only overlapped with training.

Reported per layout (generators:learners) and mode: samples trained per second over the training loop (actor
start-up, the final checkpoint and the evaluation excluded), generator and learner idle fractions (busy time is
measured inside the actors), and the async/sync ratio.

    python -m benchmarks.pipeline            # 40 learner steps per run, layouts 1:1 and 2:1
    python -m benchmarks.pipeline --quick    # 24 steps
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import ray

from actors.driver import Driver
from selfplay.demo import demo_config

# generator requests and learner steps of similar cost on this machine, so that overlapping them can pay
WORKLOAD = [
    "sppo.k=4",
    "generation.prompts_per_request=16",
    "generation.max_new_tokens=24",
    "train.batch_size=16",
    "replay.max_reuse=1",
    "replay.capacity=256",
    # throughput of the machinery with nothing waiting on purpose: the unbounded schedule these figures were
    # measured with (the default, max_policy_lag 1, is measured for quality per wall second by time_to_quality)
    "train.max_policy_lag=null",
    "sppo.iterations=1",
    "eval.prompts=20",
    "eval.every=0",
    "warmup.steps=30",
    "resources.generator_cpus=1",
    "resources.learner_cpus=1",
    "resources.judge_cpus=0.25",
    "resources.replay_cpus=0.25",
]
KEEP = ("loop_seconds", "samples_trained_per_s", "samples_generated_per_s", "generator_idle_fraction",
        "learner_idle_fraction", "learner_steps", "samples_trained", "samples_generated", "rows_evicted",
        "skipped_ties", "winrate_vs_initial")


def _pin(actor_instance, cores: set[int]) -> list[int]:
    """Runs inside an actor: every thread of its process on `cores` only (new threads inherit it)."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cores)
        except OSError:  # a thread that ended meanwhile
            pass
    return sorted(os.sched_getaffinity(0))


class PinnedDriver(Driver):
    """The driver, with generator i on core i and the learner on the next core: on one machine, a core of its
    own is the nearest thing to a device of its own. Without it the OS puts an async generator and the learner
    on the same core whenever the driver, judge or raylet wakes, and async measures time-slicing, not overlap.
    The judge, replay shard, driver and raylet stay free to run on any core, in both modes."""

    def _build(self, policy: str) -> None:
        super()._build(policy)
        actors = [*self.generators, *self.learners.actors]
        ray.get([a.__ray_call__.remote(_pin, {core}) for core, a in enumerate(actors)], timeout=60)


def run_once(mode: str, generators: int, steps: int, policy: str, out: str) -> dict:
    cfg = demo_config("sppo", mode, extra=[*WORKLOAD, f"train.steps={steps}", f"model.policy={policy}",
                                           f"resources.num_generators={generators}", "logging.log_every=1000"])
    summary = PinnedDriver(cfg, out, log=lambda _: None).run()
    return {k: round(summary[k], 4) if isinstance(summary[k], float) else summary[k] for k in KEEP}


def warm_policy(workdir: str) -> str:
    """The warmed-up tiny policy every measured run starts from (one sync step builds it; not measured)."""
    Driver(demo_config("sppo", "sync", extra=[*WORKLOAD, "train.steps=1"]), f"{workdir}/warm", log=lambda _: None).run()
    return f"{workdir}/warm/initial_policy"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=None, help="learner steps per run (default 40, quick 24)")
    parser.add_argument("--layouts", default="1,2", help="generator counts to measure, one learner each")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    steps = args.steps if args.steps is not None else (24 if args.quick else 40)
    try:
        layouts = [int(g) for g in args.layouts.split(",")]
    except ValueError:
        parser.error(f"--layouts: expected generator counts such as 1,2; got {args.layouts!r}")
    if steps < 1 or min(layouts) < 1:
        parser.error("--steps and every --layouts count must be >= 1")
    workdir = tempfile.mkdtemp(prefix="bench-pipeline-")
    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    results = []
    try:
        policy = warm_policy(workdir)
        for generators in layouts:
            row = {"layout": f"{generators}:1"}
            if generators + 1 > (os.cpu_count() or 1):
                row["skipped"] = f"needs {generators + 1} cores (one per generator and learner); this machine has " \
                                 f"{os.cpu_count()}"
                print(f"[pipeline] {row['layout']}: {row['skipped']}", flush=True)
                results.append(row)
                continue
            for mode in ("sync", "async"):  # side by side: same policy, prompts and steps
                row[mode] = run_once(mode, generators, steps, policy, f"{workdir}/{mode}-{generators}")
            row["async_over_sync"] = round(row["async"]["samples_trained_per_s"] / row["sync"]["samples_trained_per_s"],
                                           3)
            results.append(row)
            print(f"[pipeline] {row['layout']}: sync {row['sync']['samples_trained_per_s']:.1f} → async "
                  f"{row['async']['samples_trained_per_s']:.1f} samples trained/s ({row['async_over_sync']:.2f}×); "
                  f"async idle: generators {row['async']['generator_idle_fraction']:.0%}, learner "
                  f"{row['async']['learner_idle_fraction']:.0%}", flush=True)
    finally:
        ray.shutdown()
    out = {"benchmark": "pipeline", "command": " ".join(["python -m benchmarks.pipeline", *argv]),
           "machine": f"{platform.machine()}, {os.cpu_count()} cores", "model": "tiny (0.44M params)",
           "steps": steps, "workload": WORKLOAD, "results": results, "seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
