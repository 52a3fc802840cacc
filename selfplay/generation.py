"""Batched sampling with a transformers model: the `hf` backend's core, also used by warm-up and eval."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: tuple[int, ...]  # generated tokens, EOS included when the model stopped
    finish_reason: str  # "stop" (EOS) or "length" (max_new_tokens)


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[str],
    *,
    num_samples: int = 1,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    batch_size: int = 64,
) -> list[list[Completion]]:
    """`num_samples` completions for each already-formatted prompt; temperature 0 decodes greedily.

    With a seed the result is reproducible: the RNG is forked, so the caller's random state is untouched.
    """
    eos = tokenizer.eos_token_id
    out: list[list[Completion]] = []
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            enc = tokenizer(chunk, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
            greedy = temperature <= 0
            sampling = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=temperature, top_p=top_p)
            # greedy decoding gives one answer per prompt: decode once and repeat it
            per_prompt = 1 if greedy else num_samples
            ids = model.generate(
                **enc.to(model.device),
                max_new_tokens=max_new_tokens,
                num_return_sequences=per_prompt,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=eos,
                top_k=None,
                **sampling,
            )
            new = ids[:, enc["input_ids"].shape[1] :].tolist()
            for i in range(len(chunk)):
                out.append([_completion(tokenizer, new[i * per_prompt + j % per_prompt], eos) for j in range(num_samples)])
    return out


def _completion(tokenizer, tokens: list[int], eos: int) -> Completion:
    if eos in tokens:
        tokens = tokens[: tokens.index(eos) + 1]
        reason = "stop"
    else:
        reason = "length"
    return Completion(tokenizer.decode(tokens, skip_special_tokens=True), tuple(tokens), reason)


def revise(
    model,
    tokenizer,
    prompts: list[str],
    responses: list[str],
    template: str,
    *,
    rounds: int = 1,
    **sampling,
) -> list[list[str]]:
    """SRPO self-revision: `rounds` times, ask the policy to improve its previous answer.

    `prompts` are the plain user prompts; each round formats `template` with {prompt} and {response} as a new
    user turn. Returns, per prompt, the chain [response, revision 1, …, revision N].
    """
    from selfplay.tasks.base import chat_prompt

    chains = [[r] for r in responses]
    for _ in range(rounds):
        asks = [chat_prompt(tokenizer, template.format(prompt=p, response=c[-1])) for p, c in zip(prompts, chains)]
        for chain, out in zip(chains, generate(model, tokenizer, asks, **sampling)):
            chain.append(out[0].text)
    return chains
