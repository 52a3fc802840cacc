"""Replay buffer throughput: add and sample rows/s for 1 and 4 shard actors at 10k and 1M rows, and the ratio
to sampling the same rows from one in-process Arrow table (the floor: no actors, no serialization).

    python -m benchmarks.replay            # prints one JSON line
    python -m benchmarks.replay --quick    # 10k and 100k rows
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import pyarrow as pa

from selfplay.buffer import to_table

ADD_BATCH = 10_000  # rows per add() call, like a judge flushing a large batch
SAMPLE_BATCH = 256  # rows per sample() call, like a learner step
SAMPLE_CALLS = 200


def synthetic_rows(n: int, start: int = 0) -> pa.Table:
    i = np.arange(start, start + n)
    ids = pa.array([f"prompt-{k}" for k in i])
    text = pa.array(["Sort ascending: 7 3 9 1 4 2"] * n)
    return to_table(
        pa.table(
            {
                "prompt_id": ids,
                "prompt": text,
                "chosen": pa.array(["1 2 3 4 7 9"] * n),
                "rejected": pa.array(["1 2 3 7 4 9"] * n),
                "score_chosen": pa.array(np.ones(n, dtype=np.float32)),
                "score_rejected": pa.array(np.full(n, 0.5, dtype=np.float32)),
                "p_chosen": pa.array(np.full(n, 0.8, dtype=np.float32)),
                "p_rejected": pa.array(np.full(n, 0.2, dtype=np.float32)),
                "policy_version": pa.array(np.zeros(n, dtype=np.int64)),
                "algorithm": pa.array(["sppo"] * n),
            }
        )
    )


def floor_sample_rate(table: pa.Table, rng: np.random.Generator) -> float:
    start = time.perf_counter()
    for _ in range(SAMPLE_CALLS):
        table.take(pa.array(rng.choice(table.num_rows, SAMPLE_BATCH, replace=False)))
    return SAMPLE_CALLS * SAMPLE_BATCH / (time.perf_counter() - start)


def measure(rows: int, shards: int, batches: list[pa.Table]) -> dict:
    from actors.replay import ReplayBuffer

    # headroom: hash routing fills shards unevenly, and eviction is not what this measures
    buf = ReplayBuffer(num_shards=shards, capacity=2 * rows, num_cpus=0.1, seed=0)
    try:
        buf.stats()  # wait until the shard actors are up: actor start-up is not add throughput
        start = time.perf_counter()
        for b in batches:
            buf.add(b)
        add_s = time.perf_counter() - start
        assert buf.stats()["size"] == rows
        start = time.perf_counter()
        for _ in range(SAMPLE_CALLS):
            buf.sample(SAMPLE_BATCH)
        sample_s = time.perf_counter() - start
    finally:
        buf.shutdown()
    return {"rows": rows, "shards": shards, "add_rows_per_s": rows / add_s,
            "sample_rows_per_s": SAMPLE_CALLS * SAMPLE_BATCH / sample_s,
            "sample_ms_per_call": 1000 * sample_s / SAMPLE_CALLS}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="10k and 100k rows instead of 10k and 1M")
    args = parser.parse_args(argv)
    import ray

    sizes = [10_000, 100_000] if args.quick else [10_000, 1_000_000]
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    rng = np.random.default_rng(0)
    results = []
    t0 = time.perf_counter()
    try:
        for rows in sizes:
            batches = [synthetic_rows(min(ADD_BATCH, rows - s), s) for s in range(0, rows, ADD_BATCH)]
            floor = floor_sample_rate(pa.concat_tables(batches).combine_chunks(), rng)
            for shards in (1, 4):
                r = measure(rows, shards, batches)
                r["floor_sample_rows_per_s"] = floor
                r["sample_ratio_to_floor"] = r["sample_rows_per_s"] / floor
                results.append({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()})
    finally:
        ray.shutdown()
    out = {
        "benchmark": "replay",
        "command": "python -m benchmarks.replay" + (" --quick" if args.quick else ""),
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores",
        "add_batch": ADD_BATCH,
        "sample_batch": SAMPLE_BATCH,
        "results": results,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
