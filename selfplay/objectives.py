"""From replay rows to a preference loss: tokenize pairs, score them under policy and reference, apply the
algorithm's loss from `selfplay.losses`. Pure torch — learners call it with their (DeepSpeed) module.

Which loss: the recipe's (`selfplay.recipes`: SPPO → sppo, SRPO → srpo, SAPO → `sapo.loss`); `train.loss` overrides.
`train.loss_average`: sum (default: the papers' sequence log-probs) or token_mean (each response's log-probs, policy
and reference, pairs and SRPO revisions, divided by its response token count, as TRL's IPO) — applied before the
loss. ORPO always uses per-token means (`losses.orpo_loss`), so the key does not apply to it (docs/conventions.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from selfplay import losses
from selfplay.logprobs import build_batch, build_shared_batch, response_logprobs
from selfplay.recipes.base import LossSpec
from selfplay.tasks.base import chat_prompt

AVERAGES = ("sum", "token_mean")


def loss_spec(cfg) -> LossSpec:
    """The loss a `Config` asks for: its recipe's (selfplay.recipes)."""
    from selfplay.recipes import make_recipe

    return make_recipe(cfg).loss


def _encode(tokenizer, prompts: Sequence[str], responses: Sequence[str], max_prompt: int | None,
            max_response: int | None, share_prompts: bool) -> dict[str, Tensor]:
    """A right-padded batch (`share_prompts`: each distinct prompt once, `build_shared_batch`); prompts longer
    than `max_prompt` tokens keep their end (the question is usually last), responses longer than `max_response`
    keep their start. `*_truncated` [B] flags the rows cut."""
    p_ids = _token_ids(tokenizer, prompts, lambda p: chat_prompt(tokenizer, p))
    r_ids = _token_ids(tokenizer, responses, lambda r: r + tokenizer.eos_token)
    cut_p = [max_prompt is not None and len(ids) > max_prompt for ids in p_ids]
    cut_r = [max_response is not None and len(ids) > max_response for ids in r_ids]
    p_ids = [ids[-max_prompt:] if cut else ids for ids, cut in zip(p_ids, cut_p)]
    r_ids = [ids[:max_response] if cut else ids for ids, cut in zip(r_ids, cut_r)]
    batch = (build_shared_batch(p_ids, r_ids, tokenizer.pad_token_id) if share_prompts
             else build_batch(p_ids, r_ids, tokenizer.pad_token_id, padding_side="right"))
    return {**batch,
            "prompt_truncated": torch.tensor(cut_p), "response_truncated": torch.tensor(cut_r)}


def _token_ids(tokenizer, texts: Sequence[str], render) -> list[list[int]]:
    """Token ids of `render(text)` for each text; each distinct text is rendered and tokenized once, all in one
    batch call (a pair repeats its prompt, SRPO's revisions their responses; per-text calls took ~7 % of a demo step)."""
    distinct = list(dict.fromkeys(texts))
    ids = tokenizer([render(t) for t in distinct], add_special_tokens=False)["input_ids"] if distinct else []
    by_text = dict(zip(distinct, ids))
    return [by_text[t] for t in texts]


def encode_rows(tokenizer, rows: dict[str, Sequence[Any]], spec: LossSpec, max_prompt_tokens: int | None = None,
                max_response_tokens: int | None = None, share_prompts: bool = False) -> dict[str, dict[str, Tensor]]:
    """Token batches the loss needs: `pairs` = chosen rows then rejected rows (one batch); for SRPO also
    `revisions` = w|l, l|l, w|w, l|w: each response as a revision of the rejected / the chosen one. Prompts and
    responses beyond the `train.max_*_tokens` limits are cut (see `_encode`). `share_prompts` (`train.share_prompts`):
    the responses of one prompt run it once — a pair's two, the revisions' two per given answer."""
    prompts, chosen, rejected = list(rows["prompt"]), list(rows["chosen"]), list(rows["rejected"])
    limits = (max_prompt_tokens, max_response_tokens, share_prompts)
    out = {"pairs": _encode(tokenizer, prompts * 2, chosen + rejected, *limits)}
    if spec.name == "srpo":
        t = spec.revision_template
        given_l = [t.format(prompt=p, response=r) for p, r in zip(prompts, rejected)]
        given_w = [t.format(prompt=p, response=c) for p, c in zip(prompts, chosen)]
        out["revisions"] = _encode(tokenizer, given_l * 2 + given_w * 2, chosen + rejected + chosen + rejected,
                                   *limits)
    return out


def _logps(model, batches: dict[str, dict[str, Tensor]], device) -> dict[str, tuple[Tensor, Tensor]]:
    return {k: response_logprobs(model, {n: v.to(device) for n, v in b.items()}) for k, b in batches.items()}


def _averaged(logps: dict[str, tuple[Tensor, Tensor]], spec: LossSpec) -> dict[str, tuple[Tensor, Tensor]]:
    """token_mean: (summed log-prob / response tokens, tokens) per batch; sum, or ORPO: unchanged."""
    if spec.average != "token_mean" or spec.name == "orpo":
        return logps
    return {k: (lp / nt.clamp(min=1).to(lp), nt) for k, (lp, nt) in logps.items()}


def preference_loss(
    policy,
    reference,
    batches: dict[str, dict[str, Tensor]],
    spec: LossSpec,
    p_chosen: Tensor | None = None,
    p_rejected: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-example loss [B] and per-example metrics (reward margin, log-probs, response tokens).

    With `spec.average == "token_mean"` every log-prob (policy and reference; pairs and SRPO revisions) is the
    per-token mean of its response before any loss is applied, and the metrics report those means; ORPO is left
    as is (it takes sums and counts).
    """
    if spec.average not in AVERAGES:
        raise ValueError(f"unknown loss average {spec.average!r}; use one of {AVERAGES}")
    device = batches["pairs"]["prompt_truncated"].device
    pol = _averaged(_logps(policy, batches, device), spec)
    logp, ntok = pol["pairs"]
    n = logp.shape[0] // 2
    pi_w, pi_l = logp[:n], logp[n:]
    if spec.needs_reference:
        with torch.no_grad():
            ref = _averaged(_logps(reference, batches, device), spec)
        ref_w, ref_l = ref["pairs"][0][:n], ref["pairs"][0][n:]
    else:
        ref_w = ref_l = torch.zeros_like(pi_w)
    if spec.name == "dpo":
        loss = losses.dpo_loss(pi_w, pi_l, ref_w, ref_l, spec.beta)
    elif spec.name == "ipo":
        loss = losses.ipo_loss(pi_w, pi_l, ref_w, ref_l, spec.beta)
    elif spec.name == "orpo":
        loss = losses.orpo_loss(pi_w, pi_l, ntok[:n], ntok[n:], spec.orpo_lambda)
    elif spec.name == "sppo":
        if p_chosen is None or p_rejected is None:
            raise ValueError("the SPPO loss needs p_chosen and p_rejected for every row")
        loss = losses.sppo_loss(pi_w, pi_l, ref_w, ref_l, p_chosen.to(pi_w), p_rejected.to(pi_w), spec.beta)
    elif spec.name == "srpo":
        h_rev = pol["revisions"][0] - ref["revisions"][0]
        w_l, l_l, w_w, l_w = h_rev.split(n)
        loss = losses.srpo_loss(w_l, l_l, w_w, l_w, pi_w - ref_w, pi_l - ref_l, spec.beta, spec.alpha)
    else:
        raise ValueError(f"unknown loss {spec.name!r}")
    metrics = {
        "reward_margin": losses.reward_margin(pi_w, pi_l, ref_w, ref_l, spec.beta).detach(),
        "logp_chosen": pi_w.detach(),
        "logp_rejected": pi_l.detach(),
        "tokens": (ntok[:n] + ntok[n:]).detach(),
    }
    return loss, metrics
