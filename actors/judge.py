"""JudgeActor: one judge model behind an async Ray actor that merges concurrent requests into one batch.

Several generators call `judge(groups)` at once; calls arriving within `max_wait_s` of each other are judged
together (one model batch), and each caller gets back its own verdicts plus replay rows as an Arrow table.
"""

from __future__ import annotations

import asyncio
from typing import Any

import ray

from selfplay.buffer import SCHEMA, to_table
from selfplay.judges import judge_groups, make_judge


@ray.remote
class JudgeActor:
    def __init__(self, judge_cfg, task_cfg=None, algorithm: str = "sppo", max_wait_s: float = 0.02,
                 max_batch_groups: int = 256):
        self.judge = make_judge(judge_cfg, task_cfg)
        self.algorithm = algorithm
        self.max_wait_s, self.max_batch_groups = max_wait_s, max_batch_groups
        self._pending: list[tuple[list[dict[str, Any]], asyncio.Future]] = []
        self._flusher: asyncio.Task | None = None
        self.counters = {"calls": 0, "groups": 0, "batches": 0, "skipped_ties": 0}

    async def judge(self, groups: list[dict[str, Any]]) -> dict[str, Any]:
        """Judge groups {prompt_id, prompt, candidates, policy_version[, candidates_prev]}.

        Returns {"verdicts": [per group: probs K×K, scores, winner, loser, p_winner, p_loser, valid],
                 "rows": Arrow table of replay rows (groups with a strict winner), "skipped_ties": int}.
        """
        future = asyncio.get_running_loop().create_future()
        self._pending.append((list(groups), future))
        self.counters["calls"] += 1
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        return await future

    def stats(self) -> dict[str, int]:
        return dict(self.counters)

    async def _flush(self) -> None:
        await asyncio.sleep(self.max_wait_s)  # let concurrent callers join this batch
        loop = asyncio.get_running_loop()
        while self._pending:
            batch, size = [], 0
            while self._pending and (not batch or size + len(self._pending[0][0]) <= self.max_batch_groups):
                call = self._pending.pop(0)
                batch.append(call)
                size += len(call[0])
            try:
                # the model runs in a thread so the event loop keeps accepting calls for the next batch
                results = await loop.run_in_executor(None, self._judge_calls, [groups for groups, _ in batch])
            except Exception as e:  # every caller of this batch gets the error, none hangs
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            for (_, fut), result in zip(batch, results):
                if not fut.done():
                    fut.set_result(result)

    def _judge_calls(self, calls: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
        flat = [(c, i, g) for c, groups in enumerate(calls) for i, g in enumerate(groups)]
        verdicts: dict[tuple[int, int], dict[str, Any]] = {}
        by_k: dict[int, list[tuple[int, int, dict]]] = {}
        for c, i, g in flat:
            by_k.setdefault(len(g["candidates"]), []).append((c, i, g))
        for items in by_k.values():  # one model batch per K: matrices need equal K
            judged = judge_groups(self.judge, [g for _, _, g in items], self.algorithm)
            for b, (c, i, _) in enumerate(items):
                verdicts[(c, i)] = judged.verdict(b)
        self.counters["batches"] += len(by_k)
        self.counters["groups"] += len(flat)
        out = []
        for c, groups in enumerate(calls):
            mine = [verdicts[(c, i)] for i in range(len(groups))]
            rows = [v.pop("row") for v in mine]
            kept = [r for r in rows if r is not None]
            self.counters["skipped_ties"] += len(rows) - len(kept)
            out.append({
                "verdicts": mine,
                "rows": to_table(kept) if kept else SCHEMA.empty_table(),
                "skipped_ties": len(rows) - len(kept),
            })
        return out
