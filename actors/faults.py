"""Hold points: chaos tests kill an actor *inside* a call, at a known point, never by timing luck.

A test that kills a generator "a while after step 3" passes or fails with the machine's speed: the kill may land
between two requests, and nothing is re-issued. Instead the test arms a hold point on the actor
(`actor.hold.remote("request", marker)`): the actor's next call of that kind writes `marker` and stays inside
the call; the test kills it once the marker exists. The driver then sees a death with that call in flight,
every time. Arming is per process: the process Ray restarts starts unarmed and serves normally.

Nothing in a run arms a hold point; it costs a dict lookup per call.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

HOLD_LIMIT_S = 300.0  # a held call that is never killed fails after this, so a broken test cannot hang forever


class HoldPoints:
    def __init__(self) -> None:
        self._armed: dict[str, list] = {}  # point → [calls still to let through, marker path]

    def arm(self, point: str, marker: str, skip: int = 0) -> None:
        """Hold the call at `point` after letting `skip` more calls through."""
        self._armed[point] = [skip, marker]

    def _reached(self, point: str) -> str | None:
        armed = self._armed.get(point)
        if armed is None:
            return None
        if armed[0] > 0:
            armed[0] -= 1
            return None
        del self._armed[point]
        Path(armed[1]).write_text(str(os.getpid()))
        return armed[1]

    def enter(self, point: str) -> None:
        """Call at the top of a method: returns at once unless this call is the one to hold."""
        marker = self._reached(point)
        if marker is not None:
            time.sleep(HOLD_LIMIT_S)
            raise TimeoutError(f"held at {point!r} for {HOLD_LIMIT_S:.0f}s and never killed ({marker})")

    async def enter_async(self, point: str) -> None:
        """`enter` for async actors: the event loop keeps running while the call is held."""
        marker = self._reached(point)
        if marker is not None:
            await asyncio.sleep(HOLD_LIMIT_S)
            raise TimeoutError(f"held at {point!r} for {HOLD_LIMIT_S:.0f}s and never killed ({marker})")
