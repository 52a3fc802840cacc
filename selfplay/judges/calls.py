"""Judge several callers' groups in one model batch per K, keeping each caller's bad input to itself.

`JudgeActor` (actors/judge.py) merges concurrent `judge(groups)` calls and hands them here; this is the whole
of its logic, pure, so it is tested without Ray.
"""

from __future__ import annotations

from typing import Any

from selfplay.judges.base import Judge, judge_groups

# per-call counts in every result (and summed in JudgeActor.stats()); the skipped_* ones are groups without a row
SKIP_COUNTERS = ("skipped_ties", "skipped_invalid", "skipped_empty", "empty_responses")


def judge_calls(judge: Judge, calls: list[list[dict[str, Any]]], algorithm: str = "sppo") -> list[dict[str, Any] | Exception]:
    """One result per call: {"verdicts", "rows" (Arrow table), *SKIP_COUNTERS}, or a ValueError naming the
    malformed group for a call whose groups are not well formed (the other calls are judged as usual)."""
    from selfplay.buffer import SCHEMA, to_table

    bad = {c: ValueError(f"judge: bad input: {p}") for c, p in
           ((c, malformed(groups)) for c, groups in enumerate(calls)) if p}
    by_k: dict[int, list[tuple[int, int, dict]]] = {}
    for c, groups in enumerate(calls):
        if c not in bad:
            for i, g in enumerate(groups):
                by_k.setdefault(len(g["candidates"]), []).append((c, i, g))
    verdicts: dict[tuple[int, int], dict[str, Any]] = {}
    empties: dict[tuple[int, int], int] = {}
    for items in by_k.values():  # one model batch per K: matrices need equal K
        judged = judge_groups(judge, [g for _, _, g in items], algorithm)
        for b, (c, i, g) in enumerate(items):
            verdicts[(c, i)] = judged.verdict(b)
            if judged.skip_reasons[b] != "invalid":
                empties[(c, i)] = sum(1 for x in g["candidates"] if not (x or "").strip())
    out: list[dict[str, Any] | Exception] = []
    for c, groups in enumerate(calls):
        if c in bad:
            out.append(bad[c])
            continue
        mine = [verdicts[(c, i)] for i in range(len(groups))]
        rows = [v.pop("row") for v in mine]
        kept = [r for r in rows if r is not None]
        reasons = [v["skip_reason"] for v in mine]
        out.append({
            "verdicts": mine,
            "rows": to_table(kept) if kept else SCHEMA.empty_table(),
            "skipped_ties": reasons.count("tie"),
            "skipped_invalid": reasons.count("invalid"),
            "skipped_empty": reasons.count("empty"),
            "empty_responses": sum(empties.get((c, i), 0) for i in range(len(groups))),
        })
    return out


def malformed(groups: Any) -> str | None:
    """What is wrong with a call's groups (the first problem, naming the group), or None."""
    if not isinstance(groups, list):
        return f"expected a list of groups, got {type(groups).__name__}"
    for i, g in enumerate(groups):
        where = f"group {i}" + (f" (prompt_id {g.get('prompt_id')!r})" if isinstance(g, dict) else "")
        if not isinstance(g, dict):
            return f"{where}: expected a dict, got {type(g).__name__}"
        for key in ("prompt_id", "prompt", "candidates"):
            if key not in g:
                return f"{where}: missing {key!r} (a group needs prompt_id, prompt and candidates)"
        if not isinstance(g["prompt"], str):
            return f"{where}: 'prompt' must be a string, got {type(g['prompt']).__name__}"
        cands = g["candidates"]
        if not isinstance(cands, (list, tuple)) or not all(c is None or isinstance(c, str) for c in cands):
            return f"{where}: 'candidates' must be a list of strings"
        prev = g.get("candidates_prev")
        if prev is not None and (not isinstance(prev, (list, tuple)) or len(prev) != len(cands)):
            return f"{where}: 'candidates_prev' must match 'candidates' in length"
    return None
