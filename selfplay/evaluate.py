"""Head-to-head evaluation: win rate of policy A against policy B on held-out prompts, with any judge.

Both policies answer every prompt (optionally followed by N rounds of SRPO self-revision, the final revision
being the answer); the judge gives P(A ≻ B) per prompt and the win rate is its mean (ties count ½).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from selfplay.generation import generate, revise
from selfplay.tasks import Prompt, chat_prompt


@dataclass
class Answers:
    texts: list[str]
    task_score: float | None  # mean task score, when the task has a scorer


def answer(model, tokenizer, prompts: list[Prompt], *, revisions: int = 0, template: str = "{prompt}\n{response}",
           task=None, **sampling) -> Answers:
    texts = [c[0].text for c in generate(model, tokenizer, [chat_prompt(tokenizer, p) for p in prompts], **sampling)]
    if revisions:
        def reply(asks: list[str]) -> list[str]:
            return [c[0].text for c in generate(model, tokenizer, asks, **sampling)]

        chains = revise(reply, tokenizer, [p.text for p in prompts], texts, template, rounds=revisions)
        texts = [chain[-1] for chain in chains]
    return Answers(texts, task_score(task, prompts, texts))


def alpaca_eval_outputs(prompts: list[Prompt], answers: list[str], generator: str) -> list[dict[str, str]]:
    """AlpacaEval's `model_outputs.json` records: the instruction as asked, the model's answer, the model's name
    (alpaca_eval matches them to its references by instruction)."""
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    return [{"instruction": p.text, "output": a, "generator": generator} for p, a in zip(prompts, answers)]


def win_rate(judge, prompts: list[Prompt], a: list[str], b: list[str]) -> dict[str, float]:
    """Mean P(a ≻ b) over `prompts` by `judge`, with its standard error (`win_rate_of`)."""
    return win_rate_of(judge.compare([x.text for x in prompts], a, b))


def win_rate_of(p: torch.Tensor | list[float]) -> dict[str, float]:
    """Mean P(a ≻ b) with its standard error, and the wins/ties/losses behind it. Comparisons the judge could not
    score (NaN / inf / outside [0, 1]) are left out and counted in `invalid`, so one bad score cannot make the
    whole evaluation NaN."""
    p = torch.as_tensor(p, dtype=torch.float64)
    valid = torch.isfinite(p) & (p >= 0) & (p <= 1)
    invalid = int((~valid).sum())
    p = p[valid]
    n = len(p)
    if n == 0:
        raise ValueError(f"the judge returned no valid score for any of the {len(valid)} evaluation comparisons")
    return {
        "winrate": p.mean().item(),
        "stderr": (p.std(unbiased=True).item() / math.sqrt(n)) if n > 1 else float("nan"),
        "wins": int((p > 0.5).sum()),
        "ties": int((p == 0.5).sum()),
        "losses": int((p < 0.5).sum()),
        "n": n,
        "invalid": invalid,
    }


def task_score(task, prompts: list[Prompt], answers: list[str]) -> float | None:
    """The mean task score of `answers`, when the task has a scorer."""
    return None if task is None else sum(task.score(p.text, t) for p, t in zip(prompts, answers)) / len(prompts)


def head_to_head(model_a, model_b, tokenizer_a, tokenizer_b, prompts, judge, *, seed: int = 0, task=None,
                 revisions: int = 0, template: str = "{prompt}\n{response}", **sampling) -> dict:
    """Both policies answer (different sampling seeds, so a policy against itself shows the noise floor)."""
    with torch.no_grad():
        a = answer(model_a, tokenizer_a, prompts, revisions=revisions, template=template, task=task,
                   seed=seed, **sampling)
        b = answer(model_b, tokenizer_b, prompts, revisions=revisions, template=template, task=task,
                   seed=seed + 1, **sampling)
    result = win_rate(judge, prompts, a.texts, b.texts)
    result.update(task_score_a=a.task_score, task_score_b=b.task_score, revisions=revisions)
    result["examples"] = [
        {"prompt": p.text, "a": x, "b": y} for p, x, y in list(zip(prompts, a.texts, b.texts))[:5]
    ]
    return result


def eval_sampling(cfg) -> dict:
    """A run's evaluation settings: `eval.temperature`, the run's top-p and generation length."""
    return {"temperature": cfg.eval.temperature, "top_p": cfg.generation.top_p,
            "max_new_tokens": cfg.generation.max_new_tokens}


EVAL_SEED = 7  # the policy answers with seed + 7, the initial policy with seed + 8


def against_initial(cfg, model, initial_policy: str, prompts: list[Prompt], judge, task=None, tokenizer=None) -> dict:
    """`model` against the run's initial policy with the run's evaluation settings (`eval_sampling`, seed + 7):
    what a run reports as `winrate_vs_initial` (actors/evaluation.py, on the generators), in one process."""
    from selfplay.models import load_causal_lm, load_tokenizer

    tok = tokenizer if tokenizer is not None else load_tokenizer(initial_policy, cfg.model.trust_remote_code)
    initial = load_causal_lm(initial_policy, cfg.model.dtype, cfg.model.trust_remote_code, tok)
    with torch.no_grad():
        return head_to_head(model, initial, tok, tok, prompts, judge, seed=cfg.seed + EVAL_SEED, task=task,
                            **eval_sampling(cfg))
