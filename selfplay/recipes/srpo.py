"""SRPO (arXiv 2406.01660): K responses from the policy, then a self-revision y' = π(· | x, y₁, "improve") of the
first. The judge ranks the K answers and the revision together; the best and the worst become the pair, and the
SRPO loss trains both self-revision (y_w | y_l, …) and direct generation on it. With K = 1 the pair is simply
(y, y'); a larger K gives pairs whose quality differs more, which the tiny demo model needs to learn from.
Generators serve the policy; no EMA; the reference stays the initial policy.
"""

from __future__ import annotations

from selfplay.recipes.base import Source, loss_spec, texts_of


class SRPORecipe:
    name = "srpo"
    weights = "policy"
    ema = None
    needs_reference_answers = False

    def __init__(self, cfg):
        self.rounds = max(1, cfg.srpo.revisions)
        self.k = cfg.srpo.k
        self.loss = loss_spec(cfg, "srpo")

    def responses(self, results: list[dict]) -> int:
        return len(results) * (self.k + self.rounds)

    def request(self, generator, prompts, seed: int, min_version: int = 0):
        return generator.sample_and_revise.remote(prompts, k=self.k, rounds=self.rounds, seed=seed,
                                                  min_version=min_version)

    def groups(self, results: list[dict]) -> list[dict]:
        # candidates: the K answers and the last revision of the first; the revision's "previous" is that answer
        out = []
        for r in results:
            samples, chain = texts_of(r.get("samples")), texts_of(r.get("chain"))
            group = {"prompt_id": r["prompt_id"], "prompt": r["prompt"], "policy_version": r["policy_version"],
                     "candidates": samples}  # no revision came back: the K answers alone (K < 2 is a counted skip)
            if len(chain) >= 2:
                group.update(candidates=[*samples, chain[-1]], candidates_prev=[None] * len(samples) + [chain[-2]])
            out.append(group)
        return out

    def reference_refresh(self, step: int, total_steps: int) -> Source | None:
        return None
