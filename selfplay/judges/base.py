"""The judge interface and what every judge shares: K×K matrices, SPPO targets and replay rows.

A judge answers P(a ≻ b) for (prompt, a, b) triples. From that the base class builds, per prompt, the K×K
comparison logits C[i, j] (antisymmetric, zero diagonal) and the win-probability matrix σ(C).
`judge_groups` turns them into replay rows; bad judge output (NaN, inf, a probability outside [0, 1]) and empty
responses are handled there, group by group, and counted (see JudgedGroups).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from selfplay.preference import SPPOTargets, comparison_scores, probs_to_logits, sppo_targets
from selfplay.tasks.base import response_text

# An empty response loses to any non-empty one with this logit (P ≈ 1 − 1e-6), without asking the judge.
EMPTY_LOSES_LOGIT = float(probs_to_logits(torch.tensor(1.0)))
PROB_TOLERANCE = 1e-6  # a judge's probability may overshoot [0, 1] by float error this much


class Judge:
    """Subclasses implement `compare`; `comparison_logits` may be overridden when a judge has a cheaper way."""

    name = "judge"

    def compare(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> Tensor:
        """P(a_i ≻ b_i | prompt_i) for each i → [N] in [0, 1]."""
        raise NotImplementedError

    def pair_logits(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> Tensor:
        """logit P(a_i ≻ b_i) → [N]; judges that compute logits natively override this instead of compare.

        A probability that is NaN, infinite or outside [0, 1] becomes a NaN logit: the comparison is invalid,
        and `judge_groups` drops (and counts) the group it belongs to instead of failing the whole batch."""
        p = self.compare(prompts, a, b).float()
        bad = ~torch.isfinite(p) | (p < -PROB_TOLERANCE) | (p > 1 + PROB_TOLERANCE)
        logits = probs_to_logits(p.clamp(0.0, 1.0))
        return torch.where(bad, torch.full_like(logits, float("nan")), logits)

    def comparison_logits(self, prompts: Sequence[str], candidates: Sequence[Sequence[str]]) -> Tensor:
        """[B, K, K] logits of P(i ≻ j), from one `pair_logits` call over every unordered pair."""
        k = _same_k(candidates)
        pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
        logits = torch.zeros(len(prompts), k, k, dtype=torch.float32)
        if not pairs or not prompts:
            return logits
        triples = [(p, c[i], c[j]) for p, c in zip(prompts, candidates) for i, j in pairs]
        upper = self.pair_logits(*map(list, zip(*triples))).float().reshape(len(prompts), len(pairs))
        for n, (i, j) in enumerate(pairs):
            logits[:, i, j] = upper[:, n]
            logits[:, j, i] = -upper[:, n]
        return logits

    def matrix(self, prompts: Sequence[str], candidates: Sequence[Sequence[str]]) -> Tensor:
        """[B, K, K] with P(i ≻ j); the diagonal is ½ and P + Pᵀ = 1. Strict: a judge output that is not a
        valid probability raises ValueError (`judge_groups` instead drops and counts the group)."""
        logits = self.comparison_logits(prompts, candidates)
        _check_finite(logits, self.name)
        return torch.sigmoid(logits)

    def scores(self, prompts: Sequence[str], candidates: Sequence[Sequence[str]], logits: Tensor | None = None) -> Tensor:
        """[B, K] per-candidate scores stored with replay rows; by default the comparison scores s_i."""
        if logits is None:
            logits = self.comparison_logits(prompts, candidates)
        return comparison_scores(logits)


SKIP_REASONS = ("tie", "invalid", "empty")


@dataclass
class JudgedGroups:
    """The judge's verdict on a batch of groups (one prompt with its K candidates each).

    Every group without a row is counted under exactly one reason:
      skipped_ties    — all K candidates tied: nothing to learn from;
      skipped_invalid — the judge gave NaN / ±inf / a probability outside [0, 1] for one of its comparisons,
                        or the group has fewer than 2 candidates: dropped, never a NaN in the buffer or loss;
      skipped_empty   — every candidate was an empty (whitespace-only) response.
    Empty responses in a group with a non-empty one are judged as losing to every non-empty candidate (and
    tie with each other) without asking the judge; `empty_responses` counts them.
    """

    logits: Tensor  # [B, K, K]; zeros for invalid groups
    probs: Tensor  # [B, K, K] P(i ≻ j); ½ everywhere for invalid groups
    scores: Tensor  # [B, K]; zeros for invalid groups
    targets: SPPOTargets
    rows: list[dict[str, Any] | None]  # one replay row (docs/architecture.md, "Replay rows") per group; None where skipped
    skipped_ties: int
    skipped_invalid: int = 0
    skipped_empty: int = 0
    empty_responses: int = 0
    skip_reasons: list[str | None] = field(default_factory=list)  # per group: None (has a row) or a SKIP_REASON

    def verdict(self, b: int) -> dict[str, Any]:
        """Everything about group b as plain Python, for sending to another process."""
        t = self.targets
        return {
            "probs": self.probs[b].tolist(),
            "scores": self.scores[b].tolist(),
            "winner": int(t.winner[b]),
            "loser": int(t.loser[b]),
            "p_winner": float(t.p_winner[b]),
            "p_loser": float(t.p_loser[b]),
            "valid": self.rows[b] is not None,
            "skip_reason": self.skip_reasons[b] if self.skip_reasons else None,
            "row": self.rows[b],
        }


def judge_groups(judge: Judge, groups: Sequence[dict[str, Any]], algorithm: str = "sppo") -> JudgedGroups:
    """Judge groups {prompt_id, prompt, candidates, policy_version[, candidates_prev]} of equal K and turn each
    into a (chosen = argmax s, rejected = argmin s) replay row with the SPPO targets p_chosen / p_rejected.

    Bad judge output or bad candidates never fail the batch: see JudgedGroups for what is skipped and counted."""
    prompts = [g["prompt"] for g in groups]
    candidates = [[response_text(c) for c in g["candidates"]] for g in groups]
    k, n = _same_k(candidates), len(groups)
    if k < 2:  # nothing to compare: every group is malformed
        logits = torch.zeros(n, k, k)
        return JudgedGroups(logits, torch.full_like(logits, 0.5), torch.zeros(n, k), _no_targets(n, k), [None] * n,
                            0, skipped_invalid=n, skip_reasons=["invalid"] * n)
    empty = torch.tensor([[not c.strip() for c in cands] for cands in candidates], dtype=torch.bool)
    logits = judge.comparison_logits(prompts, candidates).float().clone()
    if empty.any():
        # i empty, j not: i loses; both empty: a tie. Decided here, whatever the judge said about them.
        ei, ej = empty.unsqueeze(-1), empty.unsqueeze(-2)
        logits = torch.where(ei & ~ej, -EMPTY_LOSES_LOGIT, logits)
        logits = torch.where(~ei & ej, EMPTY_LOSES_LOGIT, logits)
        logits = torch.where(ei & ej, 0.0, logits)
    invalid = ~torch.isfinite(logits).flatten(1).all(dim=1)
    logits[invalid] = 0.0
    scores = judge.scores(prompts, candidates, logits).float().clone()
    invalid |= ~torch.isfinite(scores).all(dim=1)
    logits[invalid], scores[invalid] = 0.0, 0.0
    targets = sppo_targets(logits)
    all_empty = empty.all(dim=1)
    rows: list[dict[str, Any] | None] = []
    reasons: list[str | None] = []
    for b, g in enumerate(groups):
        if bool(invalid[b]):
            reason = "invalid"
        elif bool(all_empty[b]):
            reason = "empty"
        elif not bool(targets.valid[b]):
            reason = "tie"
        else:
            reason = None
        row = None if reason else _row(g, candidates[b], targets, scores, b, algorithm)
        if reason is None and row is None:
            reason = "invalid"
        rows.append(row)
        reasons.append(reason)
    return JudgedGroups(
        logits, torch.sigmoid(logits), scores, targets, rows,
        skipped_ties=reasons.count("tie"), skipped_invalid=reasons.count("invalid"),
        skipped_empty=reasons.count("empty"),
        empty_responses=int(empty[~invalid].sum()), skip_reasons=reasons,
    )


def _row(g: dict[str, Any], candidates: list[str], targets: SPPOTargets, scores: Tensor, b: int,
         algorithm: str) -> dict[str, Any] | None:
    """The replay row of group b; None if any number in it is not finite (a last guard for the buffer)."""
    w, lo = int(targets.winner[b]), int(targets.loser[b])
    prev = g.get("candidates_prev")
    numbers = (float(scores[b, w]), float(scores[b, lo]), float(targets.p_winner[b]), float(targets.p_loser[b]))
    if not all(math.isfinite(x) for x in numbers):
        return None
    return {
        "prompt_id": g["prompt_id"],
        "prompt": g["prompt"],
        "chosen": candidates[w],
        "rejected": candidates[lo],
        "score_chosen": numbers[0],
        "score_rejected": numbers[1],
        "p_chosen": numbers[2],
        "p_rejected": numbers[3],
        "policy_version": int(g.get("policy_version", 0)),
        "algorithm": algorithm,
        "chosen_prev": prev[w] if prev else None,
        "rejected_prev": prev[lo] if prev else None,
    }


def _no_targets(n: int, k: int) -> SPPOTargets:
    zeros = torch.zeros(n, dtype=torch.long)
    half = torch.full((n,), 0.5)
    return SPPOTargets(zeros, zeros, half, half, torch.full((n, k, k), 0.5), torch.zeros(n, dtype=torch.bool))


def _same_k(candidates: Sequence[Sequence[str]]) -> int:
    ks = {len(c) for c in candidates}
    if len(ks) > 1:
        raise ValueError(f"all prompts in one call need the same number of candidates, got {sorted(ks)}")
    return ks.pop() if ks else 0


def _check_finite(x: Tensor, name: str) -> None:
    if not torch.isfinite(x).all():
        raise ValueError(f"judge {name!r} returned NaN, inf or a probability outside [0, 1] for "
                         f"{int((~torch.isfinite(x)).sum())} comparison(s)")
