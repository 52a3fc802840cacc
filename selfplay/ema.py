"""Exponential moving average of parameters: SAPO's EMA policy (docs/architecture.md, "Math and its check
values")."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn


@torch.no_grad()
def ema_update(ema: nn.Module | Iterable[Tensor], online: nn.Module | Iterable[Tensor], alpha: float) -> None:
    """θ_ema ← α θ_ema + (1 − α) θ, in place. α = 1 keeps the EMA unchanged; α = 0 copies θ.

    Modules are matched by parameter name so a reordered or mismatched model fails loudly instead of
    silently averaging the wrong tensors.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"EMA alpha must be in [0, 1], got {alpha}")
    pairs = _pairs(ema, online)
    for e, p in pairs:
        if e.shape != p.shape:
            raise ValueError(f"EMA shape mismatch: {tuple(e.shape)} vs {tuple(p.shape)}")
        e.mul_(alpha).add_(p.detach().to(e.dtype), alpha=1.0 - alpha)


def _pairs(ema, online) -> list[tuple[Tensor, Tensor]]:
    if isinstance(ema, nn.Module) and isinstance(online, nn.Module):
        ema_params = dict(ema.named_parameters())
        online_params = dict(online.named_parameters())
        if ema_params.keys() != online_params.keys():
            missing = sorted(ema_params.keys() ^ online_params.keys())[:5]
            raise ValueError(f"EMA and online models have different parameters, e.g. {missing}")
        return [(ema_params[n], online_params[n]) for n in ema_params]
    ema_list, online_list = list(ema), list(online)
    if len(ema_list) != len(online_list):
        raise ValueError(f"EMA has {len(ema_list)} tensors, online model has {len(online_list)}")
    return list(zip(ema_list, online_list))
