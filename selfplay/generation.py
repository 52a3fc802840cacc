"""Batched sampling with a transformers model: the `hf` backend's core, also used by warm-up and eval."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: tuple[int, ...]  # generated tokens, EOS included when the model stopped
    finish_reason: str  # "stop" (EOS) or "length" (max_new_tokens)


def generate(model, tokenizer, prompts: list[str], **kwargs) -> list[list[Completion]]:
    """`generate_ids` for already chat-formatted prompt strings."""
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    return generate_ids(model, tokenizer, ids, **kwargs)


@torch.no_grad()
def generate_ids(
    model,
    tokenizer,
    prompt_ids: list[list[int]],
    *,
    num_samples: int = 1,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    batch_size: int = 64,
) -> list[list[Completion]]:
    """`num_samples` completions for each prompt (token ids); temperature 0 decodes greedily.

    With a seed the result is reproducible: the RNG is forked, so the caller's random state is untouched.
    """
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    greedy = temperature <= 0
    sampling = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=temperature, top_p=top_p)
    per_prompt = 1 if greedy else num_samples  # greedy gives one answer per prompt: decode once, repeat it
    rows = model.get_output_embeddings().weight.shape[0]
    if rows > len(tokenizer):  # a padded vocabulary (Qwen2: 151,936 rows, fewer tokens): never sample an id
        sampling["suppress_tokens"] = list(range(len(tokenizer), rows))  # that decodes to nothing
    out: list[list[Completion]] = []
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        for start in range(0, len(prompt_ids), batch_size):
            chunk = prompt_ids[start : start + batch_size]
            width = max(len(p) for p in chunk)
            input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            attention = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, p in enumerate(chunk):  # left padding: every prompt ends where generation starts
                input_ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
                attention[i, width - len(p) :] = 1
            input_ids, attention = input_ids.to(model.device), attention.to(model.device)
            ids = model.generate(
                input_ids=input_ids,
                attention_mask=attention,
                past_key_values=shared_prefix(model, input_ids, attention, per_prompt),
                max_new_tokens=max_new_tokens,
                num_return_sequences=per_prompt,
                pad_token_id=pad,
                eos_token_id=eos,
                top_k=None,
                **sampling,
            )
            new = ids[:, width:].tolist()
            for i in range(len(chunk)):
                out.append([completion(tokenizer, new[i * per_prompt + j % per_prompt], eos) for j in range(num_samples)])
    return out


def shared_prefix(model, input_ids: torch.Tensor, attention: torch.Tensor, samples: int):
    """The KV cache of each prompt but its last token, computed once and repeated for its `samples` completions.

    `generate` with `num_return_sequences` repeats the prompts before its prefill, so K samples compute every
    prompt's keys and values K times: a third of an SPPO round (K = 8) on the demo's model. `generate` then runs the
    last prompt token (whose logits give the first sampled token) on this cache, so the samples are the same
    tokens, from the same random draws, as without it. None (plain `generate`) for one sample, one-token prompts, or
    a model whose cache cannot be repeated by row.
    """
    if samples == 1 or input_ids.shape[1] < 2 or not _takes_positions(model):
        return None
    positions = (attention.cumsum(-1) - 1).clamp(min=0)  # as `generate` numbers left-padded rows
    cache = model(input_ids=input_ids[:, :-1], attention_mask=attention[:, :-1], position_ids=positions[:, :-1],
                  use_cache=True).past_key_values
    if not hasattr(cache, "batch_repeat_interleave"):
        return None
    cache.batch_repeat_interleave(samples)
    return cache


def _takes_positions(model) -> bool:
    """Whether the model's forward accepts position_ids (the transformers LMs do; remote code may not)."""
    params = inspect.signature(model.forward).parameters
    return "position_ids" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def completion(tokenizer, tokens: list[int], eos: int) -> Completion:
    """Cut at the first EOS (kept) and decode; finish reason says whether the model stopped by itself."""
    if eos in tokens:
        tokens = tokens[: tokens.index(eos) + 1]
        reason = "stop"
    else:
        reason = "length"
    return Completion(tokenizer.decode(tokens, skip_special_tokens=True), tuple(tokens), reason)


def revise(
    answer: Callable[[list[str]], list[str]],
    tokenizer,
    prompts: list[str],
    responses: list[str],
    template: str,
    rounds: int = 1,
) -> list[list[str]]:
    """SRPO self-revision: `rounds` times, ask the policy to improve its previous answer.

    `answer` maps chat-formatted prompts to one response each (any backend). `prompts` are plain user prompts;
    each round formats `template` with {prompt} and {response} as a new user turn. Returns, per prompt, the
    chain [response, revision 1, …, revision N].
    """
    chains = [[r] for r in responses]
    for _ in range(rounds):
        for chain, text in zip(chains, answer(revision_asks(tokenizer, prompts, chains, template))):
            chain.append(text)
    return chains


def revision_asks(tokenizer, prompts: list[str], chains: list[list[str]], template: str) -> list[str]:
    """The next round's chat-formatted asks: `template` with each prompt and the last answer of its chain."""
    from selfplay.tasks.base import chat_prompt

    return [chat_prompt(tokenizer, template.format(prompt=p, response=c[-1])) for p, c in zip(prompts, chains)]
