"""A run's evaluation on its own actors: the policy against the initial one on held-out prompts, answered by the
generators' engines and scored by the judge actors. The driver loads no model; it splits the prompts and
aggregates (docs/architecture.md, "The driver": evaluation).

- The initial policy answers once per attempt, at its start, while every generator still serves version 0.
- When an evaluation is due (`eval.every`, `eval.every_seconds`), learner rank 0 writes the policy — what it
  publishes, streamed a tensor at a time — to `out_dir/evals/step_N.safetensors` (shared storage on a cluster);
  the files are evaluated after the training loop (inside it the learners only write them), then deleted. The
  final policy is read from the final checkpoint.
- To evaluate a file, every generator loads it (`load_policy_file`) and answers its share of the prompts; the
  judges compare each share with the initial answers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from actors.remote import get_all
from selfplay.evaluate import EVAL_SEED, eval_sampling, task_score, win_rate_of
from selfplay.tasks import Prompt

TIMEOUT_S = 3600.0  # one share of the held-out prompts answered, or judged


class Evaluation:
    def __init__(self, cfg, prompts: list[Prompt], task, generators: list, judges: list):
        self.cfg, self.prompts, self.task = cfg, prompts, task
        self.generators, self.judges = generators, judges
        # contiguous shares, one per generator (answers come back in prompt order)
        n, g = len(prompts), len(generators)
        self.shares = [prompts[i * n // g : (i + 1) * n // g] for i in range(g)]
        self.initial: list[str] | None = None

    def _answer(self, seed: int) -> list[str]:
        """Every generator answers its share with the weights it serves now."""
        sampling = eval_sampling(self.cfg)
        refs = {i: g.answer.remote(share, seed=seed, **sampling)  # Prompts: a multi-turn chat stays one
                for i, (g, share) in enumerate(zip(self.generators, self.shares)) if share}
        answers = get_all(refs, TIMEOUT_S, "evaluation answers", "generator")
        return [text for i in sorted(answers) for text in answers[i]]

    def answer_initial(self) -> None:
        """At an attempt's start, before any push: the initial policy's answers, which every later evaluation of
        this attempt compares against."""
        self.initial = self._answer(self.cfg.seed + EVAL_SEED + 1)

    def evaluate(self, step: int, policy_file: str | Path) -> dict[str, Any]:
        """The policy in `policy_file` (learner step `step`) against the initial answers: {step,
        winrate_vs_initial, stderr, task_score, initial_task_score, n}. Generators serve it from here on: they
        take no training request until a pushed version loads."""
        get_all({i: g.load_policy_file.remote(str(policy_file)) for i, g in enumerate(self.generators)}, TIMEOUT_S,
                "load the evaluation policy", "generator")
        answers = self._answer(self.cfg.seed + EVAL_SEED)
        bounds, refs = 0, {}
        for i, share in enumerate(self.shares):  # each share to a judge, round robin
            if share:
                a, b = answers[bounds : bounds + len(share)], self.initial[bounds : bounds + len(share)]
                refs[i] = self.judges[i % len(self.judges)].compare.remote([p.text for p in share], a, b)
                bounds += len(share)
        scores = get_all(refs, TIMEOUT_S, "evaluation judgements", "judge")
        result = win_rate_of([p for i in sorted(scores) for p in scores[i]])
        return {"step": step, "winrate_vs_initial": result["winrate"], "stderr": result["stderr"],
                "task_score": task_score(self.task, self.prompts, answers),
                "initial_task_score": task_score(self.task, self.prompts, self.initial), "n": result["n"]}
