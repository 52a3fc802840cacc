"""The time-to-quality benchmark's arithmetic, on made-up runs (the runs themselves: benchmarks.time_to_quality)."""

import pytest

from benchmarks.time_to_quality import at, first_reach, interpolated_reach, line_at, mean_se, summarize


def run(mode, seed, final, seconds, curve, busy_generator, busy_learner, steps=300, at_steps=None):
    return {"mode": mode, "seed": seed, "winrate": final, "loop_seconds": seconds, "curve": curve,
            "busy_generator_seconds": busy_generator, "busy_learner_seconds": busy_learner, "steps": steps,
            "winrate_at_sync_steps": final if at_steps is None and mode == "sync" else at_steps}


def test_async_time_to_sync_final_and_the_busiest_stage_bound():
    runs = [
        run("sync", 0, 0.70, 400.0, [[100, 0.6], [300, 0.71], [400, 0.70]], 240.0, 130.0),
        run("async", 0, 0.72, 260.0, [[100, 0.65], [200, 0.70], [260, 0.72]], 250.0, 140.0, steps=390, at_steps=0.71),
        run("sync", 1, 0.66, 420.0, [[200, 0.62], [420, 0.66]], 260.0, 120.0),
        run("async", 1, 0.62, 270.0, [[200, 0.60], [270, 0.62]], 260.0, 130.0, steps=540, at_steps=0.61),  # < 0.66
    ]
    s = summarize(runs)
    assert s["sync_final"] == pytest.approx(0.68) and s["async_final"] == pytest.approx(0.67)
    assert s["sync_final_se"] == pytest.approx(0.02) and s["async_final_se"] == pytest.approx(0.05)
    assert s["sync_seconds"] == 410.0 and s["async_seconds"] == 265.0
    assert s["async_seconds_to_sync_final"] == [200, None]  # seed 0 reaches its sync final 0.70 at 200 s
    assert s["sync_seconds_to_sync_final"] == [300, 420]
    assert s["async_reached_sync_final"] == "1/2 seeds"
    # the mean async curve: (0.65+0.5)/2 at 100 s, (0.70+0.60)/2 = 0.65 at 200 s, 0.67 at 260 s and 270 s: it
    # never reaches the mean sync final 0.68
    assert s["async_seconds_to_mean_sync_final"] is None and s["async_time_ratio"] is None
    assert s["async_time_ratio_interpolated"] is None
    # steps per second: sync 300/400 and 300/420, async 390/260 and 540/270 → (1.5 + 2.0) / 2 over 0.7321
    assert s["async_speedup"] == round(1.75 / ((300 / 400 + 300 / 420) / 2), 3)
    assert s["async_at_sync_steps"] == pytest.approx(0.66) and s["async_at_sync_steps_se"] == pytest.approx(0.05)
    assert s["ideal_overlap_ratio"] == round((240 / 400 + 260 / 420) / 2, 3)


def test_the_mean_async_curve_reaching_the_mean_sync_final_gives_the_ratio():
    runs = [run("sync", 0, 0.70, 400.0, [[400, 0.70]], 240.0, 130.0),
            run("async", 0, 0.72, 260.0, [[100, 0.66], [200, 0.71], [260, 0.72]], 250.0, 140.0),
            run("sync", 1, 0.66, 400.0, [[400, 0.66]], 260.0, 120.0),
            run("async", 1, 0.70, 270.0, [[110, 0.62], [210, 0.69], [270, 0.70]], 260.0, 130.0)]
    s = summarize(runs)  # mean async: 0.58 at 100 s, 0.64 at 110 s, 0.665 at 200 s, 0.70 at 210 s ≥ 0.68
    assert s["async_seconds_to_mean_sync_final"] == 210 and s["async_time_ratio"] == round(210 / 400, 3)
    # each seed's curve joined by lines: at 110 s (0.665 + 0.62) / 2 = 0.6425, at 200 s (0.71 + 0.683) / 2 = 0.6965;
    # the mean passes 0.68 in between, 0.0375 / 0.054 of the way
    assert s["async_time_ratio_interpolated"] == round((110 + 90 * 0.0375 / 0.054) / 400, 3)


def test_curve_lookups_and_one_seed_has_no_spread():
    curve = [[10.0, 0.55], [20.0, 0.6]]
    assert at(curve, 5.0) == 0.5 and at(curve, 10.0) == 0.55 and at(curve, 25.0) == 0.6
    assert first_reach(curve, 0.58) == 20.0 and first_reach(curve, 0.7) is None
    # from (0 s, 0.5): 0.525 halfway to the first kept policy; 0.58 three fifths of the way from 10 s to 20 s
    assert line_at(curve, 5.0) == pytest.approx(0.525) and line_at(curve, 16.0) == pytest.approx(0.58)
    assert line_at(curve, 25.0) == 0.6 and line_at([[10.0, 0.55], [10.0, 0.57]], 10.0) == 0.55
    assert interpolated_reach(curve, 0.525) == pytest.approx(5.0) and interpolated_reach(curve, 0.58) == pytest.approx(16.0)
    assert interpolated_reach(curve, 0.7) is None and interpolated_reach(curve, 0.4) == 0.0
    assert mean_se([0.6]) == (0.6, None)
