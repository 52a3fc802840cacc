"""SPPO (arXiv 2405.00675): K samples per prompt from the current policy → K×K judge matrix → Hedge targets.

Generators serve the policy; no EMA; loss `sppo` (docs/architecture.md, "Losses"); the reference model is the
policy at the start of each iteration (`sppo.iterations` equal parts of `train.steps`).
"""

from __future__ import annotations

from selfplay.recipes.base import Source, loss_spec, texts_of


class SPPORecipe:
    name = "sppo"
    weights = "policy"
    ema = None
    needs_reference_answers = False

    def __init__(self, cfg):
        self.k = cfg.sppo.k
        self.iterations = cfg.sppo.iterations
        self.loss = loss_spec(cfg, "sppo")

    def responses(self, results: list[dict]) -> int:
        return len(results) * self.k

    def request(self, generator, prompts, seed: int, min_version: int = 0):
        return generator.sample.remote(prompts, k=self.k, seed=seed, min_version=min_version)

    def groups(self, results: list[dict]) -> list[dict]:
        return [
            {"prompt_id": r["prompt_id"], "prompt": r["prompt"], "policy_version": r["policy_version"],
             "candidates": texts_of(r.get("samples"))}
            for r in results
        ]

    def reference_refresh(self, step: int, total_steps: int) -> Source | None:
        """The policy, at the first step of every iteration after the first."""
        per_iteration = max(1, total_steps // self.iterations)
        return "policy" if step > 0 and step % per_iteration == 0 else None
