"""LoRA (model.lora): adapters trained under DeepSpeed, the reference as the base, adapter-only weight pushes,
checkpoints in PEFT's layout and their resume."""

import copy
import importlib.util
import json

import pyarrow as pa
import pytest
import ray
import torch

from selfplay.config import load_config
from selfplay.lora import AdapterView, adapter_parameters, merge_weights, with_adapters
from selfplay.tasks import SortTask

LORA = ["model.lora.rank=4", "model.lora.alpha=8"]
HAVE_VLLM = importlib.util.find_spec("vllm") is not None
PROMPTS = ["Sort ascending: 3 1 2", "Sort ascending: 9 4 7 1", "Sort ascending: 5 5 0", "Sort ascending: 8 2"]


def rows(n=8, offset=0):
    prompts = [PROMPTS[(i + offset) % 4] for i in range(n)]
    good = [" ".join(sorted(p.split(": ")[1].split())) for p in prompts]
    bad = [" ".join(reversed(g.split())) for g in good]
    return pa.table({"prompt": prompts, "chosen": good, "rejected": bad, "p_chosen": [0.8] * n, "p_rejected": [0.3] * n})


def lora_cfg(rank=4, alpha=8.0, targets=None):
    return load_config(None, [f"model.lora.rank={rank}", f"model.lora.alpha={alpha}"]
                       + ([f"model.lora.target_modules=[{','.join(targets)}]"] if targets else [])).model.lora


def randomize_policy_adapter(model, seed=0, scale=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in adapter_parameters(model, "policy"):
            p.copy_(scale * torch.randn(p.shape, generator=g))


def test_the_reference_adapter_gives_the_base_models_log_probs_exactly(tiny):
    """The reference is the base with the policy's adapter off: before any refresh its log-probs are the base
    model's bit for bit (B = 0 adds exact zeros), however far the policy adapter has moved; the policy's differ."""
    from selfplay.logprobs import build_batch, response_logprobs

    base = copy.deepcopy(tiny[0])
    model = with_adapters(copy.deepcopy(tiny[0]), lora_cfg(), frozen=("reference",))
    randomize_policy_adapter(model)
    batch = build_batch([[5, 6, 7], [8, 9]], [[10, 11, 12, 13], [14, 15]], pad_id=0)
    with torch.no_grad():
        want, _ = response_logprobs(base, batch)
        ref, _ = response_logprobs(AdapterView(model, "reference"), batch)
        policy, _ = response_logprobs(model, batch)
        with model.disable_adapter():
            disabled, _ = response_logprobs(model, batch)
    assert torch.equal(ref, want) and torch.equal(disabled, want)
    assert not torch.allclose(policy, want, atol=1e-3)
    # after the reference view, the policy adapter is the active one and the only one trained
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n and ".default." in n for n in trainable)


def test_adapters_take_the_models_dtype(tiny):
    """A bf16 model gets bf16 adapters (PEFT's default would be float32): learner and generator agree on what a
    push carries."""
    model = with_adapters(copy.deepcopy(tiny[0]).to(torch.bfloat16), lora_cfg(), frozen=("reference",))
    assert {p.dtype for n, p in model.named_parameters()} == {torch.bfloat16}


def test_merged_weights_equal_peft_merge(tiny):
    """W + (α/r)·B·A per layer (the final model's export) equals PEFT's own merge_and_unload."""
    model = with_adapters(copy.deepcopy(tiny[0]), lora_cfg(targets=["q_proj", "down_proj"]))
    randomize_policy_adapter(model, seed=3)
    params = dict(model.named_parameters())
    mine = {}
    for name, p in params.items():
        if name.endswith(".base_layer.weight"):
            layer = name.split(".base_layer.")[0]
            mine[layer.removeprefix("base_model.model.") + ".weight"] = merge_weights(
                p, params[f"{layer}.lora_A.default.weight"], params[f"{layer}.lora_B.default.weight"], 8.0 / 4)
    assert len(mine) == 2 * tiny[0].config.num_hidden_layers
    merged = dict(model.merge_and_unload().named_parameters())
    for name, w in mine.items():
        torch.testing.assert_close(w, merged[name], rtol=1e-6, atol=1e-6)


def test_lora_config_errors_name_the_key():
    from selfplay.config import ConfigError

    for override, words in ((["model.lora.rank=-1"], "model.lora.rank"),
                            (["model.lora.target_modules=q_proj"], "model.lora.target_modules"),
                            (["model.lora.rank=8", "model.reference=/x"], "model.reference")):
        with pytest.raises(ConfigError, match=words):
            load_config(None, override)


# -- learners, generators, checkpoints on the session's Ray cluster -----------------------------------------------

def group(learners=1, zero=0, algorithm="sppo", extra=(), policy=None):
    from actors.learner import LearnerGroup

    cfg = load_config(None, [f"algorithm={algorithm}", f"resources.num_learners={learners}", "train.batch_size=8",
                             f"train.zero_stage={zero}", "sppo.beta=0.1", *LORA, *extra])
    return LearnerGroup(cfg, policy, num_cpus=0.25)


def base_weights(actor) -> dict[str, torch.Tensor]:
    """Everything of rank 0's model that is not an adapter (ZeRO-0: whole tensors)."""
    return ray.get(actor.__ray_call__.remote(lambda self: {
        n: p.detach().clone() for n, p in self.engine.module.named_parameters() if ".lora_" not in n}))


@pytest.mark.ray
@pytest.mark.slow
def test_a_lora_step_trains_only_the_policy_adapter_and_zero3_agrees(ray_cluster):
    """One SGD step: the base and the reference adapter stay bit-identical, the policy adapter moves, only it is
    pushed (its tensors, PEFT's saved names); two ZeRO-3 ranks make the update one ZeRO-0 rank makes."""
    sgd = ["train.optimizer=sgd", "train.lr=0.5"]
    single, pair = group(1, 0, extra=sgd), group(2, 3, extra=sgd)
    try:
        assert single.info[0]["trained_parameters"] < single.info[0]["parameters"] / 5
        base0, adapter0, reference0 = base_weights(single.actors[0]), single.full_state(), single.full_state("reference")
        assert adapter0 and all(".lora_" in n and ".default." not in n for n in adapter0)
        batch = rows(8)
        m1, m2 = single.train_step(batch), pair.train_step(batch)
        assert m2["loss"] == pytest.approx(m1["loss"], rel=1e-5)
        base1, adapter1, reference1 = base_weights(single.actors[0]), single.full_state(), single.full_state("reference")
        assert base1.keys() == base0.keys() and all(torch.equal(base1[n], base0[n]) for n in base0)
        assert all(torch.equal(reference1[n], reference0[n]) for n in reference0)
        moved = [n for n in adapter0 if not torch.equal(adapter1[n], adapter0[n])]
        assert any("lora_B" in n for n in moved)  # B starts at 0 and is the first to move
        update1 = torch.cat([(adapter1[n] - adapter0[n]).flatten() for n in sorted(adapter0)])
        zero3 = pair.full_state()
        update2 = torch.cat([(zero3[n] - adapter0[n]).flatten() for n in sorted(adapter0)])
        assert (update1 - update2).norm() <= 1e-4 * update1.norm()
        published = single.publish()
        full_bytes = sum(p.numel() * 4 for p in base0.values())
        assert published["nbytes"] == sum(t.numel() * 4 for t in adapter1.values()) < 0.2 * full_bytes
        assert {m["name"] for m in published["manifest"]} == set(adapter1)
    finally:
        single.shutdown()
        pair.shutdown()


@pytest.mark.ray
@pytest.mark.slow
def test_after_an_adapter_push_generators_answer_as_the_merged_model(ray_cluster, tiny_dir, tmp_path):
    """A trained adapter pushed to an hf generator and (where installed) a vLLM one — LoRA generators accept
    adapters only — makes them answer greedily exactly as the learner's final export, the merged model in
    `model/`; that export and the adapter in PEFT's layout (`adapter/`) load with transformers and PEFT and agree.
    A second push replaces the first in vLLM (a new LoRA id: no cached adapter or prefix KV of the old one)."""
    from peft import PeftModel

    from actors.generator import GeneratorActor
    from selfplay.generation import generate_ids
    from selfplay.models import load_causal_lm, load_tokenizer
    from selfplay.weights import WeightSyncError, pack_buckets

    learners = group(extra=["train.lr=0.05"], policy=str(tiny_dir))
    gens = {backend: GeneratorActor.options(num_cpus=0.25).remote(load_config(None, [
        f"generation.backend={backend}", "generation.max_new_tokens=12", *LORA]).to_dict(), str(tiny_dir), i)
        for i, backend in enumerate(["hf", "vllm"] if HAVE_VLLM else ["hf"])}
    prompts = SortTask().prompts("eval", 6, seed=0)

    def served(gen):
        return [r["samples"][0]["token_ids"] for r in ray.get(gen.sample.remote(prompts, k=1, temperature=0.0))]

    try:
        for version in (1, 2):
            for step in range(3):
                learners.train_step(rows(8, offset=step))
            p = learners.publish()
            for gen in gens.values():
                assert ray.get(gen.load_weights.remote(p["version"], p["buckets"], p["manifest"], p["checksums"])) \
                    == version
            if version == 1:
                first = {b: served(g) for b, g in gens.items()}
        learners.save_checkpoint(tmp_path / "ckpt", merged=True)
        full = pack_buckets({n: t for n, t in load_causal_lm(str(tiny_dir)).state_dict().items()})
        with pytest.raises(WeightSyncError, match="manifest does not match"):  # a full model is refused
            ray.get(gens["hf"].load_weights.remote(3, full.buckets, full.manifest, full.checksums))
        answers = {b: served(g) for b, g in gens.items()}
    finally:
        learners.shutdown()
        for gen in gens.values():
            ray.kill(gen)
    tok = load_tokenizer(str(tiny_dir))
    ids = [tok(tok.apply_chat_template([{"role": "user", "content": q.text}], tokenize=False,
                                       add_generation_prompt=True), add_special_tokens=False)["input_ids"] for q in prompts]
    merged = load_causal_lm(str(tmp_path / "ckpt" / "model"))
    want = [list(c[0].token_ids) for c in generate_ids(merged, tok, ids, max_new_tokens=12, temperature=0.0)]
    assert all(a == want for a in answers.values()) and all(first[b] != want for b in first), answers
    base = load_causal_lm(str(tiny_dir))
    assert want != [list(c[0].token_ids) for c in generate_ids(base, tok, ids, max_new_tokens=12, temperature=0.0)]
    peft = PeftModel.from_pretrained(load_causal_lm(str(tiny_dir)), str(tmp_path / "ckpt" / "adapter"))
    assert want == [list(c[0].token_ids) for c in generate_ids(peft, tok, ids, max_new_tokens=12, temperature=0.0)]
    config = json.loads((tmp_path / "ckpt" / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["base_model_name_or_path"] == str(tiny_dir)
    # `selfplay eval --policy-a DIR` with an adapter directory: its base (from adapter_config.json), merged
    adapter = str(tmp_path / "ckpt" / "adapter")
    as_policy = load_causal_lm(adapter, tokenizer=load_tokenizer(adapter))
    assert want == [list(c[0].token_ids) for c in generate_ids(as_policy, tok, ids, max_new_tokens=12, temperature=0.0)]


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("algorithm, zero", [("sapo", 3)])  # SPPO with ZeRO-0: tests/test_pipeline.py, end to end
def test_resuming_a_lora_checkpoint_ends_on_the_adapters_of_an_uninterrupted_run(ray_cluster, tiny, tmp_path, algorithm,
                                                                                  zero):
    """Four AdamW steps straight vs two, an adapter-only checkpoint (no merged model, no frozen base in DeepSpeed's
    files), a fresh group that loads it and two more: the same policy, reference and EMA adapters, bit for bit.
    Under ZeRO-3 the persistence threshold splits the adapters into some kept whole on every rank and some
    partitioned only; the EMA (θ_ema = ½ θ_0 + ½ θ_1 after one step) and the reference refresh hold for both."""
    extra = ["train.lr=0.01", "sapo.ema_every=1", "sapo.ema_alpha=0.5",
             "model.lora.target_modules=[q_proj,gate_proj]"]  # lora_A of 512 elements everywhere, gate's lora_B 1,536
    if zero == 3:
        extra.append("train.deepspeed.zero_optimization.stage3_param_persistence_threshold=1000")
    n = 2 if zero == 3 else 1
    straight = group(n, zero, algorithm, extra)
    try:
        theta0 = straight.full_state()
        for step in range(4):
            if step == 2:
                source = "policy" if algorithm == "sppo" else "ema"
                straight.refresh_reference(source)
                assert all(torch.equal(a, b) for a, b in zip(straight.full_state("reference").values(),
                                                             straight.full_state(source).values()))
            straight.train_step(rows(8, offset=step))
            if step == 0 and algorithm == "sapo":
                theta1, ema = straight.full_state(), straight.full_state("ema")
                for k in theta0:
                    torch.testing.assert_close(ema[k], 0.5 * theta0[k] + 0.5 * theta1[k], rtol=1e-6, atol=1e-7)
        kept = ["policy", "reference"] + (["ema"] if algorithm == "sapo" else [])
        want = {w: straight.full_state(w) for w in kept}
    finally:
        straight.shutdown()
    first = group(n, zero, algorithm, extra)
    try:
        for step in range(2):
            first.train_step(rows(8, offset=step))
        first.save_checkpoint(tmp_path / "ckpt", merged=False)
    finally:
        first.shutdown()
    saved = tmp_path / "ckpt"
    assert (saved / "adapter" / "adapter_model.safetensors").exists() and not (saved / "model").exists()
    ds_bytes = sum(f.stat().st_size for f in (saved / "deepspeed").rglob("*model_states.pt"))
    base_bytes = sum(p.numel() * 4 for p in tiny[0].parameters())
    assert ds_bytes < base_bytes / 2  # adapters and their Adam moments, not the frozen base
    resumed = group(n, zero, algorithm, extra)
    try:
        assert resumed.load_checkpoint(saved)["step"] == 2
        for step in range(2, 4):
            if step == 2:
                resumed.refresh_reference("policy" if algorithm == "sppo" else "ema")
            resumed.train_step(rows(8, offset=step))
        for w in kept:
            got = resumed.full_state(w)
            assert got.keys() == want[w].keys() and all(torch.equal(got[k], want[w][k]) for k in got), w
    finally:
        resumed.shutdown()


def test_a_full_fine_tuning_checkpoint_is_refused_by_a_lora_run_with_a_clear_error(tiny, tmp_path):
    from selfplay.errors import ModelLoadError
    from selfplay.lora import adapter_specs, check_adapter_checkpoint

    model = with_adapters(copy.deepcopy(tiny[0]), lora_cfg())
    (tmp_path / "full" / "model").mkdir(parents=True)  # a full fine-tuning checkpoint: model/, no adapter/
    with pytest.raises(ModelLoadError, match="not a LoRA checkpoint"):
        check_adapter_checkpoint(tmp_path / "full", model, {"policy": adapter_specs(model)})


def test_a_lora_policy_prefills_only_the_last_positions_logits(tiny):
    """PEFT's forward names neither `logits_to_keep` nor `position_ids` (it passes them on): the decode loop looks
    at the base model's, so a LoRA policy's prefill computes one position's logits per prompt, not one per prompt
    token (at 7B: a [prompts, prompt tokens, vocabulary] tensor), and decodes as the merged model does."""
    from selfplay.generation import decode, left_pad

    model = with_adapters(copy.deepcopy(tiny[0]), lora_cfg())
    randomize_policy_adapter(model)
    tok = tiny[1]
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    input_ids, attention = left_pad(ids, tok.pad_token_id)
    positions = []
    head = model.get_output_embeddings().register_forward_hook(lambda m, args, out: positions.append(args[0].shape[1]))
    try:
        with torch.no_grad():
            got = decode(model, input_ids, attention, 1, 6, 0.0, 1.0, len(tok), None)
    finally:
        head.remove()
    assert input_ids.shape[1] > 1 and positions == [1] * 6  # the prefill too
    merged = copy.deepcopy(model).merge_and_unload()
    with torch.no_grad():
        assert got == decode(merged, input_ids, attention, 1, 6, 0.0, 1.0, len(tok), None)
