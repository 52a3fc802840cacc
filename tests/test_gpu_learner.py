"""Learners on a GPU: every model a learner holds (policy, reference, SAPO's EMA) on the engine's device and in
its dtype, one step of each algorithm with ZeRO-3 in bf16. Marked `gpu`: skipped without CUDA (see conftest)."""

import pyarrow as pa
import pytest

from selfplay.config import load_config

pytestmark = [pytest.mark.gpu, pytest.mark.ray, pytest.mark.slow]


def pairs(n: int) -> pa.Table:
    prompts = ["Sort ascending: 3 1 2", "Sort ascending: 9 4 7 1"] * (n // 2)
    return pa.table({"prompt": prompts, "chosen": ["1 2 3", "1 4 7 9"] * (n // 2),
                     "rejected": ["3 2 1", "9 7 4 1"] * (n // 2), "p_chosen": [0.8] * n, "p_rejected": [0.3] * n})


@pytest.mark.parametrize("algorithm, loss", [("sppo", None), ("sapo", "dpo"), ("sapo", "orpo"), ("srpo", None)])
def test_zero3_bf16_step_keeps_every_model_on_the_gpu(ray_cluster, algorithm, loss):
    from actors.learner import LearnerGroup

    cfg = load_config(None, [f"algorithm={algorithm}", *([f"sapo.loss={loss}"] if loss else []), "train.zero_stage=3",
                             "train.precision=bf16", "train.batch_size=4", "train.micro_batch_size=2",
                             "train.gradient_checkpointing=true", "sapo.ema_every=1", "resources.learner_gpus=1"])
    group = LearnerGroup(cfg, num_cpus=1, num_gpus=1)
    try:
        for _ in range(2):
            metrics = group.train_step(pairs(4))
            assert metrics["loss"] == metrics["loss"]  # not NaN
        placement = group.stats()[0]["placement"]
        for name, where in placement.items():  # e.g. {"policy": ["cuda:0/bfloat16"], "reference": [...]}
            assert all(w.startswith("cuda") and w.endswith("bfloat16") for w in where), (name, where)
        assert ("ema" in placement) == (algorithm == "sapo")
        group.refresh_reference("ema" if algorithm == "sapo" else "policy")
        published = group.publish("ema" if algorithm == "sapo" else "policy")
        assert published["version"] == 1 and published["nbytes"] > 0
    finally:
        group.shutdown()


def test_streamed_nccl_sync_goes_from_learner_gpu_memory_to_generator_gpu_memory_bit_for_bit(ray_cluster,
                                                                                          warm_policy_dir):
    """The collective transport on GPUs: rank 0 fills each bucket on its GPU and broadcasts it over NCCL, the
    generator receives it into GPU memory and loads it there. NCCL needs the two on different devices."""
    import ray
    import torch

    from actors.generator import GeneratorActor
    from actors.learner import LearnerGroup
    from actors.weight_sync import WeightSync

    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 CUDA GPUs (NCCL ranks on distinct devices); this machine has {torch.cuda.device_count()}")
    cfg = load_config(None, ["train.batch_size=4", "resources.learner_gpus=1", "resources.generator_gpus=1",
                             f"model.policy={warm_policy_dir}", "weight_sync.transport=collective"])
    group = LearnerGroup(cfg, num_cpus=1, num_gpus=1)
    gen = GeneratorActor.options(num_cpus=1, num_gpus=1).remote(cfg.to_dict(), None, 0)
    try:
        sync = WeightSync(group, [gen], transport="collective", mode="sync", bucket_bytes=200_000, timeout_s=300)
        assert sync.transport == "collective"
        group.train_step(pairs(4))
        push = sync.push()
        want, got = group.full_state(), ray.get(gen.weights.remote())
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
        assert ray.get(gen.version.remote()) == push.version == 1
    finally:
        group.shutdown()
        ray.kill(gen)
