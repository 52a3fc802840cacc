"""Preference losses as pure functions of tensors (docs/architecture.md, "Check values"; docs/conventions.md).

Every loss takes response log-probabilities (see `selfplay.logprobs`) of shape [B] — summed over the response,
or per-token means with `train.loss_average: token_mean` (selfplay.objectives) — and returns a
per-example loss of shape [B]; the caller reduces. Notation: h(y) = logp_policy(y) - logp_ref(y).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def log_ratio(policy_logps: Tensor, ref_logps: Tensor) -> Tensor:
    """h(y) = log π(y) − log π_ref(y)."""
    return policy_logps - ref_logps


def dpo_loss(policy_w: Tensor, policy_l: Tensor, ref_w: Tensor, ref_l: Tensor, beta: float) -> Tensor:
    """DPO: −log σ(β (h_w − h_l))."""
    return -F.logsigmoid(beta * (log_ratio(policy_w, ref_w) - log_ratio(policy_l, ref_l)))


def ipo_loss(policy_w: Tensor, policy_l: Tensor, ref_w: Tensor, ref_l: Tensor, tau: float) -> Tensor:
    """IPO: ((h_w − h_l) − 1/(2τ))²."""
    margin = log_ratio(policy_w, ref_w) - log_ratio(policy_l, ref_l)
    return (margin - 1.0 / (2.0 * tau)) ** 2


def _log_odds(mean_logp: Tensor) -> Tensor:
    # log(p / (1 − p)) with p = exp(mean_logp) < 1; log1p(−exp(x)) is the stable form of log(1 − p).
    mean_logp = mean_logp.clamp(max=-1e-6)
    return mean_logp - torch.log1p(-torch.exp(mean_logp))


def orpo_loss(
    policy_w: Tensor, policy_l: Tensor, tokens_w: Tensor, tokens_l: Tensor, lam: float
) -> Tensor:
    """ORPO (reference-free): NLL of the chosen response + λ · −log σ(log odds_w − log odds_l).

    ORPO works on length-normalized likelihoods, so it takes the response token counts as well.
    """
    mean_w = policy_w / tokens_w.clamp(min=1)
    mean_l = policy_l / tokens_l.clamp(min=1)
    ratio = -F.logsigmoid(_log_odds(mean_w) - _log_odds(mean_l))
    return -mean_w + lam * ratio


def sppo_loss(
    policy_w: Tensor,
    policy_l: Tensor,
    ref_w: Tensor,
    ref_l: Tensor,
    p_w: Tensor,
    p_l: Tensor,
    beta: float,
) -> Tensor:
    """SPPO square loss toward the Hedge targets: (h_w − η(p_w − ½))² + (h_l − η(p_l − ½))², η = 1/β."""
    eta = 1.0 / beta
    target_w = eta * (p_w - 0.5)
    target_l = eta * (p_l - 0.5)
    return (log_ratio(policy_w, ref_w) - target_w) ** 2 + (log_ratio(policy_l, ref_l) - target_l) ** 2


def srpo_terms(
    rev_w_given_l: Tensor,
    rev_l_given_l: Tensor,
    rev_w_given_w: Tensor,
    rev_l_given_w: Tensor,
    h_w: Tensor,
    h_l: Tensor,
    beta: float,
) -> tuple[Tensor, Tensor]:
    """SRPO's two terms, from log-ratios (h†(a|b): revision a conditioned on previous response b).

    L_self = (½ − β[h†(w|l) − h†(l|l)])² + (½ − β[h†(w|w) − h†(l|w)])²
    L_gen  = (1 − β[h†(w|l) + h(w) − h†(l|w) − h(l)])²
    """
    l_self = (0.5 - beta * (rev_w_given_l - rev_l_given_l)) ** 2 + (
        0.5 - beta * (rev_w_given_w - rev_l_given_w)
    ) ** 2
    l_gen = (1.0 - beta * (rev_w_given_l + h_w - rev_l_given_w - h_l)) ** 2
    return l_self, l_gen


def srpo_loss(
    rev_w_given_l: Tensor,
    rev_l_given_l: Tensor,
    rev_w_given_w: Tensor,
    rev_l_given_w: Tensor,
    h_w: Tensor,
    h_l: Tensor,
    beta: float,
    alpha: float,
) -> Tensor:
    """SRPO: α L_self + (1 − α) L_gen. Arguments are log-ratios (policy minus reference), see `srpo_terms`."""
    l_self, l_gen = srpo_terms(rev_w_given_l, rev_l_given_l, rev_w_given_w, rev_l_given_w, h_w, h_l, beta)
    return alpha * l_self + (1.0 - alpha) * l_gen


def reward_margin(
    policy_w: Tensor, policy_l: Tensor, ref_w: Tensor, ref_l: Tensor, beta: float
) -> Tensor:
    """Implicit reward margin β(h_w − h_l), logged by learners as a training signal."""
    return beta * (log_ratio(policy_w, ref_w) - log_ratio(policy_l, ref_l))
