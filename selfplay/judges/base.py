"""The judge interface and what every judge shares: K×K matrices, SPPO targets and replay rows.

A judge answers P(a ≻ b) for (prompt, a, b) triples. From that the base class builds, per prompt, the K×K
comparison logits C[i, j] (antisymmetric, zero diagonal) and the win-probability matrix σ(C).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from selfplay.preference import SPPOTargets, comparison_scores, probs_to_logits, sppo_targets


class Judge:
    """Subclasses implement `compare`; `comparison_logits` may be overridden when a judge has a cheaper way."""

    name = "judge"

    def compare(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> Tensor:
        """P(a_i ≻ b_i | prompt_i) for each i → [N] in [0, 1]."""
        raise NotImplementedError

    def pair_logits(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> Tensor:
        """logit P(a_i ≻ b_i) → [N]; judges that compute logits natively override this instead of compare."""
        p = self.compare(prompts, a, b).float()
        _check_finite(p, self.name)
        return probs_to_logits(p)

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
        """[B, K, K] with P(i ≻ j); the diagonal is ½ and P + Pᵀ = 1."""
        return torch.sigmoid(self.comparison_logits(prompts, candidates))

    def scores(self, prompts: Sequence[str], candidates: Sequence[Sequence[str]], logits: Tensor | None = None) -> Tensor:
        """[B, K] per-candidate scores stored with replay rows; by default the comparison scores s_i."""
        if logits is None:
            logits = self.comparison_logits(prompts, candidates)
        return comparison_scores(logits)


@dataclass
class JudgedGroups:
    """The judge's verdict on a batch of groups (one prompt with its K candidates each)."""

    logits: Tensor  # [B, K, K]
    probs: Tensor  # [B, K, K] P(i ≻ j)
    scores: Tensor  # [B, K]
    targets: SPPOTargets
    rows: list[dict[str, Any] | None]  # one replay row (DESIGN.md §5) per group; None where all K tied
    skipped_ties: int  # groups whose K candidates all tied: nothing to learn from

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
            "valid": bool(t.valid[b]),
            "row": self.rows[b],
        }


def judge_groups(judge: Judge, groups: Sequence[dict[str, Any]], algorithm: str = "sppo") -> JudgedGroups:
    """Judge groups {prompt_id, prompt, candidates, policy_version[, candidates_prev]} of equal K and turn each
    into a (chosen = argmax s, rejected = argmin s) replay row with the SPPO targets p_chosen / p_rejected."""
    prompts = [g["prompt"] for g in groups]
    candidates = [list(g["candidates"]) for g in groups]
    logits = judge.comparison_logits(prompts, candidates)
    _check_finite(logits, judge.name)
    scores = judge.scores(prompts, candidates, logits)
    targets = sppo_targets(logits)
    rows: list[dict[str, Any] | None] = []
    for b, g in enumerate(groups):
        if not bool(targets.valid[b]):
            rows.append(None)
            continue
        w, lo = int(targets.winner[b]), int(targets.loser[b])
        prev = g.get("candidates_prev")
        rows.append(
            {
                "prompt_id": g["prompt_id"],
                "prompt": g["prompt"],
                "chosen": candidates[b][w],
                "rejected": candidates[b][lo],
                "score_chosen": float(scores[b, w]),
                "score_rejected": float(scores[b, lo]),
                "p_chosen": float(targets.p_winner[b]),
                "p_rejected": float(targets.p_loser[b]),
                "policy_version": int(g.get("policy_version", 0)),
                "algorithm": algorithm,
                "chosen_prev": prev[w] if prev else None,
                "rejected_prev": prev[lo] if prev else None,
            }
        )
    skipped = sum(r is None for r in rows)
    return JudgedGroups(logits, torch.sigmoid(logits), scores, targets, rows, skipped)


def _same_k(candidates: Sequence[Sequence[str]]) -> int:
    ks = {len(c) for c in candidates}
    if len(ks) > 1:
        raise ValueError(f"all prompts in one call need the same number of candidates, got {sorted(ks)}")
    return ks.pop() if ks else 0


def _check_finite(x: Tensor, name: str) -> None:
    if not torch.isfinite(x).all():
        raise ValueError(f"judge {name!r} returned NaN or inf for {int((~torch.isfinite(x)).sum())} comparison(s)")
