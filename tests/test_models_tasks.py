import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from selfplay.models import ModelLoadError, load_causal_lm, load_policy_and_tokenizer, load_tokenizer
from selfplay.tasks import PromptFileError, SortTask, chat_prompt, load_prompts
from selfplay.tiny import build_tiny


def test_tiny_is_deterministic_from_seed(tiny):
    model, tok = tiny
    model2, tok2 = build_tiny(seed=0)
    assert tok.get_vocab() == tok2.get_vocab()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))
    model3, _ = build_tiny(seed=1)
    assert not torch.equal(model.model.embed_tokens.weight, model3.model.embed_tokens.weight)


def test_tiny_chat_template_and_special_tokens(tiny):
    _, tok = tiny
    text = chat_prompt(tok, "Sort ascending: 3 1 2")
    assert text == "<|im_start|>user\nSort ascending: 3 1 2<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id != tok.eos_token_id


def test_save_and_load_roundtrip_with_safetensors(tiny, tiny_dir):
    model, tok = tiny
    assert any(tiny_dir.glob("*.safetensors")) and not any(tiny_dir.glob("*.bin"))
    from selfplay.config import ModelConfig

    loaded, tok2 = load_policy_and_tokenizer(ModelConfig(policy=str(tiny_dir)))
    assert tok2.get_vocab() == tok.get_vocab() and tok2.chat_template == tok.chat_template
    # AutoTokenizer rebuilds a qwen2 tokenizer's pipeline on load: encodings must not change
    text = chat_prompt(tok, "Sort ascending: 7 3 9 1") + "1 3 7 9" + tok.eos_token
    assert tok2(text, add_special_tokens=False)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    assert (tok2.eos_token_id, tok2.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)
    ids = torch.tensor([tok("Sort ascending: 5 4", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, loaded(ids).logits, atol=1e-6)


def test_pickle_only_checkpoint_is_refused(tmp_path, tiny_dir):
    (tmp_path / "config.json").write_text((tiny_dir / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not really")
    with pytest.raises(ModelLoadError, match="no \\*.safetensors"):
        load_causal_lm(str(tmp_path))


def test_missing_checkpoint_gives_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="cannot load tokenizer"):
        load_tokenizer(str(tmp_path / "nope"))


def test_sort_task_scores():
    task = SortTask()
    p = "Sort ascending: 7 3 9 1"
    assert task.reference(p) == "1 3 7 9"
    assert task.score(p, "1 3 7 9") == 1.0
    assert task.score(p, "1 3 9 7") == 0.5
    assert task.score(p, "1 3 7 9 9") == pytest.approx(4 / 5)  # extra items cost credit
    assert task.score(p, "") == 0.0 and task.score(p, "banana") == 0.0


def test_sort_splits_are_disjoint_and_deterministic():
    task = SortTask()
    train, held_out = task.prompts("train", 500, seed=3), task.prompts("eval", 100, seed=3)
    assert len({p.text for p in train}) == 500 and len(held_out) == 100
    assert not {p.text for p in train} & {p.text for p in held_out}
    assert [p.prompt_id for p in task.prompts("eval", 100, seed=3)] == [p.prompt_id for p in held_out]
    assert all(4 <= len(task.parse(p.text)) <= 8 for p in train)
    with pytest.raises(ValueError, match="cannot draw"):
        SortTask(1, 1).prompts("train", 100)


def test_load_jsonl_prompts(tmp_path):
    f = tmp_path / "p.jsonl"
    rows = [
        {"prompt": "Hello?", "id": "a", "answer": "Hi"},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"}]},
    ]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    prompts = load_prompts(f, id_field="id", reference_field="answer")
    assert [p.text for p in prompts] == ["Hello?", "Why?"]
    assert prompts[0].prompt_id == "a" and prompts[0].reference == "Hi"
    assert prompts[1].messages[0]["role"] == "system"


def test_bad_jsonl_names_every_line(tmp_path, caplog):
    f = tmp_path / "bad.jsonl"
    lines = [
        json.dumps({"prompt": "ok"}).encode(),
        json.dumps({"text": "no prompt field"}).encode(),
        json.dumps({"prompt": "   "}).encode(),
        b"{not json",
        '{"prompt": "caf\xe9"}'.encode("latin-1"),
        json.dumps({"prompt": "x" * 50}).encode(),
        json.dumps({"prompt": 5}).encode(),
    ]
    f.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(PromptFileError) as e:
        load_prompts(f, max_chars=40)
    msg = str(e.value)
    assert "6 bad record(s)" in msg
    assert f"{f}:2: missing field 'prompt'" in msg
    assert f"{f}:3: field 'prompt': empty prompt" in msg
    assert f"{f}:4: invalid JSON" in msg
    assert f"{f}:5: not UTF-8" in msg
    assert f"{f}:6: field 'prompt': prompt of 50 characters exceeds max_chars=40" in msg
    assert f"{f}:7: field 'prompt': expected a string" in msg
    kept = load_prompts(f, max_chars=40, skip_bad=True)
    assert [p.text for p in kept] == ["ok"]
    assert "skipped 6 bad record(s)" in caplog.text


def test_parquet_prompts(tmp_path):
    f = tmp_path / "p.parquet"
    pq.write_table(pa.table({"question": ["a?", "b?"], "other": [1, 2]}), f)
    assert [p.text for p in load_prompts(f, field="question")] == ["a?", "b?"]
    with pytest.raises(PromptFileError, match=r"missing column\(s\) \['prompt'\]"):
        load_prompts(f)
    csv = tmp_path / "x.csv"
    csv.write_text("prompt\nhi\n")
    with pytest.raises(PromptFileError, match="unsupported prompt file type '.csv'"):
        load_prompts(csv)
    (tmp_path / "fake.parquet").write_text("not parquet")
    with pytest.raises(PromptFileError, match="not a readable Parquet file"):
        load_prompts(tmp_path / "fake.parquet")


def test_import_selfplay_does_not_import_ray():
    code = (
        "import sys, selfplay, selfplay.config, selfplay.losses, selfplay.preference, selfplay.logprobs, "
        "selfplay.segments, selfplay.ema, selfplay.tasks, selfplay.models, selfplay.tiny, selfplay.cli; "
        "assert 'ray' not in sys.modules, 'ray imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_generation_never_samples_ids_past_the_tokenizer(tiny):
    """A model with more embedding rows than tokens (Qwen2 pads its vocabulary; the scale ladder's 0.5B shape has
    151,936 rows for the tiny tokenizer's few hundred) never samples an id that decodes to nothing."""
    from transformers import AutoModelForCausalLM

    from selfplay.generation import generate_ids

    _, tok = tiny
    config = build_tiny(seed=0)[0].config
    config.vocab_size = 20 * len(tok)  # random weights: almost all of the probability is on the padding rows
    torch.manual_seed(0)
    padded = AutoModelForCausalLM.from_config(config).eval()
    prompt = tok("Sort ascending: 3 1 2")["input_ids"]
    out = generate_ids(padded, tok, [prompt], num_samples=4, max_new_tokens=16, temperature=1.0, seed=0)
    ids = [i for c in out[0] for i in c.token_ids]
    assert ids and max(ids) < len(tok)


def test_decode_prefills_each_prompt_once_and_drops_finished_rows(tiny):
    """`decode` computes each prompt's keys and values once (not once per sample), a row leaves the batch at its
    stop token, and the tokens are `model.generate`'s: greedily, token for token, over left-padded prompts of
    different lengths whose rows stop at different steps."""
    from transformers import AutoModelForCausalLM

    from selfplay.generation import decode, left_pad

    _, tok = tiny
    config = build_tiny(seed=0)[0].config
    config.initializer_range = 0.5  # large random weights: each prompt gets its own greedy tokens (the tiny
    torch.manual_seed(0)  # model's usual 0.02 repeats one token for every prompt)
    model = AutoModelForCausalLM.from_config(config).eval()
    prompts = [chat_prompt(tok, p.text) for p in SortTask().prompts("train", 6, seed=3)]
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    assert len({len(i) for i in ids}) > 1  # left padding is exercised
    input_ids, attention = left_pad(ids, tok.pad_token_id)
    width = input_ids.shape[1]

    def reference(stop):
        with torch.no_grad():
            return model.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=12, do_sample=False,
                                  pad_token_id=tok.pad_token_id, eos_token_id=stop)[:, width:].tolist()

    free = reference(None)  # an untrained model rarely says EOS: stop at the token most rows say, some early
    stop = max(range(len(tok)), key=lambda t: sum(t in row for row in free))
    want = [row[: row.index(stop) + 1] if stop in row else row for row in reference(stop)]
    assert len({len(w) for w in want}) > 2  # rows end at different steps

    shapes = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape)))
    try:
        greedy = decode(model, input_ids, attention, 1, 12, 0.0, 1.0, len(tok), stop)
        greedy_shapes, shapes[:] = list(shapes), []
        k = 4
        sampled = decode(model, input_ids, attention, k, 12, 1.0, 1.0, len(tok), stop)
    finally:
        hook.remove()
    assert greedy == want
    # one prefill over the prompts, then one row per unfinished sequence per step
    assert greedy_shapes == [(len(ids), width)] + [(sum(len(w) > t for w in want), 1) for t in range(1, 12)
                                                    if any(len(w) > t for w in want)]
    assert shapes[0] == (len(ids), width)  # K samples: still one prefill over the prompts (without sharing: 6 × 4)
    live = [rows for rows, _ in shapes[1:]]
    assert live == sorted(live, reverse=True) and live[-1] < len(ids) * k  # finished samples left the batch
    assert len(sampled) == len(ids) * k
    for row in sampled:
        assert 1 <= len(row) <= 12 and (len(row) == 12 or row[-1] == stop) and stop not in row[:-1]


def test_sample_next_draws_from_the_top_p_nucleus():
    """Check values: probabilities 0.5, 0.3, 0.15, 0.05 and top-p 0.9 keep the first three tokens (0.5 + 0.3 < 0.9
    ≤ 0.95), renormalized to 0.526, 0.316, 0.158; temperature 0 takes the argmax; ids past `vocab` are never
    drawn. 20,000 draws from a fixed seed land within 4 standard errors of each."""
    from selfplay.generation import sample_next

    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    logits = probs.clamp(min=1e-12).log().expand(20_000, -1).clone()
    logits[:, 4] = 50.0  # a padded embedding row the model likes best
    torch.manual_seed(0)
    drawn = sample_next(logits, 1.0, 0.9, vocab=4)
    freq = torch.bincount(drawn, minlength=5).double() / len(drawn)
    want = torch.tensor([0.5, 0.3, 0.15, 0.0, 0.0], dtype=torch.double) / 0.95
    se = (want * (1 - want) / len(drawn)).sqrt()
    assert (freq - want).abs().le(4 * se + 1e-12).all(), freq
    assert sample_next(logits[:2], 0.0, 1.0, vocab=4).tolist() == [0, 0]
    assert sample_next(logits[:2], 0.0, 1.0, vocab=5).tolist() == [4, 4]


