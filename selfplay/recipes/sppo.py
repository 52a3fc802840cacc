"""SPPO (arXiv 2405.00675): K samples per prompt from the current policy → K×K judge matrix → Hedge targets.

The reference model is the policy at the start of each iteration (`iterations` × `steps_per_iteration`).
"""

from __future__ import annotations

from selfplay.recipes.base import texts_of


class SPPORecipe:
    name = "sppo"
    weights = "policy"

    def __init__(self, cfg):
        self.k = cfg.sppo.k
        self.iterations = cfg.sppo.iterations

    def responses(self, results: list[dict]) -> int:
        """How many responses the generators sampled for these results."""
        return len(results) * self.k

    def request(self, generator, prompts, seed: int):
        return generator.sample.remote(prompts, k=self.k, seed=seed)

    def groups(self, results: list[dict]) -> list[dict]:
        return [
            {"prompt_id": r["prompt_id"], "prompt": r["prompt"], "policy_version": r["policy_version"],
             "candidates": texts_of(r.get("samples"))}
            for r in results
        ]

    def refresh_reference(self, step: int, total_steps: int) -> bool:
        """True at the first step of every iteration after the first: reference ← current policy."""
        per_iteration = max(1, total_steps // self.iterations)
        return step > 0 and step % per_iteration == 0
