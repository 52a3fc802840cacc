"""The scale ladder: learner speed and memory from the tiny model up to Qwen2-0.5B's published shape.

Each rung is a Qwen2-architecture model with random weights built here (no hub): the embedded tiny model, ~25M,
~100M and Qwen2-0.5B's shape (24 layers, hidden 896, 14 heads / 2 KV heads, intermediate 4,864, vocabulary
151,936: ~494M parameters). Real LearnerGroups train SPPO pairs of ~65-token prompts and ~60-token responses:

- per rung and layout (1 rank ZeRO-0; 2 ranks ZeRO-3): seconds per learner step (the second; the first warms
  up), peak resident memory of each learner process while loading (policy, reference, engine), while training
  (measured inside the actor, its peak reset after loading) and then with a publish (rank 0 holds the host
  copies it sends), publish seconds and bytes;
- at one size: peak training memory vs batch size (1×, 2×, 4×, 8× a fixed micro-batch of 2 pairs), with and
  without gradient checkpointing.

    python -m benchmarks.scale            # up to the 0.5B shape (fp32 on CPU: bf16 matmuls are slower here)
    python -m benchmarks.scale --quick    # up to ~100M parameters, a few minutes
    python -m benchmarks.scale --selfplay-run   # a 4-step SPPO run at the 0.5B shape: peak memory per actor
    python -m benchmarks.scale --lora 8 --rungs qwen2-0.5b   # full fine-tuning vs LoRA rank 8, side by side
    python -m benchmarks.scale --selfplay-run --lora 8         # the 4-step run with LoRA adapters

Writes the figures to `--out` (default docs/scale.json) and a plot to `--plot` (default docs/img/bench-scale.png),
prints them as one JSON line and progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import ray

ROOT = Path(__file__).resolve().parent.parent

# (layers, hidden, heads, kv heads, intermediate, vocabulary); head size 64 throughout
SHAPES = {
    "qwen2-25m": (6, 384, 6, 2, 1536, 32_000),
    "qwen2-100m": (12, 640, 10, 2, 2560, 32_000),
    "qwen2-0.5b": (24, 896, 14, 2, 4864, 151_936),
}


def build(name: str, directory: Path) -> tuple[str, int]:
    """A model directory for rung `name` (random weights, the tiny tokenizer) and its parameter count."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from selfplay.models import save_pretrained
    from selfplay.tiny import build_tiny

    model, tok = build_tiny(seed=0)
    if name != "tiny":
        layers, hidden, heads, kv, inter, vocab = SHAPES[name]
        config = Qwen2Config(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                             num_key_value_heads=kv, intermediate_size=inter, vocab_size=vocab,
                             tie_word_embeddings=True, max_position_embeddings=4096)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
    path = save_pretrained(model, tok, directory / name)
    return str(path), sum(p.numel() for p in model.parameters())


def pairs(n: int, seed: int = 0) -> pa.Table:
    """n sort pairs with ~65-token prompts (chat-formatted) and ~60-token responses."""
    rng = random.Random(seed)
    prompts, chosen, rejected = [], [], []
    for _ in range(n):
        items = [rng.randint(10, 99) for _ in range(20)]
        prompts.append("Sort ascending: " + " ".join(map(str, items)))
        chosen.append(" ".join(map(str, sorted(items))))
        rejected.append(" ".join(map(str, sorted(items, reverse=True))))
    return pa.table({"prompt": prompts, "chosen": chosen, "rejected": rejected,
                     "p_chosen": [0.8] * n, "p_rejected": [0.3] * n})


def machine() -> str:
    from benchmarks.time_to_quality import cpu_model

    return f"{platform.machine()}, {os.cpu_count()} cores, {cpu_model()}"


def measure(policy: str, learners: int, zero: int, batch: int, micro: int | None, checkpointing: bool,
            lora: int = 0) -> dict:
    from actors.learner import LearnerGroup
    from selfplay.config import load_config

    cfg = load_config(None, [f"model.policy={policy}", f"model.lora.rank={lora}", f"resources.num_learners={learners}",
                             f"train.zero_stage={zero}", f"train.batch_size={batch}",
                             f"train.micro_batch_size={micro if micro else 'null'}",
                             f"train.gradient_checkpointing={str(checkpointing).lower()}", "train.lr=1e-5"])
    group = LearnerGroup(cfg, num_cpus=0.5)
    try:
        loading = [s["peak_rss_mb"] for s in group.stats()]  # the model, the reference and the engine set up
        ray.get([a.reset_peak_memory.remote() for a in group.actors])
        group.train_step(pairs(batch, 0))
        t0 = time.perf_counter()
        metrics = group.train_step(pairs(batch, 1))
        step_s = time.perf_counter() - t0
        peaks = [s["peak_rss_mb"] for s in group.stats()]  # training only
        t0 = time.perf_counter()
        published = group.publish()
        publish_s = time.perf_counter() - t0
        with_publish = [s["peak_rss_mb"] for s in group.stats()]  # rank 0 also holds the host copies it sends
    finally:
        group.shutdown()
    return {"learners": learners, "zero": zero, "lora_rank": lora, "batch": batch, "micro_batch": micro or batch // learners,
            "trained_parameters": group.info[0]["trained_parameters"],
            "checkpointing": checkpointing, "step_seconds": round(step_s, 3), "tokens": metrics["tokens"],
            "load_peak_rss_mb": [round(p) for p in loading], "peak_rss_mb": [round(p) for p in peaks],
            "peak_with_publish_mb": [round(p) for p in with_publish], "publish_seconds": round(publish_s, 3),
            "publish_mb": round(published["nbytes"] / 2**20, 1)}


def selfplay_run(name: str, directory: Path, lora: int = 0, transport: str = "object_store") -> dict:
    """`selfplay run` at rung `name`: SPPO, 2 ZeRO-3 learners (micro-batch 1, checkpointing, 256-token responses),
    1 hf generator, a random PairRM judge (a random policy's text ties under the sort task's rule judge), 4 steps
    with a weight push after each, full fine-tuning or LoRA of rank `lora`; each actor's resident peak from
    summary.json, the driver's (this process's, measured from the run's start) included."""
    import gc

    from actors.driver import Driver
    from actors.remote import reset_peak_rss, rss_mb
    from selfplay.config import load_config
    from selfplay.judges.pairrm import save_random_pairrm
    from selfplay.tiny import build_tokenizer

    policy, n = build(name, directory)
    judge = save_random_pairrm(directory / "pairrm", build_tokenizer(0), seed=0)
    cfg = load_config(ROOT / "configs" / "demo.yaml", [
        f"model.policy={policy}", "judge.kind=pairrm", f"judge.path={judge}", "resources.num_learners=2",
        "train.zero_stage=3", "train.batch_size=2", "train.micro_batch_size=1", "train.gradient_checkpointing=true",
        "train.max_response_tokens=256", "generation.max_new_tokens=256", "generation.prompts_per_request=2",
        "sppo.k=2", "train.steps=4", "train.lr=1e-6", "eval.prompts=4", "eval.every=0", "logging.log_every=1",
        f"model.lora.rank={lora}", f"weight_sync.transport={transport}"])
    gc.collect()
    reset_peak_rss()  # the model built above is not the driver's: measure from here
    driver_start = rss_mb()
    t0 = time.perf_counter()
    result = Driver(cfg, directory / "run", log=lambda line: print(line, file=sys.stderr)).run()
    return {"model": name, "parameters": n, "lora_rank": lora, "transport": transport,
            "learner_steps": result["learner_steps"],
            "weight_syncs": result["weight_syncs"], "rows_lost": result["rows_lost"],
            "peak_rss_mb": result["peak_rss_mb"], "loop_seconds": result["loop_seconds"],
            "driver_rss_at_start_mb": round(driver_start), "driver_peak_rss_mb": round(result["driver_peak_rss_mb"]),
            "seconds": round(time.perf_counter() - t0, 1)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="rungs up to ~100M parameters only")
    parser.add_argument("--out", default=str(ROOT / "docs" / "scale.json"), help="the JSON file to write")
    parser.add_argument("--plot", default=str(ROOT / "docs" / "img" / "bench-scale.png"), help="the PNG to write")
    parser.add_argument("--rungs", help="comma-separated rungs to run (default: all; --quick: up to qwen2-100m)")
    parser.add_argument("--memory-batches", help="pairs per step for the memory sweep at the largest rung "
                        "(default: 2,4,8,16 with --quick, else 2,16)")
    parser.add_argument("--selfplay-run", action="store_true",
                        help="only a 4-step SPPO `selfplay run` at the largest rung (--quick: ~100M), its peak "
                             "memory per actor added to --out as `selfplay_run`")
    parser.add_argument("--transport", default="object_store", choices=("object_store", "collective"),
                        help="--selfplay-run: its weight_sync.transport (collective: no version kept in the object "
                             "store)")
    parser.add_argument("--lora", type=int, metavar="RANK",
                        help="only full fine-tuning vs LoRA of this rank at --rungs (default: the largest), both "
                             "layouts side by side: step time, peak memory, publish bytes; added to --out as `lora`. "
                             "(--quick: 1 × ZeRO-0 only). With --selfplay-run: that run with LoRA (`selfplay_run_lora`)")
    args = parser.parse_args(argv)
    if args.lora is not None and args.lora < 1:
        parser.error(f"--lora {args.lora}: the rank must be >= 1")
    if args.selfplay_run:
        return run_only(args)
    if args.lora is not None:
        return lora_only(args, argv, parser)
    rungs = ["tiny", "qwen2-25m", "qwen2-100m"] + ([] if args.quick else ["qwen2-0.5b"])
    memory_rung = "qwen2-25m" if args.quick else "qwen2-0.5b"
    if args.rungs:
        rungs = args.rungs.split(",")
        unknown = [r for r in rungs if r != "tiny" and r not in SHAPES]
        if unknown:
            parser.error(f"unknown rung(s) {', '.join(unknown)}; known: tiny, {', '.join(SHAPES)}")
        memory_rung = rungs[-1]
    # 1x and 8x a micro-batch at the 0.5B shape (a 16-pair step takes minutes on a CPU); every size in between at 25M
    batches = (2, 4, 8, 16) if args.quick else (2, 16)
    if args.memory_batches:
        try:
            batches = tuple(int(b) for b in args.memory_batches.split(","))
        except ValueError:
            parser.error(f"--memory-batches {args.memory_batches!r}: expected comma-separated integers, e.g. 2,16")
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    t0, ladder, memory = time.perf_counter(), [], []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for name in rungs:
                policy, n = build(name, Path(tmp))
                for learners, zero in ((1, 0), (2, 3)):
                    row = {"model": name, "parameters": n, **measure(policy, learners, zero, 4, 2, True)}
                    print(f"[scale] {name} ({n / 1e6:.1f}M) {learners} rank(s) ZeRO-{zero}: "
                          f"{row['step_seconds']:.2f} s/step, peak {row['load_peak_rss_mb']} MiB loading, "
                          f"{row['peak_rss_mb']} MiB training, "
                          f"{row['peak_with_publish_mb']} MiB with publish {row['publish_seconds']:.2f} s "
                          f"({row['publish_mb']} MiB)", file=sys.stderr)
                    ladder.append(row)
                if name == memory_rung:
                    for checkpointing in (False, True):
                        for batch in batches:
                            row = {"model": name, **measure(policy, 1, 0, batch, 2, checkpointing)}
                            print(f"[scale] {name} batch {batch} (micro 2) checkpointing {checkpointing}: "
                                  f"peak {row['peak_rss_mb'][0]} MiB", file=sys.stderr)
                            memory.append(row)
    finally:
        ray.shutdown()
    command = "python -m benchmarks.scale" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    out_path = Path(args.out)
    out = json.loads(out_path.read_text()) if out_path.exists() else {}  # keeps the selfplay runs and LoRA figures
    out.update({"benchmark": "scale", "command": command, "machine": machine(), "precision": "fp32",
                "results": ladder, "memory_vs_batch": memory, "seconds": round(time.perf_counter() - t0, 1)})
    out_path.write_text(json.dumps(out, indent=1) + "\n")
    plot(out, Path(args.plot))
    print(json.dumps(out))
    return out


def run_only(args) -> dict:
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            run = selfplay_run("qwen2-100m" if args.quick else "qwen2-0.5b", Path(tmp), args.lora or 0, args.transport)
    finally:
        ray.shutdown()
    run["command"] = "python -m benchmarks.scale --selfplay-run" + (" --quick" if args.quick else "") \
        + (f" --lora {args.lora}" if args.lora else "") \
        + (f" --transport {args.transport}" if args.transport != "object_store" else "")
    run["machine"] = machine()
    out_path = Path(args.out)
    out = json.loads(out_path.read_text()) if out_path.exists() else {"benchmark": "scale"}
    out["selfplay_run_lora" if args.lora else "selfplay_run"] = run
    out_path.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(run))
    return out


def lora_only(args, argv, parser) -> dict:
    """Full fine-tuning and LoRA at each rung, one layout after the other in this one run (4 pairs, micro-batch 2,
    checkpointing, as the ladder); --quick: 1 × ZeRO-0 only."""
    rungs = (args.rungs or ("qwen2-100m" if args.quick else "qwen2-0.5b")).split(",")
    unknown = [r for r in rungs if r != "tiny" and r not in SHAPES]
    if unknown:
        parser.error(f"unknown rung(s) {', '.join(unknown)}; known: tiny, {', '.join(SHAPES)}")
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    t0, rows = time.perf_counter(), []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for name in rungs:
                policy, n = build(name, Path(tmp))
                for learners, zero in ((1, 0),) if args.quick else ((1, 0), (2, 3)):
                    for rank in (0, args.lora):
                        row = {"model": name, "parameters": n, **measure(policy, learners, zero, 4, 2, True, rank)}
                        print(f"[scale] {name} {learners} rank(s) ZeRO-{zero} {f'LoRA r={rank}' if rank else 'full'}: "
                              f"{row['step_seconds']:.2f} s/step, peak {row['peak_rss_mb']} MiB training, "
                              f"{row['peak_with_publish_mb']} MiB with publish {row['publish_seconds']:.3f} s "
                              f"({row['publish_mb']} MiB)", file=sys.stderr)
                        rows.append(row)
    finally:
        ray.shutdown()
    for full, lora in zip(rows[::2], rows[1::2]):
        print(f"[scale] {full['model']} {full['learners']}×ZeRO-{full['zero']}: LoRA/full — push bytes "
              f"{lora['publish_mb'] / full['publish_mb']:.4f}, publish time {lora['publish_seconds'] / full['publish_seconds']:.3f}, "
              f"step time {lora['step_seconds'] / full['step_seconds']:.2f}, peak "
              f"{max(lora['peak_rss_mb']) / max(full['peak_rss_mb']):.2f}", file=sys.stderr)
    command = "python -m benchmarks.scale" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    run = {"command": command, "machine": machine(), "results": rows, "seconds": round(time.perf_counter() - t0, 1)}
    out_path = Path(args.out)
    out = json.loads(out_path.read_text()) if out_path.exists() else {"benchmark": "scale"}
    out["lora"] = run
    out_path.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(run))
    return out


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    for (learners, zero), marker in (((1, 0), "o"), ((2, 3), "s")):
        rows = [r for r in out["results"] if (r["learners"], r["zero"]) == (learners, zero)]
        a.plot([r["parameters"] / 1e6 for r in rows], [max(r["peak_rss_mb"]) / 1024 for r in rows], marker=marker,
               label=f"{learners} rank(s), ZeRO-{zero}: peak per rank")
    a.set_xscale("log")
    a.set_xlabel("parameters (M)")
    a.set_ylabel("peak learner memory (GiB)")
    a.legend(fontsize=7)
    for checkpointing in (False, True):
        rows = [r for r in out["memory_vs_batch"] if r["checkpointing"] == checkpointing]
        b.plot([r["batch"] for r in rows], [r["peak_rss_mb"][0] / 1024 for r in rows], marker="o",
               label=f"checkpointing {'on' if checkpointing else 'off'}")
    b.set_xlabel("pairs per step (micro-batch 2)")
    b.set_ylabel("peak learner memory (GiB)")
    b.set_ylim(bottom=0)
    b.legend(fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
