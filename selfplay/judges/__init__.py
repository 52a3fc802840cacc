"""Judges: PairRM (learned, pairwise) and rule judges (a verifiable task's scorer) behind one interface."""

from selfplay.judges.base import Judge, JudgedGroups, judge_groups
from selfplay.judges.rule import RuleJudge


def make_judge(judge_cfg, task_cfg=None) -> Judge:
    """A judge from config sections (`judge`, and `task` for rule judges)."""
    if judge_cfg.kind == "rule":
        from selfplay.config import PROMPT_SETS
        from selfplay.tasks import make_task

        if task_cfg is None or task_cfg.name in PROMPT_SETS:
            raise ValueError("a rule judge needs a synthetic task with a scorer (task.name), not a prompt file")
        task = make_task(task_cfg.name, min_items=task_cfg.min_items, max_items=task_cfg.max_items)
        return RuleJudge(task, temperature=judge_cfg.temperature)
    if judge_cfg.kind == "pairrm":
        from selfplay.judges.pairrm import PairRMJudge  # imports the DeBERTa model code only when needed

        return PairRMJudge(judge_cfg.path, batch_size=judge_cfg.batch_size)
    raise ValueError(f"unknown judge kind {judge_cfg.kind!r}")


__all__ = ["Judge", "JudgedGroups", "RuleJudge", "judge_groups", "make_judge"]
