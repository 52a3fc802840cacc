"""What every recipe does to generator output before it becomes a judge group.

Empty responses (a generator that returned "" or nothing at all) are not dropped here: every candidate stays in
its group, as text, and the judge step decides (selfplay.judges.base.judge_groups): an empty response loses to
every non-empty one and ties with other empty ones; a group of only empty responses is skipped and counted
(`skipped_empty`). Dropping them would hide a policy that learned to answer nothing, and keep it untrained.
"""

from __future__ import annotations

from typing import Any


def text_of(sample: Any) -> str:
    """A generated response as text: a sample dict's "text", a plain string, or "" for None / a missing text."""
    if isinstance(sample, dict):
        sample = sample.get("text")
    if sample is None:
        return ""
    if not isinstance(sample, str):
        raise ValueError(f"a generated response must be text, got {type(sample).__name__}")
    return sample


def texts_of(samples: Any) -> list[str]:
    """Every response of one prompt as text; None (no samples at all) is an empty list."""
    return [text_of(s) for s in (samples or [])]
