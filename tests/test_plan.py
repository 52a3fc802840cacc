import pytest

from selfplay.cli import main
from selfplay.plan import Costs, plan, simulate

BALANCED = Costs(gen_seconds=10, rows_per_request=50, train_seconds=4, batch_rows=40, learner_efficiency=1.0)


def test_throughput_is_the_slower_side():
    # 1 generator: 5 rows/s; 1 learner: 10 rows/s → generation bound, learner idle about half the time
    rate, surplus, idle = simulate(BALANCED, generators=1, learners=1, seconds=2000)
    assert rate == pytest.approx(5.0, rel=0.05) and surplus < 0.05 and idle == pytest.approx(0.5, abs=0.05)
    # 4 generators: 20 rows/s against 10 → learner bound, surplus rows, learner always busy
    rate, surplus, idle = simulate(BALANCED, generators=4, learners=1, seconds=2000)
    assert rate == pytest.approx(10.0, rel=0.05) and surplus > 0.4 and idle < 0.02


def test_plan_prefers_the_balanced_layout_and_fits_the_cluster():
    layouts = plan(BALANCED, gpus=8, judges=1, judge_gpus=1)
    assert all(x.gpus <= 8 for x in layouts)
    best = layouts[0]
    assert best.rows_trained_per_s >= max(x.rows_trained_per_s for x in layouts) - 1e-9
    assert best.generators > best.learners  # generation is the slow side here
    slow_training = plan(Costs(10, 50, 40, 40, 1.0), gpus=8)[0]
    assert slow_training.learners > slow_training.generators


def test_cli_plan(capsys):
    assert main(["plan", "--gpus", "8", "--gen-seconds", "10", "--rows-per-request", "50", "--train-seconds", "4",
                 "--batch", "40"]) == 0
    assert "recommended: resources.num_generators=" in capsys.readouterr().out
    assert main(["plan", "--gpus", "1", "--gen-seconds", "1", "--rows-per-request", "1", "--train-seconds", "1",
                 "--batch", "1"]) == 2  # a usage error: one line, exit status 2
    assert "error: --gpus 1: cannot hold a generator, a learner and 1 judge(s)" in capsys.readouterr().err
