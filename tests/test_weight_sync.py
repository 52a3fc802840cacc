"""Learner → generator weight sync with real DeepSpeed learners and real generator actors."""

import pytest
import torch

from selfplay.config import load_config
from tests.test_learner import rows

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def setup(ray_cluster, warm_policy_dir):
    from actors.generator import GeneratorActor
    from actors.learner import LearnerGroup

    cfg = load_config(None, ["resources.num_learners=2", "train.zero_stage=3", "train.batch_size=8", "train.lr=1e-3",
                             "sppo.beta=0.1", f"model.policy={warm_policy_dir}"])
    learners = LearnerGroup(cfg, num_cpus=0.25)
    gens = [GeneratorActor.options(num_cpus=0.25).remote(cfg.to_dict(), None, i) for i in range(2)]
    yield learners, gens
    learners.shutdown()
    for g in gens:
        ray_cluster.kill(g)


# the collective in async mode: receivers dispatched with the publish, the learners' next step queued behind it
@pytest.mark.parametrize(("transport", "mode"), [("object_store", "sync"), ("object_store", "async"),
                                                ("collective", "async")])
def test_generators_receive_learner_weights_bit_for_bit(setup, transport, mode):
    import ray

    from actors.weight_sync import WeightSync

    learners, gens = setup
    sync = WeightSync(learners, gens, transport=transport, mode=mode, bucket_bytes=200_000, timeout_s=120)
    learners.train_step(rows(8))
    push = sync.push()
    want = learners.full_state()  # what was published (no step since)
    if mode == "async":
        metrics = learners.train_step(rows(8, 1))  # the learners go on while generators load
        assert metrics["step"] >= 2
        sync.wait()
    assert not sync.pending and sync.generator_versions == {0: push.version, 1: push.version}
    assert sync.version_lag(push.version) == {0: 0, 1: 0}
    for state in (ray.get(g.weights.remote()) for g in gens):
        assert state.keys() == want.keys() and all(torch.equal(state[k], want[k]) for k in want)
    assert ray.get([g.version.remote() for g in gens]) == [push.version] * 2
    assert sync.latencies and sync.latencies[-1] > 0


def test_a_stuck_generator_times_out_with_its_name(setup):
    import ray

    from actors.weight_sync import WeightSync
    from selfplay.tasks import SortTask

    learners, gens = setup
    busy = gens[1].sample.remote(SortTask().prompts("eval", 128), k=8, max_new_tokens=24)  # generator 1 is busy
    sync = WeightSync(learners, gens, mode="async", timeout_s=1.0)
    push = sync.push()
    with pytest.raises(TimeoutError, match=rf"generator [01]: load weights v{push.version} did not finish within 1s"):
        sync.wait()
    ray.get(busy)
    # nothing hung and nothing was lost: the update lands once generator 1 is free
    assert ray.get([g.version.remote() for g in gens], timeout=120) == [push.version] * 2
