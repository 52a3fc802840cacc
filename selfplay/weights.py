"""Weight transport format: parameters packed into byte buckets, with a manifest and a checksum per bucket.

The manifest is planned from names, shapes and dtypes alone (`plan_buckets`), so a sender can announce it before
it has gathered anything, then fill and send one bucket at a time (`fill_bucket`) and a receiver can load each
bucket as it arrives (`bucket_tensors`): neither side ever holds more than a couple of buckets beside the model.
A receiver checks the manifest against its model (`check_manifest`) before any tensor moves, and each bucket's
checksum before that bucket's tensors move.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch

DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64,
                               torch.int32, torch.uint8, torch.bool)}
ALIGN = 8  # every tensor starts 8-byte aligned (any dtype views in place) and every bucket is whole 8-byte words
MIN_BUCKETS = 4  # a streamed push overlaps filling, sending and loading only across buckets: never fewer than this

Specs = Mapping[str, tuple[tuple[int, ...], torch.dtype]]


class WeightSyncError(RuntimeError):
    """A weight update that must not be applied; the message says which tensor or bucket is wrong."""


@dataclass
class Packed:
    buckets: list[torch.Tensor]  # 1-D uint8
    manifest: list[dict]  # name, shape, dtype, bucket, offset, nbytes — in parameter order
    checksums: list[int]  # `checksum` per bucket


def _bytes_of(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def tensor_bytes(shape, dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def _bucket_size(entries: list[dict]) -> int:
    """The bytes of a bucket holding `entries`, padded to whole words."""
    return _aligned(max(m["offset"] + m["nbytes"] for m in entries)) if entries else 0


def checksum_tensor(bucket: torch.Tensor) -> torch.Tensor:
    """The bucket's 8-byte words summed modulo 2⁶⁴, as a 1-element int64 tensor on the bucket's device (no host
    sync on a GPU). Exact integer arithmetic, so every reduction order and device agrees; it catches lost and
    flipped bytes, not reordered words (the transports deliver in order). ~13 GB/s on 2 CPU cores, 4× crc32."""
    return bucket.view(torch.int64).sum().reshape(1)


def checksum(bucket: torch.Tensor) -> int:
    return int(checksum_tensor(bucket).item())


def plan_buckets(specs: Specs, bucket_bytes: int = 64 << 20) -> list[dict]:
    """The manifest for `specs` {name: (shape, dtype)} in their order: buckets of about `bucket_bytes`, or of a
    `MIN_BUCKETS`th of the model if that is less (a tensor larger than a bucket gets one of its own), each entry
    {name, shape, dtype, bucket, offset, nbytes}."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    sizes = {name: tensor_bytes(shape, dtype) for name, (shape, dtype) in specs.items()}
    bucket_bytes = min(bucket_bytes, max(1, sum(sizes.values()) // MIN_BUCKETS))
    manifest, bucket, offset = [], 0, 0
    for name, (shape, dtype) in specs.items():
        n = sizes[name]
        if offset and offset + n > bucket_bytes:
            bucket, offset = bucket + 1, 0
        manifest.append({"name": name, "shape": list(shape), "dtype": str(dtype), "bucket": bucket,
                         "offset": offset, "nbytes": n})
        offset = _aligned(offset + n)
    return manifest


def bucket_entries(manifest: list[dict]) -> list[list[dict]]:
    """The manifest's entries, bucket by bucket."""
    buckets: list[list[dict]] = []
    for m in manifest:
        while len(buckets) <= m["bucket"]:
            buckets.append([])
        buckets[m["bucket"]].append(m)
    return buckets


def bucket_sizes(manifest: list[dict]) -> list[int]:
    return [_bucket_size(entries) for entries in bucket_entries(manifest)]


def fill_bucket(entries: list[dict], tensors: Iterable[torch.Tensor], device=None,
                buffer: torch.Tensor | None = None) -> torch.Tensor:
    """One bucket: the bytes of `tensors` (one per entry, on any device) at their offsets, in the front of
    `buffer` (1-D uint8, reused: fresh host memory costs a page fault per 4 KiB) or else in a new tensor on
    `device` (default: the first tensor's)."""
    out = None
    for m, t in zip(entries, tensors, strict=True):
        if out is None:
            size = _bucket_size(entries)
            out = buffer[:size] if buffer is not None else torch.empty(size, dtype=torch.uint8,
                                                                       device=device or t.device)
        end = m["offset"] + m["nbytes"]
        out[m["offset"] : end].copy_(_bytes_of(t))
        out[end : _aligned(end)] = 0  # alignment padding: defined bytes, so a bucket's checksum is reproducible
    return out if out is not None else torch.empty(0, dtype=torch.uint8, device=device)


def pack_buckets(state: Mapping[str, torch.Tensor], bucket_bytes: int = 64 << 20) -> Packed:
    """All of `state` packed at once (tests and tools; the learners fill bucket by bucket)."""
    manifest = plan_buckets({n: (tuple(t.shape), t.dtype) for n, t in state.items()}, bucket_bytes)
    buckets = [fill_bucket(entries, [state[m["name"]] for m in entries], "cpu") for entries in bucket_entries(manifest)]
    return Packed(buckets, manifest, [checksum(b) for b in buckets])


def check_manifest(manifest: list[dict], expected: Specs | None = None, sizes: list[int] | None = None) -> None:
    """Refuse a manifest that does not name exactly the receiving model's tensors `expected` {name: (shape,
    dtype)} with the same shapes and dtypes, or whose entries lie outside their buckets' `sizes`."""
    if expected is not None:
        names = {m["name"] for m in manifest}
        missing, extra = sorted(set(expected) - names), sorted(names - set(expected))
        if missing or extra:
            raise WeightSyncError(f"manifest does not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
    for m in manifest:
        dtype, shape = DTYPES.get(m["dtype"]), tuple(m["shape"])
        if dtype is None:
            raise WeightSyncError(f"{m['name']}: unsupported dtype {m['dtype']}")
        if expected is not None and (tuple(expected[m["name"]][0]), expected[m["name"]][1]) != (shape, dtype):
            want = expected[m["name"]]
            raise WeightSyncError(f"{m['name']}: manifest says {shape} {dtype}, model has {tuple(want[0])} {want[1]}")
        if m["nbytes"] != tensor_bytes(shape, dtype) or m["offset"] % ALIGN:
            raise WeightSyncError(f"{m['name']}: {m['nbytes']} bytes at offset {m['offset']} for {shape} {dtype}")
        if sizes is not None and (m["bucket"] >= len(sizes) or m["offset"] + m["nbytes"] > sizes[m["bucket"]]):
            raise WeightSyncError(f"{m['name']}: bytes {m['offset']}..{m['offset'] + m['nbytes']} beyond bucket "
                                  f"{m['bucket']}")


def bucket_tensors(bucket: torch.Tensor, entries: list[dict]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of one bucket, as views into it (no copy). Entries were checked by `check_manifest`."""
    for m in entries:
        raw = bucket[m["offset"] : m["offset"] + m["nbytes"]]
        yield m["name"], raw.view(DTYPES[m["dtype"]]).reshape(m["shape"])


def verified(index: int, bucket: torch.Tensor, expected_checksum: int) -> torch.Tensor:
    if bucket.numel() % ALIGN or checksum(bucket) != expected_checksum:
        raise WeightSyncError(f"bucket {index}: checksum mismatch (corrupted in transit); update refused")
    return bucket


def unpack_buckets(buckets: list[torch.Tensor], manifest: list[dict], checksums: list[int],
                   expected: Specs | None = None) -> dict[str, torch.Tensor]:
    """Every bucket verified (checksums, and the manifest against `expected`), then all tensors, as views."""
    if len(buckets) != len(checksums):
        raise WeightSyncError(f"{len(buckets)} buckets but {len(checksums)} checksums")
    check_manifest(manifest, expected, [b.numel() for b in buckets])
    entries = bucket_entries(manifest)
    return {name: t for i, (b, c) in enumerate(zip(buckets, checksums))
            for name, t in bucket_tensors(verified(i, b, c), entries[i] if i < len(entries) else [])}


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
        nbytes = tensor_bytes(shape, dtype)
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


def read_safetensors(path, expected: Specs) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of a .safetensors file, read one tensor at a time, once its header names exactly the tensors
    `expected` {name: (shape, dtype)} with their shapes and dtypes (checked now, before the first tensor is read:
    WeightSyncError naming the file and the tensor)."""
    from safetensors import safe_open

    dtypes = {code: dtype for dtype, code in SAFETENSORS_DTYPES.items()}
    f = safe_open(str(path), framework="pt")
    specs = {}
    for name in f.keys():
        info = f.get_slice(name)
        if info.get_dtype() not in dtypes:
            raise WeightSyncError(f"{path}: {name}: unsupported dtype {info.get_dtype()}")
        specs[name] = (tuple(info.get_shape()), dtypes[info.get_dtype()])
    try:
        check_manifest(plan_buckets(specs), expected)
    except WeightSyncError as e:
        raise WeightSyncError(f"{path}: {e}") from None
    return ((name, f.get_tensor(name)) for name in expected)  # in the receiving model's own order
