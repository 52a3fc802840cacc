"""The in-process replay shard (selfplay.buffer): schema, FIFO, sampling, staleness, Parquet."""

import numpy as np
import pyarrow as pa
import pytest

from selfplay.buffer import SCHEMA, ReplaySchemaError, ReplayShard, allocate, shard_of, to_table


def make_rows(n, start=0, version=0, prefix="p"):
    return [
        {
            "prompt_id": f"{prefix}{start + i}",
            "prompt": f"prompt {start + i}",
            "chosen": "good",
            "rejected": "bad",
            "score_chosen": 1.0,
            "score_rejected": 0.0,
            "p_chosen": 0.8,
            "p_rejected": 0.2,
            "policy_version": version,
            "algorithm": "sppo",
        }
        for i in range(n)
    ]


def ids(table):
    return table.column("prompt_id").to_pylist()


def test_to_table_fills_defaults_and_matches_schema():
    t = to_table(make_rows(3))
    assert t.schema.equals(SCHEMA) and t.num_rows == 3
    assert t.column("times_sampled").to_pylist() == [0, 0, 0]
    assert t.column("chosen_prev").null_count == 3 and t.column("created_at").null_count == 0


@pytest.mark.parametrize(
    "mutate, column",
    [
        (lambda r: r.pop("chosen"), "chosen"),
        (lambda r: r.update(score_chosen="high"), "score_chosen"),
        (lambda r: r.update(policy_version=None), "policy_version"),
        (lambda r: r.update(extra_field=1), "extra_field"),
        (lambda r: r.update(times_sampled=-1), "times_sampled"),
    ],
)
def test_bad_rows_are_refused_naming_the_column_and_change_nothing(mutate, column):
    shard = ReplayShard(capacity=10)
    shard.add(make_rows(2))
    rows = make_rows(2, start=2)
    mutate(rows[1])
    with pytest.raises(ReplaySchemaError, match=column):
        shard.add(rows)
    assert ids(shard.rows()) == ["p0", "p1"] and shard.stats()["added"] == 2


def test_arrow_table_with_wrong_type_is_refused():
    t = to_table(make_rows(2)).set_column(4, "score_chosen", pa.array(["a", "b"]))
    with pytest.raises(ReplaySchemaError, match="score_chosen"):
        ReplayShard(5).add(t)


def test_fifo_eviction_keeps_newest_in_order():
    shard = ReplayShard(capacity=5)
    for start in range(0, 12, 3):
        shard.add(make_rows(3, start))
    assert ids(shard.rows()) == ["p7", "p8", "p9", "p10", "p11"]
    assert shard.stats() == {"size": 5, "capacity": 5, "added": 12, "evicted": 7, "dropped_stale": 0, "sampled": 0,
                              "retired": 0}


def test_fifo_recent_returns_newest_rows():
    shard = ReplayShard(capacity=100)
    shard.add(make_rows(10))
    assert ids(shard.sample(3, "fifo_recent")) == ["p7", "p8", "p9"]


def test_fifo_oldest_with_max_reuse_1_is_a_queue():
    shard = ReplayShard(capacity=100, max_reuse=1)
    shard.add(make_rows(5))
    assert ids(shard.sample(3, "fifo_oldest")) == ["p0", "p1", "p2"]
    shard.add(make_rows(2, start=5))
    assert ids(shard.sample(3, "fifo_oldest")) == ["p3", "p4", "p5"]
    assert ids(shard.rows()) == ["p6"] and shard.stats()["retired"] == 6


def test_uniform_sampling_is_uniform_and_counts_samples():
    shard = ReplayShard(capacity=100, seed=1)
    shard.add(make_rows(10))
    got = shard.sample(20000, "uniform", replace=True)
    counts = np.bincount([int(i[1:]) for i in ids(got)], minlength=10)
    chi2 = ((counts - 2000) ** 2 / 2000).sum()
    assert chi2 < 27.9  # 9 degrees of freedom, p ≈ 0.001
    assert shard.rows().column("times_sampled").to_numpy().sum() == 20000
    assert shard.stats()["sampled"] == 20000


def test_without_replacement_returns_distinct_rows():
    shard = ReplayShard(capacity=100, seed=2)
    shard.add(make_rows(10))
    got = ids(shard.sample(8, "uniform"))
    assert len(got) == len(set(got)) == 8
    assert len(shard.sample(50, "uniform")) == 10  # never more rows than exist


def test_max_reuse_retires_rows_so_each_is_trained_on_at_most_that_often():
    shard = ReplayShard(capacity=100, seed=0, max_reuse=2)
    shard.add(make_rows(10))
    seen = ids(shard.sample(6)) + ids(shard.sample(6)) + ids(shard.sample(6)) + ids(shard.sample(6))
    assert max(seen.count(i) for i in set(seen)) <= 2 and len(seen) == 20  # the last call gets the 2 left
    assert len(shard) == 0 and shard.stats()["retired"] == 10 and shard.stats()["sampled"] == 20
    with pytest.raises(ValueError, match="max_reuse must be >= 1"):
        ReplayShard(capacity=10, max_reuse=0)


def test_least_sampled_weights_follow_inverse_counts():
    shard = ReplayShard(capacity=10, seed=3)
    rows = make_rows(2)
    rows[0]["times_sampled"], rows[1]["times_sampled"] = 0, 3  # weights 1 and 1/4 → 0.8 / 0.2
    shard.add(rows)
    got = ids(shard.sample(20000, "least_sampled", replace=True))
    share = got.count("p0") / len(got)
    assert share == pytest.approx(0.8, abs=0.015)
    # counters moved: the returned times_sampled is the new count
    assert shard.rows().column("times_sampled").to_pylist() == [got.count("p0"), 3 + got.count("p1")]


def test_least_sampled_spreads_samples_over_rows():
    shard = ReplayShard(capacity=100, seed=4)
    shard.add(make_rows(20))
    for _ in range(50):
        shard.sample(4, "least_sampled")
    times = shard.rows().column("times_sampled").to_numpy()
    uniform = ReplayShard(capacity=100, seed=4)
    uniform.add(make_rows(20))
    for _ in range(50):
        uniform.sample(4, "uniform")
    assert times.sum() == 200 and times.std() < uniform.rows().column("times_sampled").to_numpy().std()


def test_staleness_drops_are_counted():
    shard = ReplayShard(capacity=100)
    for v in range(5):
        shard.add(make_rows(2, start=2 * v, version=v))
    got = shard.sample(100, "uniform", current_version=4, max_staleness=1)
    assert sorted(set(got.column("policy_version").to_pylist())) == [3, 4]
    assert shard.stats()["dropped_stale"] == 6 and len(shard) == 4
    shard.sample(1, current_version=10, max_staleness=None)  # None keeps everything
    assert len(shard) == 4


def test_snapshot_restore_roundtrip_exact(tmp_path):
    shard = ReplayShard(capacity=6, seed=5)
    shard.add(make_rows(4))
    shard.add(make_rows(4, start=4, version=1))
    shard.sample(5, "least_sampled", replace=True)
    shard.drop_stale(current_version=3, max_staleness=1)
    path = shard.snapshot(tmp_path / "s.parquet")
    back = ReplayShard.restore(path)
    assert back.rows().equals(shard.rows())
    assert back.stats() == shard.stats()
    assert not (tmp_path / "s.parquet.tmp").exists()


def test_shard_of_is_stable_and_balanced():
    keys = [f"prompt-{i}" for i in range(4000)]
    owner = shard_of(keys, 4)
    assert (owner == shard_of(keys, 4)).all()
    assert np.bincount(owner, minlength=4).min() > 800


def test_allocate_respects_sizes_without_replacement():
    rng = np.random.default_rng(0)
    for _ in range(100):
        counts = allocate(10, sizes=[2, 3, 20], masses=[1, 1, 50], replace=False, rng=rng)
        assert counts.sum() == 10 and (counts <= [2, 3, 20]).all()
    assert allocate(100, [2, 3], [2, 3], replace=False, rng=rng).tolist() == [2, 3]
    assert allocate(7, [1, 0], [1, 0], replace=True, rng=rng).tolist() == [7, 0]
