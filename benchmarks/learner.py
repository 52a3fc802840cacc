"""One learner step of the embedded demo with shared prompts (`train.share_prompts`, the default) and with whole
rows, side by side: per algorithm, two learners (the demo's config, one rank, DeepSpeed on CPU, one thread as in
its Ray actor) take the same batches in turn, and the median step seconds of each give the speed-up. Also the
padded tokens each step puts through the model (policy forward; the reference's is the same again).

A batch is what the replay buffer hands a learner: 32 sort-task prompts, the reference answer as chosen and a
shuffled one as rejected, so prompts and responses have the demo's lengths; the weights are the untrained tiny
model's (the time of a step does not depend on them).

    python -m benchmarks.learner             # SPPO, SAPO (the demo's ORPO loss, and DPO) and SRPO: 20 steps each way
    python -m benchmarks.learner --quick     # 5 steps each way
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import sys
import time

import pyarrow as pa
import torch

from actors.learner import LearnerActor
from selfplay.demo import demo_config
from selfplay.objectives import encode_rows
from selfplay.tasks import SortTask

CASES = {"sppo": [], "sapo (orpo)": [], "sapo (dpo)": ["sapo.loss=dpo"], "srpo": []}
PORTS = itertools.count(29534)  # a rendezvous port per learner (each its own one-rank group)


def batches(n: int, pairs: int = 32) -> list[pa.Table]:
    prompts = SortTask().prompts("train", n * pairs, seed=1)
    rng = random.Random(0)
    out = []
    for k in range(n):
        part = prompts[k * pairs:(k + 1) * pairs]
        chosen = [p.reference for p in part]
        rejected = [" ".join(rng.sample(c.split(), len(c.split()))) for c in chosen]
        out.append(pa.table({"prompt": [p.text for p in part], "chosen": chosen, "rejected": rejected,
                             "p_chosen": [0.75] * pairs, "p_rejected": [0.25] * pairs}))
    return out


def padded_tokens(learner, table: pa.Table, share: bool) -> int:
    """Token positions (padding included) one step's micro-batches put through the policy."""
    data, micro = table.to_pydict(), learner.cfg.train.micro_batch_size or table.num_rows
    total = 0
    for first in range(0, table.num_rows, micro):
        part = {k: v[first:first + micro] for k, v in data.items()}
        for b in encode_rows(learner.tokenizer, part, learner.spec, share_prompts=share).values():
            total += sum(b[k].numel() for k in ("input_ids", "prompt_ids", "response_ids") if k in b)
    return total


def measure(case: str, extra: list[str], steps: int) -> dict:
    algorithm = case.split()[0]
    learners = {}
    for share in (True, False):
        cfg = demo_config(algorithm, "sync", extra=[*extra, f"train.share_prompts={str(share).lower()}"])
        learner = LearnerActor.__ray_actor_class__(cfg.to_dict(), 0, 1, "tiny")
        learner.setup("127.0.0.1", next(PORTS))
        learners[share] = learner
    data = batches(steps + 2)
    seconds: dict[bool, list[float]] = {True: [], False: []}
    for i, table in enumerate(data):
        for share in ((True, False) if i % 2 else (False, True)):  # alternate which goes first
            start = time.perf_counter()
            learners[share].train_step(table)
            if i >= 2:  # two warm-up steps each
                seconds[share].append(time.perf_counter() - start)
    shared, whole = statistics.median(seconds[True]), statistics.median(seconds[False])
    return {"case": case, "micro_batch_size": learners[True].cfg.train.micro_batch_size,
            "shared_seconds": round(shared, 4), "whole_seconds": round(whole, 4), "speedup": round(whole / shared, 2),
            "shared_tokens": padded_tokens(learners[True], data[0], True),
            "whole_tokens": padded_tokens(learners[False], data[0], False)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.learner", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="5 steps each way (default 20)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # as in the learner's Ray actor (num_cpus < 1: one thread)
    steps = 5 if args.quick else 20
    results = []
    for case, extra in CASES.items():
        r = measure(case, extra, steps)
        print(f"[learner] {case}: shared prompts {r['shared_seconds']:.3f} s per step, whole rows "
              f"{r['whole_seconds']:.3f} s ({r['speedup']:.2f}×); tokens {r['shared_tokens']} vs {r['whole_tokens']}",
              file=sys.stderr, flush=True)
        results.append(r)
    out = {"benchmark": "learner", "steps": steps, "threads": 1, "results": results}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
