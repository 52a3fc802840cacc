"""The async schedule's bounds, on the session's Ray cluster: `train.max_policy_lag` and `eval.every_seconds`.

Exact claims, not timing ones: with max_policy_lag = 0 the async loop trains exactly the rows the sync loop trains;
with 1, every step trains fresh rows generated exactly one version before the weights it starts from, whatever the
relative speed of generator and learner (docs/architecture.md, "The driver")."""

import json

import pytest

from selfplay.demo import demo_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def run(out, mode, warm_policy_dir, *extra):
    from actors.driver import Driver

    cfg = demo_config("sppo", mode, quick=True, extra=[f"model.policy={warm_policy_dir}", "train.steps=8",
                                                       "resources.generator_cpus=0.25", *extra])
    summary = Driver(cfg, out, log=print).run()
    return cfg, summary, [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_async_with_lag_0_trains_what_sync_trains(ray_cluster, tmp_path, warm_policy_dir):
    """Lag 0: generation waits for the newest weights and the learner for the rows they made: the sync schedule,
    driven by the async loop. Same seeds, same rows, same versions → the same losses."""
    _, sync, sync_records = run(tmp_path / "sync", "sync", warm_policy_dir)
    _, lag0, lag0_records = run(tmp_path / "lag0", "async", warm_policy_dir, "train.max_policy_lag=0",
                                "replay.capacity=64")  # the sync demo's window, not the async demo's round
    assert [r["trained_version_lag_max"] for r in lag0_records] == [r["trained_version_lag_max"] for r in sync_records]
    assert lag0["rows_added"] == sync["rows_added"]
    assert [r["loss"] for r in lag0_records] == pytest.approx([r["loss"] for r in sync_records], rel=1e-5)
    assert lag0["winrate_vs_initial"] == pytest.approx(sync["winrate_vs_initial"], abs=0.02)


def test_async_with_lag_1_trains_fresh_rows_one_version_late(ray_cluster, tmp_path, warm_policy_dir):
    """Lag 1, each row trained once, oldest first: step n trains rows generated with θ_{n-1} (the round θ_n
    generates meanwhile is step n+1's); no round is generated before the weights it should use. A round that ties
    leave short is topped up by one more request, whose leftover rows would be trained a version later, behind the
    next round: `replay.max_staleness: 1` drops them instead, so every step trains rows exactly one version old.
    The policy is also kept after every step (eval.every_seconds) and at step 4 (eval.every), and evaluated
    afterwards on the generator. Keeping it blocks the driver while the learners run the step queued behind, so
    the driver often sees that step end before the weights published ahead of it: the round those weights serve
    must still go out before the next version's loads. And a top-up waits until the waiting step's own round is
    stored, so that its rows never go ahead of that round's. (Each fault was caught by a CI run: steps trained on rows
    of their own version.)
    (Overlap itself: tests/test_pipeline.py::test_async_overlaps_generation_and_training.)"""
    cfg, summary, records = run(tmp_path / "lag1", "async", warm_policy_dir, "train.max_policy_lag=1",
                                "replay.max_reuse=1", "replay.sampling=fifo_oldest", "replay.max_staleness=1",
                                "eval.every_seconds=0.001", "eval.every=4")
    steps = cfg.train.steps
    assert [r["trained_version_lag_max"] for r in records] == [0] + [1] * (steps - 1)
    assert all(r["trained_times_sampled"] == 1 for r in records)
    assert summary["samples_trained"] == steps * cfg.train.batch_size
    # one round per step and the round of the step after the last, plus one request each time ties or dropped
    # rows left the buffer short of a batch; a round's rows <= its prompts
    round_size = cfg.generation.prompts_per_request
    rounds = summary["samples_generated"] // (round_size * cfg.sppo.k)
    assert rounds <= steps + 1 + summary["skipped_ties"] + summary["samples_dropped_stale"]
    assert summary["rows_added"] <= rounds * round_size
    timed = summary["timed_evals"]
    assert len(timed) >= 2 and [e["seconds"] for e in timed] == sorted(e["seconds"] for e in timed)
    assert timed[-1]["seconds"] == summary["loop_seconds"] and timed[-1]["step"] == steps
    assert timed[-1]["winrate_vs_initial"] == summary["winrate_vs_initial"]
    assert all(0 <= e["winrate_vs_initial"] <= 1 and 0 < e["step"] <= steps for e in timed)
    assert [e["step"] for e in summary["evals"]] == [4, steps]


def test_max_seconds_stops_the_loop_after_the_step_in_progress(ray_cluster, tmp_path, warm_policy_dir):
    """train.max_seconds: no step starts once the loop's time is up, but at least one is trained, and the run ends
    as a full one (final checkpoint, evaluation, summary). A limit that is up before step 1 ends stops it at 1."""
    cfg, summary, records = run(tmp_path / "budget", "async", warm_policy_dir, "train.max_seconds=0.001")
    assert summary["learner_steps"] == 1 and [r["step"] for r in records] == [1]
    assert [e["step"] for e in summary["evals"]] == [1] and 0 <= summary["winrate_vs_initial"] <= 1
    assert (tmp_path / "budget" / "checkpoints" / "step_1").is_dir()
