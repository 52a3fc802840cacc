"""Rule judges for verifiable tasks: the task's programmatic score, turned into Bradley-Terry probabilities.

P(a ≻ b) = σ((score_a − score_b) / temperature); equal scores give exactly ½.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from selfplay.judges.base import Judge, _same_k


class RuleJudge(Judge):
    name = "rule"

    def __init__(self, task, temperature: float = 0.1):
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.task, self.temperature = task, temperature

    def task_scores(self, prompts: Sequence[str], responses: Sequence[str]) -> Tensor:
        return torch.tensor([self.task.score(p, r) for p, r in zip(prompts, responses)], dtype=torch.float32)

    def compare(self, prompts, a, b) -> Tensor:
        return torch.sigmoid((self.task_scores(prompts, a) - self.task_scores(prompts, b)) / self.temperature)

    def comparison_logits(self, prompts, candidates) -> Tensor:
        k = _same_k(candidates)
        flat = self.task_scores([p for p in prompts for _ in range(k)], [c for cands in candidates for c in cands])
        s = flat.reshape(len(prompts), k)
        return (s.unsqueeze(-1) - s.unsqueeze(-2)) / self.temperature

    def scores(self, prompts, candidates, logits=None) -> Tensor:
        """The task's own scores, so replay rows carry interpretable numbers."""
        k = _same_k(candidates)
        flat = self.task_scores([p for p in prompts for _ in range(k)], [c for cands in candidates for c in cands])
        return flat.reshape(len(prompts), k)
