"""ReplayShardActor / ReplayBuffer on a real local Ray cluster."""

import numpy as np
import pytest

from selfplay.buffer import ReplaySchemaError, shard_of
from tests.test_buffer import ids, make_rows

pytestmark = pytest.mark.ray


@pytest.fixture
def buffer_factory(ray_cluster):
    from actors.replay import ReplayBuffer

    made = []

    def make(*args, **kwargs):
        kwargs.setdefault("num_cpus", 0.1)
        buf = ReplayBuffer(*args, **kwargs)
        made.append(buf)
        return buf

    yield make
    for buf in made:
        buf.shutdown()


def test_rows_route_by_prompt_id_and_fifo_per_shard(buffer_factory):
    buf = buffer_factory(num_shards=4, capacity=400)
    rows = make_rows(200)
    assert buf.add(rows) == 200
    per = buf.shard_stats()
    assert [s["size"] for s in per] == np.bincount(shard_of([r["prompt_id"] for r in rows], 4), minlength=4).tolist()
    assert buf.stats()["size"] == 200 and buf.stats()["capacity"] == 400
    # FIFO capacity across shards: each shard keeps its newest 100
    buf.add(make_rows(400, start=200))
    stats = buf.stats()
    assert stats["size"] <= 400 and stats["evicted"] == 600 - stats["size"]
    kept = set(ids(buf.rows()))
    assert not kept & {f"p{i}" for i in range(100)}  # the oldest rows went first


def test_sampling_across_shards_is_proportional_to_size(buffer_factory):
    buf = buffer_factory(num_shards=4, capacity=10_000, seed=3)
    buf.add(make_rows(400))
    owner = dict(zip([f"p{i}" for i in range(400)], shard_of([f"p{i}" for i in range(400)], 4)))
    sizes = np.bincount(list(owner.values()), minlength=4)
    got = ids(buf.sample(20_000, replace=True))
    counts = np.bincount([owner[i] for i in got], minlength=4)
    expected = 20_000 * sizes / sizes.sum()
    assert (((counts - expected) ** 2) / expected).sum() < 16.3  # 3 dof, p ≈ 0.001
    assert buf.stats()["sampled"] == 20_000
    distinct = ids(buf.sample(300))
    assert len(distinct) == len(set(distinct)) == 300


def test_least_sampled_across_shards_prefers_fresh_rows(buffer_factory):
    buf = buffer_factory(num_shards=2, capacity=1000, sampling="least_sampled", seed=1)
    old = make_rows(50, prefix="old")
    for r in old:
        r["times_sampled"] = 9  # weight 1/10
    buf.add(old)
    buf.add(make_rows(50, prefix="new"))  # weight 1
    got = ids(buf.sample(11_000, replace=True))
    share_new = sum(i.startswith("new") for i in got) / len(got)
    assert share_new == pytest.approx(10 / 11, abs=0.01)


def test_staleness_is_enforced_and_counted(buffer_factory):
    buf = buffer_factory(num_shards=3, capacity=1000, max_staleness=2)
    for v in range(6):
        buf.add(make_rows(30, start=30 * v, version=v))
    got = buf.sample(1000, current_version=5)
    assert set(got.column("policy_version").to_pylist()) == {3, 4, 5}
    stats = buf.stats()
    assert stats["dropped_stale"] == 90 and stats["size"] == 90


def test_bad_rows_change_no_shard(buffer_factory):
    buf = buffer_factory(num_shards=2, capacity=100)
    buf.add(make_rows(10))
    bad = make_rows(10, start=10)
    bad[7]["p_chosen"] = "likely"
    with pytest.raises(ReplaySchemaError, match="p_chosen"):
        buf.add(bad)
    assert buf.stats()["size"] == 10 and buf.stats()["added"] == 10


def test_snapshot_restore_same_and_different_shard_counts(buffer_factory, tmp_path):
    buf = buffer_factory(num_shards=4, capacity=80, seed=2)
    for v in range(3):
        buf.add(make_rows(40, start=40 * v, version=v))
    buf.sample(30, strategy="least_sampled")
    before_rows = buf.rows().sort_by("prompt_id")
    before = buf.stats()
    snap = buf.snapshot(tmp_path / "snap")
    assert (snap / "manifest.json").exists() and len(list(snap.glob("*.parquet"))) == 4

    same = buffer_factory(num_shards=4, capacity=80)
    assert same.restore(snap) == before
    assert same.rows().sort_by("prompt_id").equals(before_rows)

    fewer = buffer_factory(num_shards=2, capacity=80)
    after = fewer.restore(snap)
    assert {k: after[k] for k in ("size", "added", "evicted", "sampled")} == {
        k: before[k] for k in ("size", "added", "evicted", "sampled")
    }
    assert fewer.rows().sort_by("prompt_id").equals(before_rows)  # rows and their sampling counts
    import ray

    for i, shard in enumerate(fewer.shards):  # every row landed on the shard its prompt_id routes to
        assert (shard_of(ids(ray.get(shard.rows.remote())), 2) == i).all()


def test_restore_refuses_incomplete_snapshot(buffer_factory, tmp_path):
    buf = buffer_factory(num_shards=1, capacity=10)
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        buf.restore(tmp_path)


def test_from_config(buffer_factory, ray_cluster):
    from actors.replay import ReplayBuffer
    from selfplay.config import load_config

    cfg = load_config(None, ["resources.replay_shards=2", "replay.capacity=50", "replay.sampling=fifo_recent",
                             "resources.replay_cpus=0.1"])
    buf = ReplayBuffer.from_config(cfg)
    try:
        assert buf.num_shards == 2 and buf.stats()["capacity"] == 50 and buf.sampling == "fifo_recent"
    finally:
        buf.shutdown()
