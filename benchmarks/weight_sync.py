"""Weight-sync latency and memory vs model size: streamed (what the learners and generators run) vs the staged
path they ran before vs one raw broadcast of the same bytes (the floor: no buckets, no checksums, no copies).

One sender actor (learner rank 0's role) and two receiver actors (generators' role) run the real pieces:
`plan_buckets` / `fill_bucket` → `BroadcastChannel.send` (or `ray.put` per bucket) → `check_manifest`, per-bucket
checksums (`verified`) → each tensor copied into the receiver's parameters as its bucket arrives. Latency =
publish start → every receiver has applied the update; best of `repeats`.

- `collective_streamed_bucketed` / `_per_tensor`: 64 MB buckets / one tensor per bucket, over a gloo broadcast.
- `object_store_streamed_bucketed` / `_per_tensor`: the same buckets through `ray.put` / `ray.get`.
- `collective_staged_bucketed`: the path before streaming — a full host copy of the model, every bucket packed
  (`torch.cat`) and crc32-summed, all sent; the receiver takes all buckets, checks them all, then applies.
- memory: each process's peak resident memory during a push above what it held before (VmHWM, reset per push),
  in bytes and in buckets of the largest bucket's size.

    python -m benchmarks.weight_sync            # 64 MB, 512 MB and Qwen2-0.5B's shape (1 GB bf16, 2 GB fp32)
    python -m benchmarks.weight_sync --quick    # 16 and 64 MB
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import zlib

import ray
import torch

from actors.remote import peak_rss_mb, reset_peak_rss, rss_mb
from actors.weight_sync import BroadcastChannel
from selfplay.weights import (
    bucket_entries,
    bucket_sizes,
    bucket_tensors,
    check_manifest,
    checksum,
    fill_bucket,
    plan_buckets,
    tensor_bytes,
    verified,
)

TENSOR_BYTES = 1 << 20  # synthetic models: 1 MB tensors
BUCKET_BYTES = 64 << 20
RECEIVERS = 2
QWEN2_05B = dict(num_hidden_layers=24, hidden_size=896, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True)
VARIANTS = ("collective_streamed_bucketed", "collective_streamed_per_tensor", "object_store_streamed_bucketed",
            "object_store_streamed_per_tensor", "collective_staged_bucketed")


def model_specs(model: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """{name: (shape, dtype)}: `16mb` … (1 MB fp32 tensors) or `qwen2-0.5b-fp32` / `-bf16` (the published shape)."""
    if model.startswith("qwen2-0.5b"):
        from transformers import Qwen2Config, Qwen2ForCausalLM

        dtype = torch.bfloat16 if model.endswith("bf16") else torch.float32
        with torch.device("meta"):
            skeleton = Qwen2ForCausalLM(Qwen2Config(**QWEN2_05B)).to(dtype)
        return {n: (tuple(p.shape), p.dtype) for n, p in skeleton.named_parameters()}
    mb = int(model.removesuffix("mb"))
    return {f"layer{i}.weight": ((TENSOR_BYTES // 4,), torch.float32) for i in range(mb)}


def make_state(specs, zeros: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {n: torch.zeros(s, dtype=d) if zeros else torch.empty(s, dtype=d).uniform_(-1, 1, generator=g)
            for n, (s, d) in specs.items()}


class Measured:
    """Peak memory of one push above what the process held before it."""

    def start(self) -> None:
        reset_peak_rss()
        self.before = rss_mb()

    def extra_mb(self) -> float:
        return peak_rss_mb() - self.before


@ray.remote
class Sender(Measured):
    def __init__(self, model: str):
        torch.set_num_threads(1)
        self.state = make_state(model_specs(model))

    def address(self):
        import socket

        with socket.socket() as s:
            s.bind(("", 0))
            return ray.util.get_node_ip_address(), s.getsockname()[1]

    def open_channel(self, host, port, size):
        self.channel = BroadcastChannel(host, port, 0, size, name=f"bench{port}")
        return True

    def _fill(self, manifest, buffers: int):  # the learner's `_buckets`, without the ZeRO-3 gather
        pool = [torch.empty(max(bucket_sizes(manifest)), dtype=torch.uint8) for _ in range(buffers)]
        for i, entries in enumerate(bucket_entries(manifest)):
            yield fill_bucket(entries, [self.state[m["name"]] for m in entries],
                              buffer=pool[i % buffers] if buffers else None)

    def push(self, variant: str, bucket_bytes: int):
        manifest = plan_buckets({n: (tuple(t.shape), t.dtype) for n, t in self.state.items()}, bucket_bytes)
        if variant.startswith("collective_streamed"):
            self.channel.send(1, manifest, self._fill(manifest, BroadcastChannel.IN_FLIGHT))
            return None
        if variant.startswith("object_store"):
            refs, checksums = [], []
            for bucket in self._fill(manifest, 0):  # as the learner: own tensors for ray.put
                checksums.append(checksum(bucket))
                refs.append(ray.put(bucket))
            return {"manifest": manifest, "checksums": checksums, "buckets": refs}
        # staged: full host copy (the old full_state) → every bucket packed → crc32 each → all sent
        copy = {n: t.clone() for n, t in self.state.items()}
        buckets = [fill_bucket(entries, [copy[m["name"]] for m in entries]) for entries in bucket_entries(manifest)]
        crcs = torch.tensor([zlib.crc32(b.numpy().data) for b in buckets], dtype=torch.int64)
        for work in [self.channel._post(b)[0] for b in buckets] + self.channel._post(crcs):
            work.wait()
        return None

    def raw(self):
        self.channel._post(self.flat)[0].wait()
        return True

    def build_flat(self, build: bool = True):  # built before timing starts: the floor measures the wire, not a copy
        self.flat = torch.cat([t.reshape(-1).view(torch.uint8) for t in self.state.values()]) if build else None
        return 0 if self.flat is None else self.flat.numel()

    def state_sum(self) -> float:
        return sum(float(t.double().sum()) for t in self.state.values())


@ray.remote
class Receiver(Measured):
    def __init__(self, model: str):
        torch.set_num_threads(1)
        self.specs = model_specs(model)
        self.params = make_state(self.specs, zeros=True)

    def open_channel(self, host, port, rank, size):
        self.channel = BroadcastChannel(host, port, rank, size, name=f"bench{port}")
        return True

    def _apply(self, manifest, sizes, buckets) -> bool:  # the generator's `_apply`, each bucket as it arrives
        check_manifest(manifest, self.specs, sizes)
        for entries, bucket in zip(bucket_entries(manifest), buckets, strict=True):
            for name, t in bucket_tensors(bucket, entries):
                self.params[name].copy_(t)
        return True

    def receive(self, variant: str, pub=None, bucket_bytes: int = BUCKET_BYTES):
        if variant.startswith("collective_streamed"):
            _, manifest, sizes, buckets = self.channel.receive(reuse_buffers=True)  # as the hf backend
            return self._apply(manifest, sizes, buckets)
        if variant.startswith("object_store"):
            buckets = (verified(i, ray.get(ref), c) for i, (ref, c) in enumerate(zip(pub["buckets"], pub["checksums"])))
            return self._apply(pub["manifest"], bucket_sizes(pub["manifest"]), buckets)
        # staged: every bucket received, all checked, then applied
        manifest = plan_buckets(self.specs, bucket_bytes)
        buckets = [torch.empty(n, dtype=torch.uint8) for n in bucket_sizes(manifest)]
        crcs = torch.zeros(len(buckets), dtype=torch.int64)
        for work in [self.channel._post(b)[0] for b in buckets] + self.channel._post(crcs):
            work.wait()
        if [zlib.crc32(b.numpy().data) for b in buckets] != crcs.tolist():
            raise RuntimeError("checksum mismatch")
        check_manifest(manifest, self.specs)
        for entries, bucket in zip(bucket_entries(manifest), buckets):
            for name, t in bucket_tensors(bucket, entries):
                self.params[name].copy_(t)
        return True

    def receive_raw(self, nbytes: int):
        self.channel._post(torch.empty(nbytes, dtype=torch.uint8))[0].wait()
        return True

    def state_sum(self) -> float:
        return sum(float(t.double().sum()) for t in self.params.values())


def measure(model: str, repeats: int) -> dict:
    sender = Sender.options(num_cpus=0.1).remote(model)
    receivers = [Receiver.options(num_cpus=0.1).remote(model) for _ in range(RECEIVERS)]
    host, port = ray.get(sender.address.remote())
    size = 1 + RECEIVERS
    ray.get([sender.open_channel.remote(host, port, size)]
            + [r.open_channel.remote(host, port, i + 1, size) for i, r in enumerate(receivers)])
    specs = model_specs(model)
    nbytes = sum(tensor_bytes(s, d) for s, d in specs.values())
    largest = {v: max(bucket_sizes(plan_buckets(specs, BUCKET_BYTES if v.endswith("bucketed") else 1)))
               for v in VARIANTS}

    def push(variant: str) -> float:
        actors = [sender, *receivers]
        ray.get([a.start.remote() for a in actors])
        start = time.perf_counter()
        bucket = BUCKET_BYTES if variant.endswith("bucketed") else 1
        pub = sender.push.remote(variant, bucket)
        ray.get([pub, *[r.receive.remote(variant, pub if variant.startswith("object") else None, bucket)
                        for r in receivers]])
        seconds = time.perf_counter() - start
        extra = ray.get([a.extra_mb.remote() for a in actors])
        memory[variant] = {"sender_extra_mb": round(extra[0], 1), "receiver_extra_mb": round(max(extra[1:]), 1),
                           "largest_bucket_mb": round(largest[variant] / 2**20, 1),
                           "receiver_extra_buckets": round(max(extra[1:]) * 2**20 / largest[variant], 2)}
        return seconds

    def best(fn) -> float:
        fn()  # warm-up: first touches, connection set-up
        return min(fn() for _ in range(repeats))

    memory: dict[str, dict] = {}
    flat = ray.get(sender.build_flat.remote())
    out = {"model": model, "mb": round(nbytes / 2**20), "floor_raw_broadcast_s":
           best(lambda: _timed(lambda: ray.get([sender.raw.remote(), *[r.receive_raw.remote(flat) for r in receivers]])))}
    ray.get(sender.build_flat.remote(False))
    for variant in VARIANTS:
        out[f"{variant}_s"] = best(lambda v=variant: push(v))
        print(f"[weight_sync] {model}: {variant} {out[f'{variant}_s']:.3f}s "
              f"({out[f'{variant}_s'] / out['floor_raw_broadcast_s']:.2f}× floor), {memory[variant]}", flush=True)
    sums = ray.get([a.state_sum.remote() for a in [sender, *receivers]])
    assert len(set(sums)) == 1, f"the receivers do not hold the sender's weights: {sums}"
    for a in [sender, *receivers]:
        ray.kill(a)
    out = {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}
    out["bucketed_over_per_tensor"] = {t: round(out[f"{t}_streamed_per_tensor_s"] / out[f"{t}_streamed_bucketed_s"], 2)
                                       for t in ("collective", "object_store")}  # ≥ 1: bucketed is as fast or faster
    out["memory"] = memory
    return out


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="16 and 64 MB only")
    parser.add_argument("--models", help="comma-separated, e.g. 64mb,qwen2-0.5b-bf16 (default: by --quick)")
    args = parser.parse_args(argv)
    models = (args.models.split(",") if args.models else ["16mb", "64mb"] if args.quick
              else ["64mb", "512mb", "qwen2-0.5b-bf16", "qwen2-0.5b-fp32"])
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False,
             object_store_memory=10 << 30)  # a 2 GB model: a version in flight and one being freed
    t0 = time.perf_counter()
    try:
        results = [measure(m, repeats=3 if m in ("16mb", "64mb") else 2) for m in models]
    finally:
        ray.shutdown()
    out = {"benchmark": "weight_sync", "command": "python -m benchmarks.weight_sync" + (" --quick" if args.quick else ""),
           "machine": f"{platform.machine()}, {os.cpu_count()} cores", "receivers": RECEIVERS,
           "bucket_mb": BUCKET_BYTES >> 20, "results": results, "seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
