"""JudgeActor: one judge model behind an async Ray actor that merges concurrent requests into one batch.

Several generators call `judge(groups)` at once; calls arriving within `max_wait_s` of each other are judged
together (one model batch), and each caller gets back its replay rows as an Arrow table and its counts (the
K×K verdicts only when it asks for them: tests and tools; the driver needs rows).

Bad input stays with its caller: a malformed group (no candidates, a prompt that is not text) fails only the
call that sent it; bad judge output (NaN, inf, a probability outside [0, 1]) and empty responses are counted
skips per group (`skipped_invalid`, `skipped_empty`; see selfplay.judges.base.JudgedGroups).
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import ray

from actors.faults import HoldPoints
from actors.remote import restarted
from selfplay.judges import make_judge
from selfplay.judges.calls import SKIP_COUNTERS, judge_calls


@ray.remote
class JudgeActor:
    def __init__(self, judge_cfg, task_cfg=None, algorithm: str = "sppo", max_wait_s: float = 0.02,
                 max_batch_groups: int = 256):
        self.judge = make_judge(judge_cfg, task_cfg)
        self.algorithm = algorithm
        self.max_wait_s, self.max_batch_groups = max_wait_s, max_batch_groups
        self._pending: list[tuple[list[dict[str, Any]], asyncio.Future]] = []
        self._flusher: asyncio.Task | None = None
        self.counters = {"calls": 0, "groups": 0, "batches": 0, "bad_calls": 0, **dict.fromkeys(SKIP_COUNTERS, 0)}
        self.holds = HoldPoints()  # chaos tests only: hold a call until the test kills this process
        self.awaiting_restore = restarted()  # stateless, but a restart is counted once, when the driver recovers it

    async def judge(self, groups: list[dict[str, Any]], verdicts: bool = False) -> dict[str, Any]:
        """Judge groups {prompt_id, prompt, candidates, policy_version[, candidates_prev]}.

        Returns {"rows": Arrow table of replay rows (groups with a strict winner), "groups": int,
                 "skipped_ties": int, "skipped_invalid": int, "skipped_empty": int,  # groups without a row
                 "empty_responses": int}  # empty candidates judged as losing
        and, with verdicts=True, "verdicts": [per group: probs K×K, scores, winner, loser, p_winner, p_loser,
        valid, skip_reason]. A malformed group raises ValueError (naming the group) to this caller only.
        """
        await self.holds.enter_async("judge")
        future = asyncio.get_running_loop().create_future()
        self._pending.append((list(groups), future))
        self.counters["calls"] += 1
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        result = {**await future, "groups": len(groups)}
        if not verdicts:
            del result["verdicts"]
        return result

    async def compare(self, prompts: list[str], a: list[str], b: list[str]) -> list[float]:
        """Evaluation: P(a ≻ b) per prompt (actors/evaluation.py), in a thread like a batch of `judge`."""
        probs = await asyncio.get_running_loop().run_in_executor(None, self.judge.compare, prompts, a, b)
        return probs.double().tolist()

    def hold(self, point: str, marker: str, skip: int = 0) -> None:
        """Chaos tests: hold the next `judge` call (after `skip` more) until this process is killed (actors/faults.py)."""
        self.holds.arm(point, marker, skip)

    def restore(self) -> None:
        """After a restart: nothing to restore (a judge holds no state), only to acknowledge."""
        self.awaiting_restore = False

    def stats(self) -> dict[str, Any]:
        return {**self.counters, "awaiting_restore": self.awaiting_restore, "pid": os.getpid()}

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
                if fut.done():
                    continue
                if isinstance(result, Exception):
                    fut.set_exception(result)
                else:
                    fut.set_result(result)

    def _judge_calls(self, calls: list[list[dict[str, Any]]]) -> list[dict[str, Any] | Exception]:
        results = judge_calls(self.judge, calls, self.algorithm)
        self.counters["batches"] += len({len(g["candidates"]) for groups, r in zip(calls, results)
                                         if not isinstance(r, Exception) for g in groups})
        for groups, result in zip(calls, results):
            if isinstance(result, Exception):
                self.counters["bad_calls"] += 1
                continue
            self.counters["groups"] += len(groups)
            for key in SKIP_COUNTERS:
                self.counters[key] += result[key]
        return results
