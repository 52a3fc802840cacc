"""Judge outputs → K×K win probabilities → SPPO targets and the chosen/rejected pair (docs/architecture.md,
"Math and its check values").

Shapes: comparison logits C are [B, K, K] (C[b, i, j]: logit that sample i beats sample j for prompt b);
scores s are [B, K].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SPPOTargets:
    winner: Tensor  # [B] index of the chosen sample (argmax s)
    loser: Tensor  # [B] index of the rejected sample (argmin s)
    p_winner: Tensor  # [B] mean_j P[w, j], diagonal ½ included
    p_loser: Tensor  # [B] mean_j P[l, j]
    probs: Tensor  # [B, K, K] P[i, j] = σ(s_i − s_j)
    valid: Tensor  # [B] bool: False when all K samples tie (no pair to learn from)


def comparison_scores(logits: Tensor) -> Tensor:
    """s_i = mean_j (C[i, j] − C[j, i]): each sample's average advantage over the K samples."""
    _check_square(logits)
    return (logits - logits.transpose(-1, -2)).mean(dim=-1)


def win_probabilities(scores: Tensor) -> Tensor:
    """P[i, j] = σ(s_i − s_j); the diagonal is exactly ½ and P + Pᵀ = 1."""
    return torch.sigmoid(scores.unsqueeze(-1) - scores.unsqueeze(-2))


def sppo_targets_from_scores(scores: Tensor) -> SPPOTargets:
    if scores.dim() == 1:
        scores = scores.unsqueeze(0)
    if scores.dim() != 2 or scores.shape[-1] < 2:
        raise ValueError(f"scores must be [B, K] with K >= 2, got shape {tuple(scores.shape)}")
    if not torch.isfinite(scores).all():
        raise ValueError("scores contain NaN or inf; the judge returned non-finite values")
    probs = win_probabilities(scores)
    winner = scores.argmax(dim=-1)
    loser = scores.argmin(dim=-1)
    row_means = probs.mean(dim=-1)
    return SPPOTargets(
        winner=winner,
        loser=loser,
        p_winner=row_means.gather(-1, winner.unsqueeze(-1)).squeeze(-1),
        p_loser=row_means.gather(-1, loser.unsqueeze(-1)).squeeze(-1),
        probs=probs,
        valid=scores.max(dim=-1).values > scores.min(dim=-1).values,
    )


def sppo_targets(logits: Tensor) -> SPPOTargets:
    """SPPO targets from pairwise comparison logits C [B, K, K] (or [K, K])."""
    if logits.dim() == 2:
        logits = logits.unsqueeze(0)
    return sppo_targets_from_scores(comparison_scores(logits))


def probs_to_logits(probs: Tensor, eps: float = 1e-6) -> Tensor:
    """P(i ≻ j) → logit, clamped so that certain outcomes (0 or 1) stay finite."""
    p = probs.clamp(eps, 1 - eps)
    return torch.log(p) - torch.log1p(-p)


def _check_square(x: Tensor) -> None:
    if x.dim() < 2 or x.shape[-1] != x.shape[-2]:
        raise ValueError(f"expected [..., K, K] comparison matrices, got shape {tuple(x.shape)}")
