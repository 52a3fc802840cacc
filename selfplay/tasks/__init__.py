"""Prompt sources: synthetic verifiable tasks (with scorers) and real prompt files (JSONL / Parquet)."""

from selfplay.tasks.base import Prompt, Task, chat_prompt, make_prompt_id
from selfplay.tasks.prompts import (
    PromptFileError,
    PromptSet,
    load_hf_prompts,
    load_prompts,
    load_task_prompts,
)
from selfplay.tasks.sort import SortTask

TASKS = {"sort": SortTask}


def make_task(name: str, **options) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(sorted(TASKS))}")
    return TASKS[name](**options)


__all__ = [
    "TASKS", "Prompt", "PromptFileError", "PromptSet", "SortTask", "Task", "chat_prompt", "load_hf_prompts", "load_prompts",
    "load_task_prompts", "make_prompt_id", "make_task",
]
