"""LearnerActor / LearnerGroup with real DeepSpeed engines on the session's Ray cluster (gloo on CPU)."""

import os
import time

import pyarrow as pa
import pytest
import ray
import torch

from selfplay.config import load_config
from selfplay.weights import unpack_buckets

pytestmark = [pytest.mark.ray, pytest.mark.slow]

PROMPTS = ["Sort ascending: 3 1 2", "Sort ascending: 9 4 7 1", "Sort ascending: 5 5 0", "Sort ascending: 8 2"]


def rows(n=8, offset=0):
    prompts = [PROMPTS[(i + offset) % 4] for i in range(n)]
    good = [" ".join(sorted(p.split(": ")[1].split())) for p in prompts]
    bad = [" ".join(reversed(g.split())) for g in good]
    return pa.table({"prompt": prompts, "chosen": good, "rejected": bad,
                     "p_chosen": [0.8] * n, "p_rejected": [0.3] * n})


def group(learners, zero, algorithm="sppo", batch=8, extra=()):
    from actors.learner import LearnerGroup

    cfg = load_config(None, [f"algorithm={algorithm}", f"resources.num_learners={learners}", f"train.batch_size={batch}",
                             f"train.zero_stage={zero}", "train.lr=1e-3", "sppo.beta=0.1", *extra])
    return LearnerGroup(cfg, num_cpus=0.25)


def flat_update(after: dict, before: dict) -> torch.Tensor:
    return torch.cat([(after[k] - before[k]).flatten() for k in sorted(before)])


@pytest.mark.parametrize("zero", [0, 2, 3])
def test_two_learners_match_one_with_double_batch(ray_cluster, zero):
    """Data parallelism is exact up to float32 rounding: two ranks that each take half the batch and average
    their gradients make the update one rank makes with the whole batch. With SGD the update is lr × gradient,
    so the two differ only by lr × the rounding of the gradient sum, whose order differs between one rank and
    two (and between CPU kinds): relative 1e-4 holds with margin on any machine. (Adam would turn a sign flip of
    a near-zero gradient into a 2·lr difference: see the next test.)"""
    sgd = ["train.optimizer=sgd", "train.lr=0.1"]
    single, pair = group(1, 0, extra=sgd), group(2, zero, extra=sgd)
    try:
        base = single.full_state()
        assert all(torch.equal(base[k], v) for k, v in pair.full_state().items())  # same init on every rank
        for step in range(2):
            batch = rows(8, offset=step)
            m1, m2 = single.train_step(batch), pair.train_step(batch)
            assert m2["pairs"] == m1["pairs"] == 8 and m2["step"] == step + 1
            assert m2["loss"] == pytest.approx(m1["loss"], rel=1e-5)
            assert m2["grad_norm"] == pytest.approx(m1["grad_norm"], rel=1e-4)
        w1, w2 = single.full_state(), pair.full_state()
        assert w1.keys() == w2.keys()
        u1, u2 = flat_update(w1, base), flat_update(w2, base)
        assert u1.norm() > 1e-3  # the weights did move
        assert (u1 - u2).norm() <= 1e-4 * u1.norm(), (u1 - u2).norm() / u1.norm()
        for k in w1:  # and no single tensor is off: differences are at the level of float32 rounding of w
            assert torch.allclose(w1[k], w2[k], rtol=1e-5, atol=1e-6), k
    finally:
        single.shutdown()
        pair.shutdown()


@pytest.mark.parametrize("learners, zero, checkpointing", [(1, 0, False), (2, 3, False), (2, 3, True)])
def test_micro_batches_accumulate_to_the_update_of_the_whole_batch(ray_cluster, learners, zero, checkpointing):
    """train.micro_batch_size=2 on a batch of 8: 4 (1 rank) or 2 (2 ranks) micro-batches whose gradients
    DeepSpeed accumulates make the same loss, grad norm and SGD update as the whole batch in one pass of plain
    rows; so do shared prompts (`train.share_prompts`: each pair's prompt run once, its cache feeding both
    responses — also under ZeRO-3, where that is two forwards per micro-batch), and gradient checkpointing
    (recomputed activations, rows whole: it drops the cache)."""
    sgd = ["train.optimizer=sgd", "train.lr=0.1"]
    micro = [*sgd, "train.micro_batch_size=2", f"train.gradient_checkpointing={str(checkpointing).lower()}"]
    whole, accumulating = group(1, 0, extra=[*sgd, "train.share_prompts=false"]), group(learners, zero, extra=micro)
    try:
        base = whole.full_state()
        for step in range(2):
            batch = rows(8, offset=step)
            m1, m2 = whole.train_step(batch), accumulating.train_step(batch)
            assert m2["pairs"] == m1["pairs"] == 8 and m2["tokens"] == m1["tokens"]
            assert m2["loss"] == pytest.approx(m1["loss"], rel=1e-5)
            assert m2["grad_norm"] == pytest.approx(m1["grad_norm"], rel=1e-4)
        u1, u2 = flat_update(whole.full_state(), base), flat_update(accumulating.full_state(), base)
        assert u1.norm() > 1e-3 and (u1 - u2).norm() <= 1e-4 * u1.norm(), (u1 - u2).norm() / u1.norm()
    finally:
        whole.shutdown()
        accumulating.shutdown()


def test_zero3_partitions_reference_and_ema_and_updates_them_in_place(ray_cluster, tmp_path):
    """Under ZeRO-3 the reference and SAPO's EMA are partitioned like the policy (each rank holds half) and start
    equal to it, though no rank ever held a full copy of either; the EMA
    moves partition by partition (θ_ema = ½ θ_0 + ½ θ_1 after one step), the reference takes the EMA's partitions
    exactly, and a checkpoint brings both back whole."""
    g = group(2, 3, algorithm="sapo", batch=4, extra=["sapo.ema_every=1", "sapo.ema_alpha=0.5"])
    try:
        theta0 = g.full_state("policy")
        for which in ("reference", "ema"):  # built partitioned, uninitialized, then filled from the policy's partitions
            state = g.full_state(which)
            assert state.keys() == theta0.keys() and all(torch.equal(state[k], theta0[k]) for k in theta0), which
        g.train_step(rows(4))
        theta1, ema = g.full_state("policy"), g.full_state("ema")
        for k in theta0:
            torch.testing.assert_close(ema[k], 0.5 * theta0[k] + 0.5 * theta1[k], rtol=1e-6, atol=1e-7)
        g.refresh_reference("ema")
        reference = g.full_state("reference")
        assert all(torch.equal(reference[k], ema[k]) for k in ema)
        stats = g.stats()
        assert all(s["partitioned"] for s in stats) and set(stats[0]["placement"]) == {"policy", "reference", "ema"}
        g.save_checkpoint(tmp_path / "ckpt")
    finally:
        g.shutdown()
    resumed = group(2, 3, algorithm="sapo", batch=4, extra=["sapo.ema_every=1", "sapo.ema_alpha=0.5"])
    try:
        resumed.load_checkpoint(tmp_path / "ckpt")
        for which, expected in (("ema", ema), ("reference", reference), ("policy", theta1)):
            state = resumed.full_state(which)
            assert all(torch.equal(state[k], expected[k]) for k in expected), which
    finally:
        resumed.shutdown()


def test_zero3_reference_from_its_own_checkpoint(ray_cluster, tmp_path):
    """`model.reference` names another checkpoint: under ZeRO-3 it is loaded once the policy is partitioned and
    partitioned in turn; the reference is that checkpoint's weights exactly, not the policy's."""
    from selfplay.tiny import build_tiny

    other, _ = build_tiny(seed=1, out_dir=tmp_path / "reference")
    g = group(2, 3, batch=4, extra=[f"model.reference={tmp_path / 'reference'}"])
    try:
        reference, policy = g.full_state("reference"), g.full_state("policy")
        expected = dict(other.named_parameters())
        assert reference.keys() == expected.keys()
        assert all(torch.equal(reference[k], expected[k]) for k in expected)
        assert not all(torch.equal(policy[k], expected[k]) for k in expected)
        g.train_step(rows(4))
    finally:
        g.shutdown()


def test_zero3_limits_are_sized_to_the_model_and_train_deepspeed_overrides_them(ray_cluster, tiny):
    """DeepSpeed's ZeRO-3 defaults keep up to 10⁹ parameters gathered (below ~1B: the whole model); ours gather
    at most two layers ahead and step the optimizer in sub-groups of the largest parameter (the embedding) or two
    layers, and `train.deepspeed` is merged over everything, nested keys one by one."""
    from actors.learner import deepspeed_config

    model, _ = tiny
    sizes = [p.numel() for p in model.parameters()]
    layers, hidden = model.config.num_hidden_layers, model.config.hidden_size
    two_layers = 2 * (sum(sizes) - max(sizes)) // layers  # gathered ahead of need at most
    cfg = load_config(None, ["train.zero_stage=3", "train.deepspeed.zero_optimization.reduce_bucket_size=4096",
                             "train.deepspeed.gradient_clipping=0.5"])
    ds = deepspeed_config(cfg, 2, False, model)
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["reduce_bucket_size"] == 4096
    assert ds["zero_optimization"]["stage3_max_live_parameters"] == two_layers < 10**9
    sub_group = max(max(sizes), two_layers)  # at 0.5B the embedding (27 % of the parameters) is larger
    assert ds["zero_optimization"]["sub_group_size"] == ds["zero_optimization"]["stage3_max_reuse_distance"] == sub_group
    assert ds["zero_optimization"]["stage3_prefetch_bucket_size"] == int(0.9 * hidden * hidden)
    assert ds["gradient_clipping"] == 0.5 and ds["train_batch_size"] == cfg.train.batch_size
    g = group(2, 3, batch=4, extra=["train.deepspeed.zero_optimization.reduce_bucket_size=4096"])
    try:  # what the engines run with, as DeepSpeed parsed it
        limits = [info["zero3_limits"] for info in g.info]
        assert limits[0] == limits[1] and limits[0]["max_live_parameters"] == two_layers
        assert limits[0]["reduce_bucket_size"] == 4096 and limits[0]["param_persistence_threshold"] == 10 * hidden
        # fp32: the optimizer's master copy is each rank's partition itself, not a second copy of it
        assert [info["master_bytes_shared"] for info in g.info] == [4 * sum(-(-n // 2) for n in sizes)] * 2
        # CPU learners free large blocks back to the OS (actors/learner.py: CPU_LEARNER_ENV)
        env = ray.get([a.__ray_call__.remote(lambda self: os.environ.get("MALLOC_MMAP_THRESHOLD_")) for a in g.actors])
        assert env == [str(4 << 20)] * 2
        g.train_step(rows(4))
    finally:
        g.shutdown()


def test_bf16_learner_keeps_reference_and_ema_in_bf16_and_trains(ray_cluster):
    """train.precision=bf16 works on CPU as on GPU: the policy, the reference and SAPO's EMA all in bfloat16 on
    the engine's device, and the loss goes down on a repeated batch."""
    g = group(1, 0, algorithm="sapo", batch=4, extra=["train.precision=bf16", "sapo.ema_every=1"])
    try:
        first = g.train_step(rows(4))
        for _ in range(3):
            last = g.train_step(rows(4))
        assert last["loss"] < first["loss"]
        placement = g.stats()[0]["placement"]
        assert placement == {"policy": ["cpu/bfloat16"], "reference": ["cpu/bfloat16"], "ema": ["cpu/bfloat16"]}
    finally:
        g.shutdown()


def test_long_prompts_and_responses_are_cut_and_counted(ray_cluster):
    g = group(1, 0, batch=4, extra=["train.max_prompt_tokens=6", "train.max_response_tokens=3"])
    try:
        long = rows(4)
        long = long.set_column(long.schema.get_field_index("chosen"), "chosen",
                               pa.array(["1 2 3 4 5 6 7 8 9"] * 2 + ["1"] * 2))
        m = g.train_step(long)
        assert m["prompts_truncated"] == 4  # every chat-formatted prompt is longer than 6 tokens
        assert 2 <= m["responses_truncated"] <= 8 and m["tokens"] <= 8 * 3
    finally:
        g.shutdown()


def test_two_learners_with_adamw_follow_the_loss_of_one(ray_cluster):
    """The default optimizer, compared where the claim needs it: the losses two ranks see step after step.
    Adam's first update is ≈ lr·sign(g), so weights whose gradient is ~0 may move ±lr apart between one rank and
    two (rounding decides the sign); the losses stay within 1e-3 of each other."""
    single, pair = group(1, 0), group(2, 2)
    try:
        for step in range(3):
            batch = rows(8, offset=step)
            m1, m2 = single.train_step(batch), pair.train_step(batch)
            assert m2["loss"] == pytest.approx(m1["loss"], rel=1e-3), step
            assert m2["grad_norm"] == pytest.approx(m1["grad_norm"], rel=1e-2), step
    finally:
        single.shutdown()
        pair.shutdown()


def test_published_weights_equal_learner_weights_bit_for_bit(ray_cluster):
    import ray

    g = group(2, 3)
    try:
        g.train_step(rows(8))
        pub = g.publish(bucket_bytes=256 << 10)  # small buckets: several of them
        assert pub["version"] == 1 and len(pub["buckets"]) > 1
        got = unpack_buckets(ray.get(pub["buckets"]), pub["manifest"], pub["checksums"])
        want = g.full_state()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
        assert g.publish()["version"] == 2
    finally:
        g.shutdown()


def test_resume_continues_with_identical_next_step_loss(ray_cluster, tmp_path):
    first = group(2, 2, algorithm="sapo", extra=["sapo.ema_every=1"])
    try:
        first.train_step(rows(8, 0))
        first.train_step(rows(8, 1))
        first.publish()
        first.save_checkpoint(tmp_path / "ckpt")
        expected = first.train_step(rows(8, 2))
        ema_expected = first.full_state("ema")
    finally:
        first.shutdown()
    assert (tmp_path / "ckpt" / "model" / "model.safetensors").exists()
    assert (tmp_path / "ckpt" / "ema.safetensors").exists()
    second = group(2, 2, algorithm="sapo", extra=["sapo.ema_every=1"])
    try:
        state = second.load_checkpoint(tmp_path / "ckpt")
        assert state == {"step": 2, "policy_version": 1}
        resumed = second.train_step(rows(8, 2))
        assert resumed["loss"] == pytest.approx(expected["loss"], rel=1e-6)
        assert resumed["step"] == 3
        ema = second.full_state("ema")
        assert all(torch.allclose(ema[k], ema_expected[k], atol=1e-7) for k in ema)  # optimizer state came back too
    finally:
        second.shutdown()


def test_sapo_reference_becomes_the_ema_policy_and_sppo_the_policy(ray_cluster):
    """refresh_reference(source): the reference takes exactly the EMA's (SAPO) or the policy's (SPPO) weights."""
    g = group(1, 0, algorithm="sapo", batch=4, extra=["sapo.ema_every=1", "sapo.ema_alpha=0.5"])
    try:
        before = g.full_state("reference")
        g.train_step(rows(4))
        ema, policy = g.full_state("ema"), g.full_state("policy")
        assert any(not torch.equal(ema[k], before[k]) for k in ema)  # the EMA moved off the initial weights
        assert any(not torch.equal(ema[k], policy[k]) for k in ema)  # … halfway to the policy, not onto it
        g.refresh_reference("ema")
        reference = g.full_state("reference")
        assert all(torch.equal(reference[k], ema[k]) for k in ema)
        g.refresh_reference("policy")
        reference = g.full_state("reference")
        assert all(torch.equal(reference[k], policy[k]) for k in policy)
    finally:
        g.shutdown()


@pytest.mark.parametrize("algorithm, loss", [("sapo", "dpo"), ("sapo", "ipo"), ("sapo", "orpo"), ("srpo", None)])
def test_every_loss_trains(ray_cluster, algorithm, loss):
    extra = [f"sapo.loss={loss}"] if loss else []
    g = group(1, 0, algorithm=algorithm, batch=4, extra=extra)
    try:
        first = g.train_step(rows(4))
        for _ in range(4):
            last = g.train_step(rows(4))
        assert torch.isfinite(torch.tensor([first["loss"], last["loss"], last["grad_norm"]])).all()
        assert last["loss"] < first["loss"]  # same batch repeated: the loss goes down
    finally:
        g.shutdown()


def test_impossible_resources_fail_fast_with_a_clear_error(ray_cluster):
    from actors.learner import LearnerGroup
    from selfplay.placement import PlacementError

    cfg = load_config(None, ["resources.num_learners=2", "resources.learner_gpus=1", "train.batch_size=8"])
    t = time.perf_counter()
    with pytest.raises(PlacementError, match=r"learner: needs the resource 'GPU' \(resources.learner_gpus\)"):
        LearnerGroup(cfg)
    assert time.perf_counter() - t < 5  # refused from the plan, not after a wait
