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


def test_a_receiver_that_refuses_an_update_unread_still_keeps_the_broadcast_group_in_step():
    """A generator that refuses the manifest draws no bucket: the sender must still finish, and the next version
    must arrive whole (gloo, two ranks in threads of this process)."""
    import socket
    import threading

    from actors.weight_sync import BroadcastChannel

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    packed = pack_buckets(odd_state(), bucket_bytes=64)
    assert len(packed.buckets) >= 3
    channels = {}

    def join(rank):
        channels[rank] = BroadcastChannel("127.0.0.1", port, rank, 2, name="refuse", timeout_s=30)

    joining = [threading.Thread(target=join, args=(r,)) for r in (0, 1)]
    for t in joining:
        t.start()
    for t in joining:
        t.join(30)

    def send_twice():
        for version in (1, 2):
            channels[0].send(version, packed.manifest, iter(packed.buckets))

    sender = threading.Thread(target=send_twice)
    sender.start()
    version, manifest, sizes, buckets = channels[1].receive()
    assert version == 1 and manifest == packed.manifest
    buckets.close()  # refused unread: the stream receives and drops every bucket
    version, _, _, buckets = channels[1].receive()
    got = list(buckets)
    sender.join(30)
    assert not sender.is_alive() and version == 2
    assert [torch.equal(a, b) for a, b in zip(got, packed.buckets)] == [True] * len(packed.buckets)
