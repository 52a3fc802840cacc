"""Weight-sync latency vs model size: object store vs collective broadcast, bucketed vs per-tensor, and the
ratio to one raw broadcast of a flat buffer of the same bytes (the floor: no packing, no checksums).

One sender actor (learner rank 0's role) and two receiver actors (generators' role) run the real code paths:
`pack_buckets` → transport → `unpack_buckets` (checksums, manifest) → copy into the receiver's parameters.
Latency = publish start → every receiver has applied the update.

    python -m benchmarks.weight_sync            # 1, 16, 100, 400 MB
    python -m benchmarks.weight_sync --quick    # 1, 16, 64 MB
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import ray
import torch

from actors.weight_sync import BroadcastChannel
from selfplay.weights import pack_buckets, unpack_buckets

TENSOR_BYTES = 1 << 20  # 1 MB tensors: a 400 MB model has 400 of them (a 7B model has ~300 of ~50 MB)
RECEIVERS = 2


def make_state(mb: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(mb)
    return {f"layer{i}.weight": torch.randn(TENSOR_BYTES // 4, generator=g) for i in range(mb)}


@ray.remote
class Sender:
    def __init__(self, mb: int):
        self.state = make_state(mb)
        # the floor's flat buffer exists before timing starts: it measures the wire, not a copy
        self.flat = torch.cat([t.view(-1) for t in self.state.values()]).view(torch.uint8)

    def address(self):
        import socket

        with socket.socket() as s:
            s.bind(("", 0))
            return ray.util.get_node_ip_address(), s.getsockname()[1]

    def open_channel(self, host, port, size):
        self.channel = BroadcastChannel(host, port, 0, size, name=f"bench{port}")
        return True

    def publish(self, bucket_bytes):
        packed = pack_buckets(self.state, bucket_bytes)
        return {"manifest": packed.manifest, "checksums": packed.checksums,
                "buckets": [ray.put(b) for b in packed.buckets]}

    def broadcast(self, bucket_bytes):
        self.channel.send(1, pack_buckets(self.state, bucket_bytes))
        return True

    def broadcast_raw(self):
        self.channel._broadcast(torch.tensor([self.flat.numel()], dtype=torch.int64))
        self.channel._broadcast(self.flat)
        return True


@ray.remote
class Receiver:
    def __init__(self, mb: int):
        self.params = {k: torch.zeros_like(v) for k, v in make_state(mb).items()}
        self.specs = {k: (tuple(v.shape), v.dtype) for k, v in self.params.items()}

    def open_channel(self, host, port, rank, size):
        self.channel = BroadcastChannel(host, port, rank, size, name=f"bench{port}")
        return True

    def _apply(self, buckets, manifest, checksums):
        for name, t in unpack_buckets(buckets, manifest, checksums, self.specs).items():
            self.params[name].copy_(t)
        return True

    def load(self, refs, manifest, checksums):
        return self._apply(ray.get(refs), manifest, checksums)

    def receive(self):
        _, buckets, manifest, checksums = self.channel.receive()
        return self._apply(buckets, manifest, checksums)

    def receive_raw(self):
        n = int(self.channel._broadcast(torch.zeros(1, dtype=torch.int64)).item())
        self.channel._broadcast(torch.empty(n, dtype=torch.uint8))
        return True


def timed(fn, repeats: int) -> float:
    fn()  # warm-up: first touches, connection set-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure(mb: int, repeats: int) -> dict:
    sender = Sender.options(num_cpus=0.1).remote(mb)
    receivers = [Receiver.options(num_cpus=0.1).remote(mb) for _ in range(RECEIVERS)]
    host, port = ray.get(sender.address.remote())
    size = 1 + RECEIVERS
    ray.get([sender.open_channel.remote(host, port, size)]
            + [r.open_channel.remote(host, port, i + 1, size) for i, r in enumerate(receivers)])

    def object_store(bucket_bytes):
        pub = ray.get(sender.publish.remote(bucket_bytes))
        ray.get([r.load.remote(pub["buckets"], pub["manifest"], pub["checksums"]) for r in receivers])

    def collective(bucket_bytes):
        ray.get([sender.broadcast.remote(bucket_bytes)] + [r.receive.remote() for r in receivers])

    def raw():
        ray.get([sender.broadcast_raw.remote()] + [r.receive_raw.remote() for r in receivers])

    out = {"mb": mb, "floor_raw_broadcast_s": timed(raw, repeats)}
    for name, fn in (("object_store", object_store), ("collective", collective)):
        for label, bucket in (("bucketed", 64 << 20), ("per_tensor", 1)):
            out[f"{name}_{label}_s"] = timed(lambda f=fn, b=bucket: f(b), repeats)
    for key in [k for k in out if k.endswith("_s") and not k.startswith("floor")]:
        out[key[: -len("_s")] + "_ratio_to_floor"] = out[key] / out["floor_raw_broadcast_s"]
    for a in [sender, *receivers]:
        ray.kill(a)
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1, 16 and 64 MB only")
    args = parser.parse_args(argv)
    sizes = [1, 16, 64] if args.quick else [1, 16, 100, 400]
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    t0 = time.perf_counter()
    try:
        results = [measure(mb, repeats=3 if mb <= 100 else 2) for mb in sizes]
    finally:
        ray.shutdown()
    out = {"benchmark": "weight_sync", "command": "python -m benchmarks.weight_sync" + (" --quick" if args.quick else ""),
           "machine": f"{platform.machine()}, {os.cpu_count()} cores", "receivers": RECEIVERS,
           "results": results, "seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
