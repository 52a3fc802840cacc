"""Weight transport format: full parameters packed into a few large byte buckets with a manifest and checksums.

The learner packs (`pack_buckets`), the transport moves the buckets (object store or a broadcast), and the
generator verifies and unpacks (`unpack_buckets`) before it applies anything: a corrupted bucket or a manifest
that does not match the model is refused whole, so a generator never serves a mix of two versions.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

import torch

DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64,
                               torch.int32, torch.uint8, torch.bool)}


class WeightSyncError(RuntimeError):
    """A weight update that must not be applied; the message says which tensor or bucket is wrong."""


@dataclass
class Packed:
    buckets: list[torch.Tensor]  # 1-D uint8
    manifest: list[dict]  # name, shape, dtype, bucket, offset, nbytes — in parameter order
    checksums: list[int]  # crc32 per bucket

    @property
    def nbytes(self) -> int:
        return sum(b.numel() for b in self.buckets)


def _bytes_of(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def checksum(bucket: torch.Tensor) -> int:
    return zlib.crc32(bucket.numpy().data)


def pack_buckets(state: Mapping[str, torch.Tensor], bucket_bytes: int = 64 << 20) -> Packed:
    """Pack CPU tensors into buckets of about `bucket_bytes` (a tensor larger than that gets a bucket of its own)."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    groups: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    for name, t in state.items():
        n = t.numel() * t.element_size()
        if groups[-1] and size + n > bucket_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, t))
        size += n
    buckets, manifest = [], []
    for b, group in enumerate(g for g in groups if g):
        offset = 0
        for name, t in group:
            n = t.numel() * t.element_size()
            manifest.append({"name": name, "shape": list(t.shape), "dtype": str(t.dtype), "bucket": b,
                             "offset": offset, "nbytes": n})
            offset += n
        buckets.append(torch.cat([_bytes_of(t.cpu()) for _, t in group]) if group else torch.empty(0, dtype=torch.uint8))
    return Packed(buckets, manifest, [checksum(b) for b in buckets])


def unpack_buckets(
    buckets: list[torch.Tensor],
    manifest: list[dict],
    checksums: list[int],
    expected: Mapping[str, tuple[tuple[int, ...], torch.dtype]] | None = None,
) -> dict[str, torch.Tensor]:
    """Verify checksums and (when `expected` = {name: (shape, dtype)} of the receiving model is given) that the
    manifest names exactly the model's tensors with the same shapes and dtypes; then return the tensors."""
    if len(buckets) != len(checksums):
        raise WeightSyncError(f"{len(buckets)} buckets but {len(checksums)} checksums")
    for i, (b, c) in enumerate(zip(buckets, checksums)):
        if checksum(b) != c:
            raise WeightSyncError(f"bucket {i}: checksum mismatch (corrupted in transit); update refused")
    if expected is not None:
        names = {m["name"] for m in manifest}
        missing, extra = sorted(set(expected) - names), sorted(names - set(expected))
        if missing or extra:
            raise WeightSyncError(f"manifest does not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
    out = {}
    for m in manifest:
        dtype = DTYPES.get(m["dtype"])
        if dtype is None:
            raise WeightSyncError(f"{m['name']}: unsupported dtype {m['dtype']}")
        shape = tuple(m["shape"])
        if expected is not None and (tuple(expected[m["name"]][0]), expected[m["name"]][1]) != (shape, dtype):
            want = expected[m["name"]]
            raise WeightSyncError(f"{m['name']}: manifest says {shape} {dtype}, model has {tuple(want[0])} {want[1]}")
        bucket = buckets[m["bucket"]]
        if m["offset"] + m["nbytes"] > bucket.numel():
            raise WeightSyncError(f"{m['name']}: bytes {m['offset']}..{m['offset'] + m['nbytes']} beyond bucket {m['bucket']}")
        raw = bucket[m["offset"] : m["offset"] + m["nbytes"]]
        out[m["name"]] = raw.view(dtype).reshape(shape)
    return out


SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                      torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}


def write_safetensors(path, specs: list[tuple[str, tuple[int, ...], torch.dtype]], tensors) -> int:
    """Write a .safetensors file tensor by tensor: the header comes from `specs` (name, shape, dtype), then each
    tensor of the iterator `tensors` (same order) is written as it arrives, so the writer holds one tensor at a
    time, never the whole model (a 7B model is 14.5 GB in bf16). Returns the bytes written. Readable by
    `safetensors.torch.load_file` and by transformers."""
    import json
    import struct

    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, dtype in specs:
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        for (name, shape, dtype), tensor in zip(specs, tensors, strict=True):
            if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                raise ValueError(f"{name}: got {tuple(tensor.shape)} {tensor.dtype}, the header says {shape} {dtype}")
            f.write(_bytes_of(tensor.to("cpu")).numpy().tobytes())
    return 8 + len(encoded) + offset
