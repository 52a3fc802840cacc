"""What every recipe does to generator output before it becomes a judge group.

Empty responses (a generator that returned "" or nothing at all) are not dropped here: every candidate stays in
its group, as text, and the judge step decides (selfplay.judges.base.judge_groups): an empty response loses to
every non-empty one and ties with other empty ones; a group of only empty responses is skipped and counted
(`skipped_empty`). Dropping them would hide a policy that learned to answer nothing, and keep it untrained.
"""

from __future__ import annotations

from typing import Any

from selfplay.judges.base import response_text


def text_of(sample: Any) -> str:
    """A generated response as text: a sample dict's "text", a plain string, or "" for None / a missing text."""
    return response_text(sample.get("text") if isinstance(sample, dict) else sample)


def texts_of(samples: Any) -> list[str]:
    """Every response of one prompt as text; None (no samples at all) is an empty list."""
    return [text_of(s) for s in (samples or [])]
