"""Synthetic verifiable task: sort a short list of digits ascending.

Prompt "Sort ascending: 7 3 9 1" → answer "1 3 7 9". The score gives partial credit — the share of positions
that hold the right number, over the longer of answer and target — so a judge can rank two wrong answers.
"""

from __future__ import annotations

import hashlib
import random

from selfplay.tasks.base import Prompt, make_prompt_id

PREFIX = "Sort ascending:"


class SortTask:
    name = "sort"

    def __init__(self, min_items: int = 4, max_items: int = 8, max_value: int = 9):
        if not 1 <= min_items <= max_items:
            raise ValueError(f"need 1 <= min_items <= max_items, got {min_items}, {max_items}")
        self.min_items, self.max_items, self.max_value = min_items, max_items, max_value

    # Held-out membership is a property of the prompt text itself, so the two splits can never overlap,
    # however many prompts each one asks for.
    @staticmethod
    def _is_eval(text: str) -> bool:
        return int(hashlib.sha1(text.encode()).hexdigest(), 16) % 5 == 0

    def prompts(self, split: str, n: int, seed: int = 0) -> list[Prompt]:
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        rng = random.Random(f"{self.name}:{split}:{seed}")
        out: dict[str, Prompt] = {}
        attempts = 0
        while len(out) < n:
            attempts += 1
            if attempts > 50 * n + 1000:
                raise ValueError(
                    f"sort task: cannot draw {n} distinct {split} prompts with "
                    f"{self.min_items}..{self.max_items} items; ask for fewer or widen the range"
                )
            items = [rng.randint(0, self.max_value) for _ in range(rng.randint(self.min_items, self.max_items))]
            text = f"{PREFIX} {' '.join(map(str, items))}"
            if self._is_eval(text) != (split == "eval") or text in out:
                continue
            out[text] = Prompt(make_prompt_id(text), text, self.reference(text))
        return list(out.values())

    @staticmethod
    def parse(text: str) -> list[int] | None:
        body = text.split(":", 1)[1] if ":" in text else text
        try:
            return [int(tok) for tok in body.split()]
        except ValueError:
            return None

    def reference(self, prompt_text: str) -> str:
        items = self.parse(prompt_text)
        if items is None:
            raise ValueError(f"not a sort prompt: {prompt_text!r}")
        return " ".join(map(str, sorted(items)))

    def score(self, prompt_text: str, response: str) -> float:
        target = sorted(self.parse(prompt_text) or [])
        got = response.split()
        if not target:
            return 0.0
        hits = sum(1 for a, b in zip(got, target) if a == str(b))
        return hits / max(len(target), len(got))
