"""Requests in flight, written once for both schedules: generate → judge → store, whatever dies on the way.

Every generator request is kept (`Request`: generator, prompts, seed) until the buffer has acknowledged its rows.
When a generator or judge dies during a call, the driver's recovery callback waits for Ray's restart and restores
the actor, and the lost call is sent again with the same prompts and seed (docs/architecture.md, "Faults and
resume"). A checkpoint stores the requests still in flight; a resumed run sends them first.
"""

from __future__ import annotations

import collections
import dataclasses
import random
import time
from collections.abc import Callable
from typing import Any

import ray

from actors.metrics import Counters
from actors.remote import ActorDiedError, get_all
from selfplay.tasks import Prompt


class PromptStream:
    """Endless, reshuffled-per-epoch stream of training prompts (deterministic from the seed)."""

    def __init__(self, prompts: list[Prompt], seed: int):
        if not prompts:
            raise ValueError("no training prompts")
        self.prompts, self.rng, self.order = prompts, random.Random(seed), []

    def state(self) -> dict[str, Any]:
        version, inner, gauss = self.rng.getstate()
        return {"order": list(self.order), "rng": [version, list(inner), gauss]}

    def load_state(self, state: dict[str, Any]) -> None:
        version, inner, gauss = state["rng"]
        self.rng.setstate((version, tuple(inner), gauss))
        self.order = list(state["order"])

    def take(self, n: int) -> list[Prompt]:
        out = []
        while len(out) < n:
            if not self.order:
                self.order = list(range(len(self.prompts)))
                self.rng.shuffle(self.order)
            out.append(self.prompts[self.order.pop()])
        return out


@dataclasses.dataclass
class Request:
    """A generator request, kept until its rows are stored, so that it can be sent again."""
    generator: int
    prompts: list[Prompt]
    seed: int
    sent: float = 0.0  # when it was (last) sent: generation intervals for the overlap measurement


class InFlight:
    """The driver's requests between a generator and the replay buffer.

    `send(i)` gives generator i its next request; `advance(ref)` takes one finished call further (generated →
    judged, judged → stored) and returns the request whose generation finished, so that an async driver can
    give that generator its next one at once; `drain()` finishes everything in flight.
    """

    def __init__(self, cfg, recipe, generators: list, judges: list, replay, counters: Counters,
                 recover: Callable[[str, int], None], prompts: list[Prompt], timeout_s: float = 600):
        self.cfg, self.recipe, self.counters = cfg, recipe, counters
        self.generators, self.judges, self.replay = generators, judges, replay
        self.recover, self.timeout_s = recover, timeout_s
        self.stream = PromptStream(prompts, cfg.seed)
        self.generating: dict[ray.ObjectRef, Request] = {}
        self.judging: dict[ray.ObjectRef, tuple[int, Request, list[dict]]] = {}
        self.backlog: list[Request] = []  # in flight when the resumed checkpoint was taken: sent before new ones
        self.issued = 0  # requests made so far: each gets its own sampling seed
        self.generated: list[tuple[float, float]] = []  # (sent, generated) per request
        # the weight version generator i must serve a request with: the newest one sent to it (WeightSync)
        self.min_version: Callable[[int], int] = lambda i: 0

    def __contains__(self, ref: ray.ObjectRef) -> bool:
        return ref in self.generating or ref in self.judging

    def refs(self) -> list[ray.ObjectRef]:
        return [*self.generating, *self.judging]

    def idle(self) -> list[int]:
        """A generator for each request it may still take (`generation.requests_in_flight` at once)."""
        busy = collections.Counter(r.generator for r in self.generating.values())
        return [i for i in range(len(self.generators))
                for _ in range(self.cfg.generation.requests_in_flight - busy[i])]

    def prompts(self) -> int:
        """Prompts sent and not yet stored: at most this many rows are still to come."""
        return sum(len(r.prompts) for r in self.generating.values()) + \
            sum(len(r.prompts) for _, r, _ in self.judging.values())

    def send(self, i: int) -> None:
        """Generator i's next request: a backlog request first, else the next prompts of the stream."""
        if self.backlog:
            request = self.backlog.pop(0)
            request.generator = i
        else:
            self.issued += 1
            request = Request(i, self.stream.take(self.cfg.generation.prompts_per_request),
                              self.cfg.seed * 100_003 + self.issued)
        self._generate(request)

    def advance(self, ref: ray.ObjectRef) -> Request | None:
        """Take a finished call one stage further. Returns the request if its generation just finished."""
        if ref in self.judging:
            j, request, groups = self.judging.pop(ref)
            try:
                judged = get_all({j: ref}, self.timeout_s, "judge", "judge")[j]
            except ActorDiedError:
                self.recover("judge", j)
                self.counters.requests_reissued += 1
                self.judging[self.judges[j].judge.remote(groups)] = (j, request, groups)
                return None
            self._store(judged)
            return None
        request = self.generating.pop(ref)
        try:
            results = get_all({request.generator: ref}, self.timeout_s, "generate", "generator")[request.generator]
        except ActorDiedError:
            self.recover("generator", request.generator)
            self.counters.requests_reissued += 1
            self._generate(request)
            return None
        self.generated.append((request.sent, time.perf_counter()))
        self.counters.samples_generated += self.recipe.responses(results)
        j = request.generator % len(self.judges)
        groups = self.recipe.groups(results)
        self.judging[self.judges[j].judge.remote(groups)] = (j, request, groups)
        return request

    def drain(self, generating: bool = True) -> None:
        """Wait until every request in flight is stored (generating=False: only those already generated)."""
        while (generating and self.generating) or self.judging:
            self.advance(next(iter(self.generating if generating and self.generating else self.judging)))

    def _generate(self, request: Request) -> None:
        request.sent = time.perf_counter()
        self.generating[self.recipe.request(self.generators[request.generator], request.prompts, seed=request.seed,
                                            min_version=self.min_version(request.generator))] = request

    def _store(self, judged: dict[str, Any]) -> None:
        c = self.counters
        c.groups_judged += judged["groups"]
        c.skipped_ties += judged["skipped_ties"]
        c.skipped_invalid += judged["skipped_invalid"]
        c.skipped_empty += judged["skipped_empty"]
        c.empty_responses += judged["empty_responses"]
        c.rows_added += self.replay.add(judged["rows"])

    # -- checkpoints ----------------------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps: the stream position, the request count and the requests not yet stored."""
        pending = [*self.backlog, *self.generating.values(), *(r for _, r, _ in self.judging.values())]
        return {"requests": self.issued, "stream": self.stream.state(),
                "in_flight": [{"prompts": [dataclasses.asdict(p) for p in r.prompts], "seed": r.seed}
                              for r in pending]}

    def load_state(self, state: dict[str, Any]) -> None:
        self.issued = state["requests"]
        self.stream.load_state(state["stream"])
        self.backlog = [Request(0, [_prompt(p) for p in r["prompts"]], r["seed"]) for r in state["in_flight"]]


def _prompt(d: dict[str, Any]) -> Prompt:
    return Prompt(**{**d, "messages": tuple(d["messages"]) if d.get("messages") else None})
