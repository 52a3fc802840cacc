"""What a recipe is (`Recipe`), and what every recipe does to generator output before it becomes a judge group.

Empty responses (a generator that returned "" or nothing at all) are not dropped here: every candidate stays in
its group, as text, and the judge step decides (selfplay.judges.base.judge_groups): an empty response loses to
every non-empty one and ties with other empty ones; a group of only empty responses is skipped and counted
(`skipped_empty`). Dropping them would hide a policy that learned to answer nothing, and keep it untrained.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol

from selfplay.tasks.base import response_text

Source = Literal["policy", "ema"]


@dataclass(frozen=True)
class LossSpec:
    name: str
    beta: float  # DPO/SPPO/SRPO β; IPO's τ
    alpha: float = 0.5  # SRPO's mix of L_self and L_gen
    orpo_lambda: float = 0.1
    revision_template: str = "{prompt}\n{response}"
    average: str = "sum"  # train.loss_average: "sum" or "token_mean" (ORPO: not applied, it uses means already)

    @property
    def needs_reference(self) -> bool:
        return self.name != "orpo"


@dataclass(frozen=True)
class EMA:
    """The learner keeps an EMA of the policy: ema ← alpha·ema + (1 − alpha)·policy every `every` steps."""
    alpha: float
    every: int


class Recipe(Protocol):
    """The single definition of an algorithm (docs/architecture.md, "Recipes"): the driver, the learners and the
    prompt loader ask it, and nothing outside `selfplay/recipes/` branches on the algorithm's name."""

    name: str
    weights: Source  # what generators serve
    ema: EMA | None  # whether the learners keep an EMA policy, and how it moves
    loss: LossSpec  # the loss and its parameters (`train.loss` overrides the algorithm's own)
    needs_reference_answers: bool  # every prompt must carry a reference answer

    def request(self, generator, prompts: list, seed: int, min_version: int = 0) -> Any:
        """The generator call for a batch of prompts (a Ray ObjectRef), served with weight version `min_version`
        or newer."""

    def responses(self, results: list[dict]) -> int:
        """How many responses the generators sampled for these results."""

    def groups(self, results: list[dict]) -> list[dict]:
        """Generator results → judge groups {prompt_id, prompt, candidates, policy_version[, candidates_prev]}."""

    def reference_refresh(self, step: int, total_steps: int) -> Source | None:
        """Before learner step `step` (0-based): the weights the reference model becomes, or None to keep it."""


def loss_spec(cfg, name: str) -> LossSpec:
    """Loss `name` (the algorithm's own, unless `train.loss` names another) with its parameters from `cfg`."""
    name = cfg.train.loss or name
    beta = {"sppo": cfg.sppo.beta, "srpo": cfg.srpo.beta}.get(name, cfg.sapo.beta)
    return LossSpec(name, beta, cfg.srpo.alpha, cfg.sapo.orpo_lambda, cfg.srpo.revision_template,
                    average=cfg.train.loss_average)


def text_of(sample: Any) -> str:
    """A generated response as text: a sample dict's "text", a plain string, or "" for None / a missing text."""
    return response_text(sample.get("text") if isinstance(sample, dict) else sample)


def texts_of(samples: Any) -> list[str]:
    """Every response of one prompt as text; None (no samples at all) is an empty list."""
    return [text_of(s) for s in (samples or [])]
