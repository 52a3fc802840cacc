"""Summed response log-probabilities with the prompt masked out: logp(y) of docs/architecture.md, "Math and its
check values".

A batch is (prompt ⊕ response) token rows padded on either side; `response_mask` marks response tokens.
Padding side does not change the result: positions are derived from the attention mask.

A shared-prompt batch (`build_shared_batch`) holds each distinct prompt once: a preference pair's two responses
(and SRPO's revisions of one answer) then run their prompt once, not once per response. Same log-probs and
gradients, to float32 rounding; fewer tokens through the model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from selfplay.models import forward_parameters


def token_logprobs(logits: Tensor, input_ids: Tensor) -> Tensor:
    """log p(x_t | x_<t) for t = 1..T−1 → [B, T−1]. Computed in float32 via logsumexp (no [B,T,V] softmax copy)."""
    return _fp32_logprobs(logits[:, :-1], input_ids[:, 1:])


def masked_sum_logprobs(logits: Tensor, input_ids: Tensor, response_mask: Tensor,
                        chunk_tokens: int = 1024) -> tuple[Tensor, Tensor]:
    """Sum of log-probs over response tokens and their count, both [B].

    Only response positions are scored, `chunk_tokens` of them at a time in float32; in backward each chunk is
    recomputed rather than kept. So float32 logits never exist for every position and the whole vocabulary at
    once (at 48k positions × a 32k vocabulary that copy alone is ~6 GB); the result equals `token_logprobs`
    summed under the mask, to float32 rounding.
    """
    if logits.shape[:2] != input_ids.shape or input_ids.shape != response_mask.shape:
        raise ValueError(
            f"shape mismatch: logits {tuple(logits.shape)}, input_ids {tuple(input_ids.shape)}, "
            f"response_mask {tuple(response_mask.shape)}"
        )
    mask = response_mask[:, 1:].bool()
    rows, cols = mask.nonzero(as_tuple=True)  # position t predicts token t + 1
    picked, targets = logits[:, :-1][rows, cols], input_ids[:, 1:][rows, cols]  # [N, V] in the model's dtype
    parts = [_chunk_logprobs(picked[i : i + chunk_tokens], targets[i : i + chunk_tokens])
             for i in range(0, len(rows), chunk_tokens)]
    per_token = torch.cat(parts) if parts else logits.new_zeros(0, dtype=torch.float32)
    sums = torch.zeros(logits.shape[0], dtype=torch.float32, device=logits.device).index_add(0, rows, per_token)
    return sums, mask.sum(dim=-1).to(torch.float32)


def _fp32_logprobs(logits: Tensor, targets: Tensor) -> Tensor:
    """log p(target) from logits [..., V] and targets [...], in float32."""
    logits = logits.float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _chunk_logprobs(logits: Tensor, targets: Tensor) -> Tensor:
    if torch.is_grad_enabled() and logits.requires_grad:  # keep the model-dtype slice, not its float32 copy
        return torch.utils.checkpoint.checkpoint(_fp32_logprobs, logits, targets, use_reentrant=False)
    return _fp32_logprobs(logits, targets)


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """0, 1, 2, … over real tokens, whatever side the padding is on."""
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


def build_batch(
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    pad_id: int,
    padding_side: str = "right",
) -> dict[str, Tensor]:
    """Concatenate prompt and response tokens per example and pad to one length.

    Returns input_ids, attention_mask, response_mask and position_ids, all [B, T].
    """
    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(response_ids)} responses")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    rows = [list(p) + list(r) for p, r in zip(prompt_ids, response_ids)]
    width = max((len(r) for r in rows), default=0)
    batch = len(rows)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    response_mask = torch.zeros((batch, width), dtype=torch.long)
    for i, (p, row) in enumerate(zip(prompt_ids, rows)):
        start = width - len(row) if padding_side == "left" else 0
        input_ids[i, start : start + len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, start : start + len(row)] = 1
        response_mask[i, start + len(p) : start + len(row)] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "response_mask": response_mask,
        "position_ids": position_ids_from_mask(attention_mask),
    }


def left_pad(prompt_ids: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, attention mask), padded on the left: every prompt ends where its continuation starts (generation,
    `build_shared_batch`'s responses)."""
    width = max(len(p) for p in prompt_ids)
    input_ids = torch.full((len(prompt_ids), width), pad, dtype=torch.long)
    attention = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for i, p in enumerate(prompt_ids):
        input_ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        attention[i, width - len(p) :] = 1
    return input_ids, attention


def build_shared_batch(prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]],
                       pad_id: int) -> dict[str, Tensor]:
    """`build_batch`'s rows with each distinct prompt once: `prompt_ids` [P, Tp] left-padded (every prompt ends
    where its responses start), `prompt_of_row` [B] (row i's prompt), `response_ids` [B, Tr] right-padded, and
    their attention masks."""
    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(response_ids)} responses")
    distinct: dict[tuple[int, ...], int] = {}
    prompt_of_row = [distinct.setdefault(tuple(p), len(distinct)) for p in prompt_ids]
    ids, mask = left_pad(list(distinct), pad_id)
    longest = max((len(r) for r in response_ids), default=0)
    r_ids = torch.full((len(response_ids), longest), pad_id, dtype=torch.long)
    r_mask = torch.zeros((len(response_ids), longest), dtype=torch.long)
    for i, r in enumerate(response_ids):
        r_ids[i, :len(r)], r_mask[i, :len(r)] = torch.tensor(list(r), dtype=torch.long), 1
    return {"prompt_ids": ids, "prompt_mask": mask, "prompt_of_row": torch.tensor(prompt_of_row, dtype=torch.long),
            "response_ids": r_ids, "response_attention": r_mask}


def response_logprobs(model: torch.nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Run a causal LM on a `build_batch` or `build_shared_batch` batch → (summed response log-probs [B], response
    token counts [B])."""
    if "prompt_of_row" in batch:
        return _shared_prompt_logprobs(model, batch)
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        use_cache=False,
    )
    return masked_sum_logprobs(out.logits, batch["input_ids"], batch["response_mask"])


def _shared_prompt_logprobs(model: torch.nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Two forwards: the distinct prompts, keeping their keys and values (the graph runs through them, so the
    prompt tokens get the gradient of every response that attends to them), then every response over its prompt's
    cache row. The prompt's last position predicts each response's first token."""
    prompt_mask, rows = batch["prompt_mask"], batch["prompt_of_row"]
    last = {"logits_to_keep": 1} if "logits_to_keep" in forward_parameters(model) else {}
    out = model(input_ids=batch["prompt_ids"], attention_mask=prompt_mask,
                position_ids=position_ids_from_mask(prompt_mask), use_cache=True, **last)
    cache = out.past_key_values
    if cache is None:
        raise ValueError("a shared-prompt batch needs the model's KV cache (off under gradient checkpointing)")
    cache.batch_select_indices(rows)  # one cache row per response (a prompt's rows repeat)
    response, attention = batch["response_ids"], batch["response_attention"]
    start = prompt_mask.sum(dim=-1)[rows]  # each response's first position
    positions = start[:, None] + torch.arange(response.shape[1], device=response.device)
    tail = model(input_ids=response, attention_mask=torch.cat([prompt_mask[rows], attention], dim=-1),
                 position_ids=positions, past_key_values=cache, use_cache=True)
    logits = torch.cat([out.logits[:, -1:][rows], tail.logits], dim=1)  # column t predicts response token t
    first = response.new_zeros(len(rows), 1)  # stands for the prompt's last token: never a target
    return masked_sum_logprobs(logits, torch.cat([first, response], dim=1), torch.cat([first, attention], dim=1))

