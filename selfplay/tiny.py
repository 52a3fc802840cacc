"""The embedded default model: a tiny Qwen2-style causal LM and a byte-level BPE tokenizer, built locally.

Both come out of a seed deterministically in a few seconds with no download, and are saved and loaded like
any Hugging Face checkpoint (safetensors + tokenizer.json + chat template), so every code path that serves
Mistral-7B on a cluster serves this model here. Head size 32 keeps it inside what vLLM's kernels support.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

IM_START, IM_END, PAD = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
SPECIAL_TOKENS = [PAD, IM_START, IM_END]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TINY_ARCH = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)
VOCAB_SIZE = 512


def _corpus(seed: int, n: int = 4000) -> list[str]:
    """Text the tokenizer learns its merges from: task prompts/answers in chat form plus revision phrasing."""
    from selfplay.config import SRPOConfig
    from selfplay.tasks import TASKS

    rng = random.Random(seed)
    texts = []
    for task_cls in TASKS.values():
        task = task_cls()
        for p in task.prompts("train", n, seed=seed):
            texts.append(f"{IM_START}user\n{p.text}{IM_END}\n{IM_START}assistant\n{p.reference}{IM_END}\n")
    template = SRPOConfig().revision_template
    words = "the a answer previous improve reply with only here is of to and list numbers sorted order".split()
    for _ in range(n // 4):
        texts.append(template.format(prompt=" ".join(rng.choices(words, k=6)), response=" ".join(rng.choices(words, k=4))))
    return texts


def build_tokenizer(seed: int = 0, vocab_size: int = VOCAB_SIZE):
    """A Qwen2Tokenizer with our own small vocabulary.

    The BPE is trained under Qwen2's own normalizer and pre-tokenizer (NFC, Qwen's split regex, byte-level),
    because `AutoTokenizer` — and vLLM through it — rebuilds exactly that pipeline for any qwen2 checkpoint:
    a tokenizer trained differently would encode differently once saved and reloaded.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus(seed), trainer)
    state = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    tok = Qwen2Tokenizer(
        vocab=state["vocab"], merges=merges, eos_token=IM_END, pad_token=PAD, unk_token=None,
        additional_special_tokens=[IM_START],
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "left"  # generation pads on the left; training batches are built explicitly
    return tok


def build_model(tokenizer, seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tokenizer),
        tie_word_embeddings=True,
        bos_token_id=tokenizer.convert_tokens_to_ids(IM_START),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TINY_ARCH,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.eval()


def build_tiny(seed: int = 0, out_dir: str | Path | None = None):
    """Build (model, tokenizer); with out_dir, also save them there as a Hugging Face checkpoint."""
    tokenizer = build_tokenizer(seed)
    model = build_model(tokenizer, seed)
    if out_dir is not None:
        from selfplay.models import save_pretrained

        save_pretrained(model, tokenizer, out_dir)
    return model, tokenizer
