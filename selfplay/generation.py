"""Batched sampling with a transformers model: the `hf` backend's core, also used by warm-up and eval."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from selfplay.logprobs import left_pad
from selfplay.models import forward_parameters


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
    per_prompt = 1 if temperature <= 0 else num_samples  # greedy gives one answer per prompt: decode once, repeat
    by_row = _takes_positions(model)
    out: list[list[Completion]] = []
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        for start in range(0, len(prompt_ids), batch_size):
            chunk = prompt_ids[start : start + batch_size]
            input_ids, attention = (t.to(model.device) for t in left_pad(chunk, pad))
            args = (model, input_ids, attention, per_prompt, max_new_tokens, temperature, top_p, len(tokenizer), eos)
            new = decode(*args) if by_row else transformers_generate(*args, pad)
            for i in range(len(chunk)):
                out.append([completion(tokenizer, new[i * per_prompt + j % per_prompt], eos) for j in range(num_samples)])
    return out


def decode(model, input_ids: torch.Tensor, attention: torch.Tensor, samples: int, max_new_tokens: int,
           temperature: float, top_p: float, vocab: int, eos: int) -> list[list[int]]:
    """`samples` continuations of each left-padded prompt, row i·samples + j for prompt i; each ends at EOS or
    after `max_new_tokens`.

    Why not `model.generate`: it repeats each prompt K times before its prefill, and keeps a finished row in the
    batch until the longest one ends. Here each prompt's keys and values are computed once and repeated for its K
    rows, and a row leaves the batch (and its cache) at its EOS: SPPO's samples use about half of their token
    budget, so half of `generate`'s decode work was on rows that had already stopped.
    """
    positions = (attention.cumsum(-1) - 1).clamp(min=0)  # left-padded rows count from their first token
    last = {"logits_to_keep": 1} if "logits_to_keep" in forward_parameters(model) else {}
    step = model(input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=True, **last)
    cache, logits = step.past_key_values, step.logits[:, -1].repeat_interleave(samples, 0)
    cache.batch_repeat_interleave(samples)
    attention = attention.repeat_interleave(samples, 0)
    rows = torch.arange(attention.shape[0], device=attention.device)  # each live row's index in the output
    out: list[list[int]] = [[] for _ in range(attention.shape[0])]
    for t in range(max_new_tokens):
        token = sample_next(logits, temperature, top_p, vocab)
        for row, tok in zip(rows.tolist(), token.tolist()):
            out[row].append(tok)
        live = token != eos if eos is not None else torch.ones_like(token, dtype=torch.bool)
        if t == max_new_tokens - 1 or not live.any():
            break
        if not live.all():  # finished rows leave the batch, their cache with them
            keep = live.nonzero().squeeze(-1)
            rows, token, attention = rows[keep], token[keep], attention[keep]
            cache.batch_select_indices(keep)
        attention = torch.cat([attention, attention.new_ones((attention.shape[0], 1))], dim=-1)
        step = model(input_ids=token[:, None], attention_mask=attention, position_ids=attention.sum(-1, keepdim=True) - 1,
                     past_key_values=cache, use_cache=True)
        cache, logits = step.past_key_values, step.logits[:, -1]
    return out


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, vocab: int) -> torch.Tensor:
    """One token per row: greedy at temperature 0, else from softmax(logits / T) within the top-p nucleus (the
    smallest set of tokens whose probability reaches `top_p`). Ids ≥ `vocab` (a padded embedding matrix, e.g.
    Qwen2's 151,936 rows) decode to nothing and are never drawn."""
    logits = logits[:, :vocab].float()
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # the mass before a token already reaches top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
    return torch.multinomial(probs, 1).squeeze(-1)


def transformers_generate(model, input_ids, attention, samples, max_new_tokens, temperature, top_p, vocab, eos,
                          pad) -> list[list[int]]:
    """`decode` by `model.generate`, for a model whose forward takes no position ids (remote code: the left-padded
    rows' positions are then the model's own business); each prompt is prefilled once per sample, and a finished
    row stays in the batch (padded) until the last one ends. `benchmarks.generation` times `decode` against it."""
    sampling = dict(do_sample=False) if temperature <= 0 else dict(do_sample=True, temperature=temperature, top_p=top_p)
    rows = model.get_output_embeddings().weight.shape[0]
    if rows > vocab:
        sampling["suppress_tokens"] = list(range(vocab, rows))
    ids = model.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=max_new_tokens,
                         num_return_sequences=samples, pad_token_id=pad, eos_token_id=eos, top_k=None, **sampling)
    return ids[:, input_ids.shape[1]:].tolist()


def _takes_positions(model) -> bool:
    """Whether the model's forward accepts position_ids (the transformers LMs do; remote code may not)."""
    params = forward_parameters(model)
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
