"""The weight transport format (selfplay.weights): planned from specs alone, aligned, verified per bucket."""

import pytest
import torch

from selfplay.weights import (
    MIN_BUCKETS,
    WeightSyncError,
    bucket_sizes,
    check_manifest,
    checksum,
    pack_buckets,
    plan_buckets,
    unpack_buckets,
)


def odd_state():
    g = torch.Generator().manual_seed(0)
    return {"a": torch.randn(3, 5, generator=g).to(torch.bfloat16), "mask": torch.tensor([True, False, True]),
            "b": torch.randn(1000, generator=g), "step": torch.tensor(7, dtype=torch.int64),
            "c": torch.randn(33, generator=g).half()}


def test_a_plan_needs_only_specs_and_round_trips_every_dtype_bit_for_bit():
    state = odd_state()
    specs = {n: (tuple(t.shape), t.dtype) for n, t in state.items()}
    manifest = plan_buckets(specs, bucket_bytes=1 << 20)
    assert all(m["offset"] % 8 == 0 for m in manifest) and all(n % 8 == 0 for n in bucket_sizes(manifest))
    packed = pack_buckets(state, bucket_bytes=1 << 20)
    assert packed.manifest == manifest  # the sender announces what it will fill, before gathering anything
    got = unpack_buckets(packed.buckets, packed.manifest, packed.checksums, expected=specs)
    assert all(torch.equal(got[n], state[n]) and got[n].dtype == state[n].dtype for n in state)


def test_a_small_model_still_streams_in_several_buckets_and_a_big_tensor_gets_its_own():
    specs = {f"w{i}": ((1 << 16,), torch.float32) for i in range(16)}  # 4 MiB
    assert len(bucket_sizes(plan_buckets(specs, bucket_bytes=64 << 20))) == MIN_BUCKETS
    big = {"small": ((10,), torch.float32), "embed": ((1 << 20,), torch.float32), "tail": ((10,), torch.float32)}
    assert [m["bucket"] for m in plan_buckets(big, bucket_bytes=1 << 10)] == [0, 1, 2]


def test_the_checksum_catches_a_flipped_byte_and_does_not_depend_on_reduction_order():
    bucket = pack_buckets(odd_state()).buckets[0]
    flipped = bucket.clone()
    flipped[5] ^= 0x01
    assert checksum(flipped) != checksum(bucket)
    words = bucket.view(torch.int64)
    assert checksum(bucket) == int(words.flip(0).sum()) == int(words.reshape(-1, 1).sum(0)[0])  # exact integers


def test_a_manifest_that_lies_about_sizes_or_bounds_is_refused():
    packed = pack_buckets(odd_state())
    bad = [dict(m) for m in packed.manifest]
    bad[0]["nbytes"] += 8
    with pytest.raises(WeightSyncError, match="a: 38 bytes at offset 0"):
        check_manifest(bad)
    with pytest.raises(WeightSyncError, match="beyond bucket 0"):
        check_manifest(packed.manifest, sizes=[16])
