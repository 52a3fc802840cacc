"""SRPO (arXiv 2406.01660): a response y from the policy, then a self-revision y' = π(· | x, y, "improve").
The judge decides which of y, y' wins; the SRPO loss trains both the revision and the direct generation.
"""

from __future__ import annotations


class SRPORecipe:
    name = "srpo"
    weights = "policy"

    def __init__(self, cfg):
        self.rounds = max(1, cfg.srpo.revisions)

    def responses(self, results: list[dict]) -> int:
        """How many responses the generators sampled for these results."""
        return len(results) * self.rounds + 1

    def request(self, generator, prompts, seed: int):
        return generator.sample_and_revise.remote(prompts, rounds=self.rounds, seed=seed)

    def groups(self, results: list[dict]) -> list[dict]:
        # candidates: the first answer and its last revision; the revision's "previous" is the first answer
        return [
            {"prompt_id": r["prompt_id"], "prompt": r["prompt"], "policy_version": r["policy_version"],
             "candidates": [r["chain"][0], r["chain"][-1]], "candidates_prev": [None, r["chain"][0]]}
            for r in results
        ]

    def refresh_reference(self, step: int, total_steps: int) -> bool:
        return False
