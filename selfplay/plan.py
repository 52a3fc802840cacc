"""`selfplay plan`: recommend a generator:learner layout for a cluster from measured per-actor costs.

A small discrete-event simulation of the async pipeline, calibrated with numbers you measure on your own
hardware: the seconds one generator takes for one request and how many replay rows it yields
(`benchmarks/generation.py`, or `samples_per_s` in a run's metrics.jsonl), and the seconds one learner step
takes on one learner (`step_seconds` of the learner metrics).

Assumptions (say so when quoting a plan):
- generators are independent: G generators produce G times the rows (no shared bottleneck);
- data parallelism scales a step's time as t_train / (L · efficiency^(L−1)) — efficiency < 1 models the
  all-reduce cost;
- every row is trained on once (on-policy-like: the buffer neither starves nor hoards); the generators run free,
  so the surplus column is what they would produce beyond the learners; with the default bounded schedule
  (`train.max_policy_lag`) they wait instead, and the surplus reads as their idle share;
- judging is folded into the generator time (a judge per few generators keeps up: PairRM is ~100× cheaper
  than generating a response); weight pushes cost `sync_seconds` of learner time every `sync_every` steps.
"""

from __future__ import annotations

import heapq
import random
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Costs:
    gen_seconds: float  # one generator, one request
    rows_per_request: float  # replay rows a request yields (prompts per request, minus ties)
    train_seconds: float  # one learner step on one learner
    batch_rows: int  # rows per learner step
    learner_efficiency: float = 0.9
    sync_seconds: float = 0.0
    sync_every: int = 1
    jitter: float = 0.1  # relative spread of generation times


@dataclass(frozen=True)
class Layout:
    generators: int
    learners: int
    rows_trained_per_s: float
    generator_surplus: float
    learner_idle: float
    gpus: float


def simulate(costs: Costs, generators: int, learners: int, seconds: float = 600.0, seed: int = 0) -> tuple[float, float, float]:
    """Async pipeline for `seconds` of simulated time → (rows trained/s, generator surplus = share of generated
    rows never trained, learner idle fraction)."""
    rng = random.Random(seed)
    step = costs.train_seconds / (learners * costs.learner_efficiency ** (learners - 1))
    events = [(rng.uniform(0.5, 1.5) * costs.gen_seconds, i) for i in range(generators)]
    heapq.heapify(events)
    buffer = trained = steps = 0
    learner_free_at = learner_busy = 0.0

    def train_until(limit: float) -> None:
        """The learner works through full batches already in the buffer, starting steps before `limit`."""
        nonlocal buffer, trained, steps, learner_free_at, learner_busy
        while buffer >= costs.batch_rows and learner_free_at < limit:
            duration = step + (costs.sync_seconds if (steps + 1) % costs.sync_every == 0 else 0.0)
            learner_busy += max(0.0, min(duration, seconds - learner_free_at))
            learner_free_at += duration
            buffer -= costs.batch_rows
            trained += costs.batch_rows
            steps += 1

    while events:
        t, i = heapq.heappop(events)
        if t > seconds:
            break
        train_until(t)
        buffer += costs.rows_per_request
        learner_free_at = max(learner_free_at, t)  # an idle learner starts when the rows arrive
        heapq.heappush(events, (t + costs.gen_seconds * rng.uniform(1 - costs.jitter, 1 + costs.jitter), i))
    train_until(seconds)
    # unbounded async (train.max_policy_lag: null) generators never wait: what the learners cannot absorb shows as
    # surplus, rows produced and never trained; bounded (the default), the same share is generator time spent waiting
    produced = trained + buffer
    generator_surplus = max(0.0, 1 - trained / produced) if produced else 1.0
    return trained / seconds, generator_surplus, 1 - learner_busy / seconds


def plan(costs: Costs, gpus: float, generator_gpus: float = 1, learner_gpus: float = 1, judge_gpus: float = 0,
         judges: int = 0, seconds: float = 600.0) -> list[Layout]:
    """Every layout that fits on `gpus`, best first (throughput, then fewer GPUs)."""
    free = gpus - judges * judge_gpus
    layouts = []
    for g in range(1, int(free // generator_gpus) + 1):
        for n in range(1, int((free - g * generator_gpus) // learner_gpus) + 1):
            rate, gen_surplus, learn_idle = simulate(costs, g, n, seconds)
            layouts.append(Layout(g, n, rate, gen_surplus, learn_idle, g * generator_gpus + n * learner_gpus + judges * judge_gpus))
    return sorted(layouts, key=lambda x: (-round(x.rows_trained_per_s, 6), x.gpus))


def describe(layouts: list[Layout], top: int = 8) -> str:
    lines = [f"{'generators':>10} {'learners':>9} {'rows/s':>9} {'surplus':>9} {'learner idle':>13} {'GPUs':>6}"]
    for x in layouts[:top]:
        lines.append(f"{x.generators:>10} {x.learners:>9} {x.rows_trained_per_s:>9.2f} {x.generator_surplus:>9.0%} "
                     f"{x.learner_idle:>13.0%} {x.gpus:>6g}")
    return "\n".join(lines)


def as_dict(layout: Layout) -> dict:
    return asdict(layout)
