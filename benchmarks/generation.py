"""Generation throughput on the tiny model, two measurements side by side in one run:

1. tokens/s of each backend (hf, vllm) at batch 1, 8 and 32, and the GeneratorActor's overhead — the same
   requests through the actor vs the backend called directly in-process (`results`);
2. requests in flight (vLLM): requests of 8 prompts with mixed response lengths (8 … 256 new tokens) sent to one
   vLLM GeneratorActor one at a time (the driver waits for each) vs with 2, 4 or all of them in flight, where
   each request's sequences join the running batch (`in_flight`: samples/s and the ratio to one at a time);
3. an SPPO round in the `hf` backend (`sppo_round`): 32 prompts × 8 samples of up to 24 tokens at temperature 1,
   from the demo's warmed-up initial policy (which stops at EOS after varied lengths), by our decode loop
   (`selfplay.generation.decode`: one prefill per prompt, finished samples leave the batch) vs `model.generate`
   with `num_return_sequences` (K prefills per prompt, finished rows kept to the end): seconds per round, both
   alternately on one thread, and the mean response length of each (the same distribution: equal within noise).

Parts 1 and 2 use the tiny model's untrained weights, which never emit EOS: every request produces exactly as
many tokens as it asks.

    python -m benchmarks.generation            # 64 new tokens per request; 24 requests in flight
    python -m benchmarks.generation --quick    # 32; 12 requests
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import tempfile
import time

import ray
import torch

from selfplay.backends import make_backend
from selfplay.config import load_config
from selfplay.tasks import SortTask, chat_prompt
from selfplay.tiny import build_tiny

BATCHES = (1, 8, 32)
LENGTHS = (8, 16, 32, 64, 128, 256)  # new tokens of request i: LENGTHS[i % 6]
WINDOWS = (1, 2, 4, None)  # requests in flight at once (None: all of them)


def rate(fn, tokens_expected: int, repeats: int = 2) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        produced = fn()
        best = min(best, time.perf_counter() - start)
    assert produced == tokens_expected, (produced, tokens_expected)
    return tokens_expected / best


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tokens", type=int, default=None, help="new tokens per request (default 64, quick 32)")
    args = parser.parse_args(argv)
    new_tokens = args.tokens or (32 if args.quick else 64)
    torch.set_num_threads(1)  # one thread for the in-process backend, like the one-CPU actor beside it
    backends = ["hf"] + (["vllm"] if importlib.util.find_spec("vllm") else [])
    workdir = tempfile.mkdtemp(prefix="bench-gen-")
    _, tok = build_tiny(0, f"{workdir}/tiny")
    policy = f"{workdir}/tiny"
    prompts = SortTask().prompts("eval", max(BATCHES), seed=0)
    ids = [tok(chat_prompt(tok, p), add_special_tokens=False)["input_ids"] for p in prompts]
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    from actors.generator import GeneratorActor

    results = []
    t0 = time.perf_counter()
    try:
        for name in backends:
            backend = make_backend(name, policy, tokenizer=tok)
            cfg = load_config(None, [f"generation.backend={name}", f"model.policy={policy}", "resources.generator_cpus=1"])
            actor = GeneratorActor.options(num_cpus=1).remote(cfg.to_dict(), policy, 0)
            def direct_tokens(n, backend=backend):
                out = backend.generate(ids[:n], num_samples=1, temperature=0.0, max_new_tokens=new_tokens)
                return sum(len(c[0].token_ids) for c in out)

            def actor_tokens(n, actor=actor):
                results = ray.get(actor.sample.remote(prompts[:n], k=1, temperature=0.0, max_new_tokens=new_tokens))
                return sum(len(r["samples"][0]["token_ids"]) for r in results)

            for batch in BATCHES:
                direct = rate(lambda n=batch: direct_tokens(n), batch * new_tokens)
                through_actor = rate(lambda n=batch: actor_tokens(n), batch * new_tokens)
                results.append({"backend": name, "batch": batch, "direct_tokens_per_s": round(direct, 1),
                                "actor_tokens_per_s": round(through_actor, 1),
                                "actor_overhead_ratio": round(direct / through_actor, 3)})
            ray.kill(actor)
            del backend
        in_flight = requests_in_flight(policy, prompts[:8], 12 if args.quick else 24) if "vllm" in backends else \
            {"skipped": "vLLM is not installed"}
        round_ = sppo_round(workdir, 3 if args.quick else 10)
    finally:
        ray.shutdown()
    out = {"benchmark": "generation", "command": "python -m benchmarks.generation" + (" --quick" if args.quick else ""),
           "machine": f"{platform.machine()}, {os.cpu_count()} cores", "model": "tiny (0.44M params)",
           "new_tokens": new_tokens, "results": results, "in_flight": in_flight, "sppo_round": round_,
           "seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps(out))
    return out


def requests_in_flight(policy: str, prompts: list, requests: int, repeats: int = 2) -> dict:
    """One vLLM GeneratorActor; `requests` requests of `prompts` (greedy, request i asks LENGTHS[i % 6] new tokens),
    kept `window` at a time in flight as the driver does with `generation.requests_in_flight`; best of `repeats`.
    → {rows: [{window, seconds, samples_per_s, tokens_per_s, speedup}], ...}"""
    from actors.generator import GeneratorActor

    cfg = load_config(None, ["generation.backend=vllm", f"model.policy={policy}", "resources.generator_cpus=1"])
    actor = GeneratorActor.options(num_cpus=1).remote(cfg.to_dict(), policy, 0)
    lengths = [LENGTHS[i % len(LENGTHS)] for i in range(requests)]

    def run(window: int) -> tuple[float, int]:
        pending, tokens, start = list(lengths), 0, time.perf_counter()
        flying: list = []
        while pending or flying:
            while pending and len(flying) < window:
                flying.append(actor.sample.remote(prompts, k=1, temperature=0.0, max_new_tokens=pending.pop(0)))
            ready, flying = ray.wait(flying, num_returns=1)
            tokens += sum(len(r["samples"][0]["token_ids"]) for r in ray.get(ready[0]))
        return time.perf_counter() - start, tokens

    run(requests)  # warm-up
    rows = []
    for window in WINDOWS:
        seconds, tokens = min(run(window or requests) for _ in range(repeats))
        assert tokens == len(prompts) * sum(lengths), (tokens, len(prompts) * sum(lengths))
        rows.append({"window": window or requests, "seconds": round(seconds, 3),
                     "samples_per_s": round(requests * len(prompts) / seconds, 1),
                     "tokens_per_s": round(tokens / seconds, 1)})
    for row in rows:
        row["speedup"] = round(row["samples_per_s"] / rows[0]["samples_per_s"], 2)
    stats = ray.get(actor.stats.remote())
    ray.kill(actor)
    return {"requests": requests, "prompts_per_request": len(prompts), "lengths": list(LENGTHS),
            "most_requests_at_once": stats["most_requests_at_once"], "rows": rows}


def sppo_round(workdir: str, repeats: int) -> dict:
    """The demo's SPPO round (32 prompts × K = 8, ≤ 24 tokens, temperature 1) on its warmed-up initial policy, in
    process on one thread: `decode` vs `model.generate`, alternating, `repeats` rounds each (median seconds)."""
    from selfplay.demo import demo_config
    from selfplay.generation import decode, left_pad, transformers_generate
    from selfplay.models import load_policy_and_tokenizer
    from selfplay.preflight import run_prompts
    from selfplay.warmup import initial_policy

    cfg = demo_config("sppo")
    train = run_prompts(cfg)[0]
    path = initial_policy(cfg, train, workdir, log=lambda m: None)
    model, tok = load_policy_and_tokenizer(load_config(None, [f"model.policy={path}"]).model, 0)
    model.eval()
    ids = [tok(chat_prompt(tok, p), add_special_tokens=False)["input_ids"] for p in train[:cfg.generation.prompts_per_request]]
    input_ids, attention = left_pad(ids, tok.pad_token_id)
    k, limit, eos = cfg.sppo.k, cfg.generation.max_new_tokens, tok.eos_token_id
    ways = {"decode": lambda: decode(model, input_ids, attention, k, limit, 1.0, 1.0, len(tok), eos),
            "generate": lambda: transformers_generate(model, input_ids, attention, k, limit, 1.0, 1.0, len(tok), eos,
                                          tok.pad_token_id)}
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    lengths: dict[str, list[int]] = {name: [] for name in ways}
    with torch.no_grad():
        for r in range(repeats + 1):  # the first round of each warms up
            for name, way in ways.items():
                torch.manual_seed(r)
                start = time.perf_counter()
                rows = way()
                if r:
                    seconds[name].append(time.perf_counter() - start)
                    lengths[name] += [row.index(eos) + 1 if eos in row else len(row) for row in rows]
    median = {name: sorted(s)[len(s) // 2] for name, s in seconds.items()}
    return {"prompts": len(ids), "k": k, "max_new_tokens": limit, "repeats": repeats,
            "decode_seconds": round(median["decode"], 3), "generate_seconds": round(median["generate"], 3),
            "speedup": round(median["generate"] / median["decode"], 2),
            "mean_tokens": {name: round(sum(v) / len(v), 2) for name, v in lengths.items()}}


if __name__ == "__main__":
    main()
