"""The driver: builds generators, judges, replay shards and learners from the config and runs self-play.

    prompts → GeneratorActor ×G → JudgeActor ×J → ReplayBuffer (S shards) → LearnerGroup (L ranks)
                ▲                                                               │
                └────────────── WeightSync (object store | broadcast) ◄─────────┘

sync  — lock-step, the papers' schedule: generate → judge → store → train → push weights (and wait).
async — generation and training overlap: judged rows stream into the buffer while the learners train, and
        weights are pushed every `sync_every` steps without waiting (generators apply them between batches).
        `train.max_policy_lag` = N bounds it: step n trains once its round of fresh rows (as many as a sync round
        makes) is stored, and those rows were generated with θ_{n-N} or newer (N = 1: the rows of step n+1 are
        generated with θ_n while step n trains, as in one-step off-policy RLHF); null lets generators run free
        and learners train whatever the buffer holds.
What the algorithm is comes from its recipe (`selfplay.recipes`); requests in flight from `actors.inflight`;
checkpoints from `actors.checkpoint`; evaluation, on the generators and judges, from `actors.evaluation`;
counters and the summary from `actors.metrics` (docs/architecture.md, "The driver").
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray

from actors import checkpoint
from actors.evaluation import Evaluation
from actors.generator import GeneratorActor
from actors.inflight import InFlight
from actors.judge import JudgeActor
from actors.learner import LearnerGroup
from actors.metrics import Counters, RunMetrics, plot, summary, utilization
from actors.placement import Placement
from actors.remote import ActorDiedError, get_all, peak_rss_mb, recover
from actors.replay import ReplayBuffer
from actors.weight_sync import WeightSync
from selfplay.config import Config, check_resources
from selfplay.lora import lora_enabled
from selfplay.placement import tensor_parallel
from selfplay.preflight import latest_checkpoint, run_prompts
from selfplay.recipes import make_recipe
from selfplay.tasks import Prompt
from selfplay.warmup import initial_policy

# sync: rounds of generation per step while the buffer cannot fill a batch (ties give no row); a policy whose
# samples tie that often makes no rows at all, and the error after these rounds says why
MAX_ROUNDS = 20


class LearnerFailure(RuntimeError):
    """A learner rank died: the step cannot finish. The run resumes from its last checkpoint."""


class Driver:
    def __init__(self, cfg: Config, out_dir: str | Path, log: Callable[[str], None] = print,
                 prompts: tuple | None = None):
        """`prompts`: what `selfplay.preflight.run_prompts(cfg)` returned, when the caller has read them already."""
        self.cfg, self.out, self.log, self.given_prompts = cfg, Path(out_dir).absolute(), log, prompts
        self.recipe = make_recipe(cfg)
        self.counters = Counters()
        self.evals: list[dict[str, Any]] = []
        # policies saved for evaluation after the loop: {step, seconds (eval.every_seconds) or None, path}
        self.evals_due: list[dict[str, Any]] = []
        self.trained: list[tuple[float, float]] = []  # (start, end) of every learner step
        self.restarts = {"generator": 0, "judge": 0, "replay_shard": 0}  # actors Ray restarted, recovered here
        self.restarts_before: dict[str, int] = {}  # counted by the attempts before the last resume
        self.resumes: list[int] = []  # steps this run resumed from
        self.resume_state: dict[str, Any] | None = None
        self.train_prompts: list[Prompt] = []
        self.eval_prompts: list[Prompt] = []
        self.task, self.initial_policy, self.prompts_skipped = None, "", 0
        # built by `_build`, once per attempt (a resumed attempt builds them anew)
        self.generators: list = []
        self.judges: list = []
        self.replay: ReplayBuffer | None = None
        self.learners: LearnerGroup | None = None
        self.placement: Placement | None = None
        self.sync: WeightSync | None = None
        self.inflight: InFlight | None = None
        self.evaluation: Evaluation | None = None
        self.metrics: RunMetrics | None = None
        self.logged_samples = 0  # samples_generated already counted in the Ray counter
        self.extra_prompts = 0  # async, bounded: prompts sent beyond one round per step (`_may_generate`)
        self.pushed_steps = 0  # async: the learner steps behind the newest weights asked to be pushed
        self.submitted = 0  # async: learner steps queued or trained (the next one to queue is this one, 0-based)
        self.push_steps: dict[int, int] = {}  # async: weight version → the learner steps behind it
        self.t0 = 0.0

    # -- set-up ---------------------------------------------------------------------------------------------------

    def _prompts(self) -> tuple[list[Prompt], list[Prompt], Any]:
        train, held, task, skipped = self.given_prompts or run_prompts(self.cfg)
        self.prompts_skipped = len(skipped)
        for problem in skipped[:5]:
            self.log(f"[selfplay] skipped {problem}")
        if skipped:
            self.log(f"[selfplay] {len(skipped)} bad record(s) of {self.cfg.task.path} skipped "
                     "(task.skip_bad_records); the first ones are listed above")
        return train, held, task

    def _build(self, policy: str) -> None:
        cfg, r = dataclasses.replace(self.cfg, model=dataclasses.replace(self.cfg.model, policy=policy)), \
            self.cfg.resources
        # every actor goes into its bundle of the run's placement groups (`run` made them). Generators, judges and
        # replay shards are restarted by Ray when they die and recovered by `_recover`; learners are not (a step
        # needs every rank): a learner failure resumes the run from a checkpoint. A tensor-parallel generator's
        # own bundle has no GPU: its vLLM workers take the group's GPU bundles
        tp = tensor_parallel(cfg)
        self.generators = [
            GeneratorActor.options(num_cpus=r.generator_cpus, num_gpus=r.generator_gpus if tp == 1 else 0,
                                   max_restarts=r.max_restarts,
                                   scheduling_strategy=self.placement.strategy(f"generator {i}", children=tp > 1))
            .remote(cfg.to_dict(), policy, i) for i in range(r.num_generators)
        ]
        self.judges = [
            JudgeActor.options(num_cpus=r.judge_cpus, num_gpus=r.judge_gpus, max_restarts=r.max_restarts,
                               scheduling_strategy=self.placement.strategy("judge", i))
            .remote(cfg.judge, cfg.task, cfg.algorithm) for i in range(r.num_judges)
        ]
        self.replay = ReplayBuffer.from_config(cfg, placement=self.placement)
        self.learners = LearnerGroup(cfg, placement=self.placement)
        self.inflight = InFlight(cfg, self.recipe, self.generators, self.judges, self.replay, self.counters,
                                 self._recover, self.train_prompts)
        self.evaluation = Evaluation(cfg, self.eval_prompts, self.task, self.generators, self.judges)
        if self.resume_state is not None:
            checkpoint.restore(self, self.resume_state)
        self.sync = WeightSync(self.learners, self.generators, transport=cfg.weight_sync.transport, mode=cfg.mode,
                               bucket_bytes=cfg.weight_sync.bucket_mb << 20, which=self.recipe.weights, timeout_s=600)
        self.sync.on_generator_died = lambda i: self._recover("generator", i)
        self.inflight.min_version = lambda i: self.sync.sent_versions[i]

    def _recover(self, role: str, i: int) -> None:
        """Generator or judge i died and Ray restarts it: wait for it, restore it (a generator gets the newest
        weights before it serves again), count it once."""
        if role == "generator":
            handle, restore = self.generators[i], lambda: self.sync.restore_generator(i)
        else:  # a judge holds no state: it only acknowledges
            handle, restore = self.judges[i], lambda: get_all({i: self.judges[i].restore.remote()}, 600, "restore", "judge")
        try:
            if recover(handle, role, i, restore, 600):
                self.restarts[role] += 1
                self.log(f"[selfplay] {role} {i} was restarted; any work it lost is sent again")
        except ActorDiedError as e:
            raise RuntimeError(f"{role} {i} died and was not restarted (resources.max_restarts="
                               f"{self.cfg.resources.max_restarts} reached): {e}") from e

    # -- the run --------------------------------------------------------------------------------------------------

    def run(self, resume: bool = False) -> dict[str, Any]:
        """Run to `train.steps`. resume=True continues the run in `out_dir` from its newest complete checkpoint.
        A learner failure resumes from the newest checkpoint up to `train.max_resumes` times."""
        cfg, start = self.cfg, time.perf_counter()
        self.out.mkdir(parents=True, exist_ok=True)
        # an impossible layout (more GPUs than the cluster has, a role no node can hold) fails here, naming the
        # fields, before the warm-up and before any actor; so does an out_dir some node does not see
        check_resources(cfg, ray.cluster_resources())
        self.placement = Placement(cfg, log=self.log)
        try:
            self.log(f"[selfplay] placed: {self.placement.describe()}")
            self.placement.check_shared_dir(self.out)
            return self._run_attempts(resume, start)
        finally:
            self.placement.remove()

    def _run_attempts(self, resume: bool, start: float) -> dict[str, Any]:
        cfg = self.cfg
        self.train_prompts, self.eval_prompts, self.task = self._prompts()
        if resume:
            self.resume_state = checkpoint.load(self.out, latest_checkpoint(self.out))
            self.restarts_before = self.resume_state["restarts"]  # counted by the process that was stopped
            self.initial_policy = self.resume_state["initial_policy"]
            self.log(f"[selfplay] resuming {self.out} from step {self.resume_state['step']}")
        else:
            (self.out / "config.yaml").write_text(cfg.to_yaml())
            (self.out / "metrics.jsonl").unlink(missing_ok=True)  # a run started anew here does not continue it
            self.log(f"[selfplay] {cfg.algorithm} in {cfg.mode} mode → {self.out}")
            self.initial_policy = initial_policy(cfg, self.train_prompts, self.out, self.log)
        while True:
            try:
                result = self._run_once(start)
                break
            except LearnerFailure as e:
                last = latest_checkpoint(self.out)
                if len(self.resumes) >= cfg.train.max_resumes or last is None:
                    hint = "" if last else " (no checkpoint yet: set train.checkpoint_every)"
                    raise LearnerFailure(f"{e}. Resume with: selfplay run --resume {self.out}{hint}") from e
                self.log(f"[selfplay] {e}; resuming from {last.name} ({len(self.resumes) + 1}/{cfg.train.max_resumes})")
                self.resume_state = checkpoint.load(self.out, last)
        self.log(f"[selfplay] done in {result['wall_seconds']:.0f}s: win rate vs initial "
                 f"{result['winrate_vs_initial']:.3f} on {result['eval_prompts']} held-out prompts → "
                 f"{self.out / 'summary.json'}")
        return result

    def _run_once(self, start: float) -> dict[str, Any]:
        cfg, r = self.cfg, self.cfg.resources
        self.log(f"[selfplay] starting {r.num_generators} generator(s), {r.num_judges} judge(s), "
                 f"{r.replay_shards} replay shard(s), {r.num_learners} learner(s)")
        try:
            self._build(self.initial_policy)
            self.evaluation.answer_initial()  # every generator still serves the initial weights (version 0)
            self.metrics = RunMetrics(self.out, cfg, run_name=self.out.name)
            self.t0 = time.perf_counter()
            if self.recipe.weights == "ema" or self.resume_state is not None:
                # SAPO generators serve the EMA policy from the first batch; resumed ones the checkpoint's weights
                self.sync.push(republish=self.resume_state is not None)
                self.sync.wait()
            self.resume_state = None
            (self._run_sync if cfg.mode == "sync" else self._run_async)()
            self.sync.wait()
            generators = get_all({i: g.stats.remote() for i, g in enumerate(self.generators)}, 60, "stats", "generator")
            loop = utilization(self.counters, [generators[i] for i in range(len(self.generators))], self.learners.stats(),
                               time.perf_counter() - self.t0, self.inflight.generated, self.trained)
            final = self._checkpoint(final=True)
            self.learners.shutdown()  # the final policy is on disk: free the learners' memory before evaluating
            timed = self._evaluate_all(checkpoint.policy_file(final, lora_enabled(cfg.model.lora)), loop["loop_seconds"])
            result = summary(cfg, self.counters, self.evals, self.replay.stats(),
                             policy_version=self.sync.latest_version, wall_seconds=round(time.perf_counter() - start, 2),
                             actor_restarts=self._count_restarts(), resumed_from=self.resumes,
                             rows_replayed_after_restart=self.replay.replayed_rows,
                             prompts_skipped=self.prompts_skipped, driver_peak_rss_mb=peak_rss_mb(), **loop, **timed)
            checkpoint.write_json(self.out / "summary.json", result, indent=2)
            self.metrics.summary(result)
            plot(self.metrics.records, self.evals, self.out)
            return result
        except ActorDiedError as e:
            if e.role == "learner rank":
                raise LearnerFailure(f"learner rank {e.key} died at step {self.counters.learner_steps}") from e
            raise
        finally:
            if self.metrics is not None:  # kept: its Ray gauges stay on the dashboard while this process lives
                self.metrics.close()
            self._shutdown()

    # -- the two schedules ----------------------------------------------------------------------------------------

    def _run_sync(self) -> None:
        cfg = self.cfg
        for step in range(self.counters.learner_steps, cfg.train.steps):
            if self._out_of_time():
                break
            self._refresh_reference(step)
            for _ in range(MAX_ROUNDS):  # one round per step; more only while ties leave the buffer short
                for i in range(len(self.generators)):
                    self.inflight.send(i)
                self.inflight.drain()  # every request generated, judged and stored, whatever died
                if self.replay.stats()["size"] >= cfg.train.batch_size:
                    break
            rows = self._sample_batch(required=True)
            t = time.perf_counter()
            metrics = self.learners.train_step(rows)
            self.trained.append((t, time.perf_counter()))
            self._after_step(metrics, rows)

    def _run_async(self) -> None:
        cfg, lag = self.cfg, self.cfg.train.max_policy_lag
        # Up to two steps queued on the learners, so they never wait for the driver's round trips between steps:
        # the next one starts the moment the last ends. Bounded (max_policy_lag = N), the second is queued only
        # once its own round is stored, behind the publish of the first one's weights (pushed early), so version n
        # is exactly θ_n. Unbounded, a publish asked for meanwhile runs between them. Never past a checkpoint or an
        # evaluation (`eval.every`): the learners must be at exactly that step when its policy is saved.
        training: collections.deque = collections.deque()  # [refs, started, rows, pushed] per queued step
        self.submitted = self.pushed_steps = self.counters.learner_steps  # what the generators serve now
        self.push_steps = {}
        while self.counters.learner_steps < cfg.train.steps and not (self._out_of_time() and not training):
            self._send_requests()
            while (len(training) < 2 and self.submitted < cfg.train.steps and not self._out_of_time(self.submitted)
                   and not (self._saves_at(self.submitted) and self.counters.learner_steps < self.submitted)
                   and self._fresh_rows_for(self.submitted)):
                push = bool(training) and lag is not None and self.submitted % cfg.train.sync_every == 0
                # sampled for the version this step will start from, so stale rows are dropped as they would be then
                rows = self._sample_batch(required=False, version=self.sync.latest_version + push)
                if rows is None:  # stale rows were dropped: wait for fresh ones (a top-up request, made without
                    break  # the push that would make it one version newer than the others)
                if push:
                    self._push(self.submitted)  # θ after the queued step: published before this one starts
                    training[-1][3] = True
                self._refresh_reference(self.submitted)
                training.append([self.learners.train_step_async(rows), time.perf_counter(), rows, False])
                self.submitted += 1
            waiting = [*self.inflight.refs(), *(training[0][0] if training else []), *self.sync.waitables()]
            ready, _ = ray.wait(waiting, num_returns=1, timeout=600)
            if not ready:
                raise TimeoutError("no generator, judge, learner or weight publish finished within 600s")
            ref = ready[0]
            if ref in self.inflight:
                self.inflight.advance(ref)
            elif training and ref in training[0][0]:
                refs, t, rows, pushed = training.popleft()
                metrics = self.learners.finish_step(refs)
                started = max(t, self.trained[-1][1]) if self.trained else t  # a queued step starts after the last
                self.trained.append((started, time.perf_counter()))
                self._after_step(metrics, rows, pushed)
            else:  # a weight publish returned: send the generators their loads
                self.sync.poll()
        self.inflight.drain(generating=False)  # rows already generated are stored, not dropped

    def _push(self, steps: int) -> None:
        """Push the weights after `steps` learner steps to the generators (async: without waiting). Bounded async:
        the requests the weights already sent may serve go out first, so that they are not served with these."""
        if self.cfg.mode == "async" and self.cfg.train.max_policy_lag is not None:
            self._send_requests(rounds_only=True)
        self.sync.push()
        self.push_steps[self.sync.latest_version] = self.pushed_steps = steps
        self.counters.weight_syncs += 1

    def _saves_at(self, step: int) -> bool:
        """Is the policy after learner step `step` saved (a checkpoint, or an evaluation's policy file)?"""
        return any(every and step % every == 0 for every in (self.cfg.train.checkpoint_every, self.cfg.eval.every))

    def _send_requests(self, rounds_only: bool = False) -> None:
        """Async: give every idle generator the requests it may start now (`rounds_only`: no extra request)."""
        for i in self.inflight.idle():
            if self._may_generate(rounds_only):
                self.inflight.send(i)

    def _may_generate(self, rounds_only: bool = False) -> bool:
        """Async: may an idle generator start a request now? Never once `train.max_seconds` is up (no step would
        train its rows). Unbounded: always. Bounded by max_policy_lag = N: the sync loop's rounds, run ahead by N —
        the round of learner step s (0-based) once step s-N has been trained and θ_{s-N} is on its way (its loads
        are sent before the request, and θ_{s-N+1}'s after it: `_push`). With N ≤ 1 it is so generated with exactly
        θ_{s-N} however fast the generators and learners are (with N ≥ 2, θ_{s-N+1} may be published by then)."""
        lag = self.cfg.train.max_policy_lag
        if self._out_of_time():
            return False
        if lag is None:
            return True
        flying, round_prompts = self.inflight.prompts(), len(self.generators) * self.cfg.generation.prompts_per_request
        # the step whose round the next prompts are (the extra requests below belong to no round)
        step = (self.counters.groups_judged + flying - self.extra_prompts) // round_prompts
        if step <= self.counters.learner_steps + lag:
            return self._weights_sent_for(step - lag)
        if rounds_only or flying or any(push.publishing for push in self.sync.pending) \
                or self.submitted >= self.cfg.train.steps \
                or self.counters.groups_judged < self._prompts_for(self.submitted):
            return False
        if self.replay.stats()["size"] < self.cfg.train.batch_size:
            # the next step's round is stored, but ties (or retired rows) left the buffer short of its batch: one
            # more request, as the sync loop's extra round, with the newest weights. Not before: its rows would go
            # ahead of that round's in the buffer, or push them out of it.
            self.extra_prompts += self.cfg.generation.prompts_per_request
            return True
        return False

    def _weights_sent_for(self, steps: int) -> bool:
        """Async: are the weights after `steps` learner steps (the newest push at or before them) on their way to
        the generators — asked of the learners, published, and their loads sent?"""
        steps = max(steps, 0)
        if steps - steps % self.cfg.train.sync_every > self.pushed_steps:
            return False
        return not any(push.publishing and self.push_steps.get(push.version, steps) <= steps
                       for push in self.sync.pending)

    def _fresh_rows_for(self, step: int) -> bool:
        """Async: may learner step `step` (0-based) start? Once the buffer holds a batch; bounded, also once the
        round generated for it is judged and stored, so that every step trains its fresh rows as a sync step does."""
        if self.cfg.train.max_policy_lag is not None and self.counters.groups_judged < self._prompts_for(step):
            return False  # decided without asking the replay shards (a round trip to each)
        return self.replay.stats()["size"] >= self.cfg.train.batch_size

    def _prompts_for(self, step: int) -> int:
        """Prompts judged before step `step` (0-based) trains, as in the sync loop: one round (every generator,
        prompts_per_request each) per step, plus the extra requests sent while ties left the buffer short."""
        return (step + 1) * len(self.generators) * self.cfg.generation.prompts_per_request + self.extra_prompts

    def _out_of_time(self, started: int | None = None) -> bool:
        """`train.max_seconds` of this attempt's training loop are up (and a step was trained, or with `started`:
        that many were started or queued): no new step starts; the queued ones finish."""
        limit = self.cfg.train.max_seconds
        steps = self.counters.learner_steps if started is None else started
        return limit is not None and steps > 0 and time.perf_counter() - self.t0 >= limit

    def _sample_batch(self, required: bool, version: int | None = None):
        """A batch for the step that starts from weight `version` (default: the newest pushed); rows more than
        `replay.max_staleness` versions older are dropped. None if short and not `required`."""
        version = self.sync.latest_version if version is None else version
        rows = self.replay.sample(self.cfg.train.batch_size, current_version=version)
        if rows.num_rows == self.cfg.train.batch_size:
            return rows
        if not required:
            return None
        c = self.counters
        raise RuntimeError(
            f"only {rows.num_rows} preference pairs for a batch of {self.cfg.train.batch_size}: of "
            f"{c.groups_judged} judged prompts, {c.skipped_ties} had candidates the judge could not tell apart, "
            f"{c.skipped_invalid} got an invalid judgement (NaN/inf) and {c.skipped_empty} had only empty responses. "
            "The policy's samples are too alike (warm it up more, or raise generation.temperature / the K)."
        )

    def _refresh_reference(self, step: int) -> None:
        source = self.recipe.reference_refresh(step, self.cfg.train.steps)
        if source is not None:
            self.learners.refresh_reference(source)
            self.log(f"[selfplay] step {step}: reference ← {source} ({self.recipe.name})")

    def _after_step(self, metrics: dict[str, Any], rows, pushed: bool = False) -> None:
        """`pushed`: this step's weights were pushed already, when the next step was queued (bounded async)."""
        cfg, c = self.cfg, self.counters
        c.learner_steps += 1
        c.samples_trained += rows.num_rows
        # the newest version published before this step ran (the learner's own count: what it started from)
        trained_from = metrics["version_at_start"]
        if c.learner_steps % cfg.train.sync_every == 0 and not pushed:
            if cfg.mode == "async" and cfg.train.max_policy_lag is not None:
                self.sync.dispatch()  # asked before this step ran, so published: their loads go out now (`_push`)
            self._push(c.learner_steps)
        self.sync.poll()  # loads acknowledged meanwhile: the generators' versions below are current
        version, lag, stats = self.sync.latest_version, self.sync.version_lag(self.sync.latest_version), \
            self.replay.stats()
        elapsed, trained = time.perf_counter() - self.t0, rows.column("policy_version").to_pylist()
        times = rows.column("times_sampled").to_pylist()
        record = {
            "step": c.learner_steps, "time": round(elapsed, 3), "loss": metrics["loss"],
            "reward_margin": metrics["reward_margin"], "grad_norm": metrics["grad_norm"],
            "samples_generated": c.samples_generated, "samples_trained": c.samples_trained,
            "samples_per_s": c.samples_generated / elapsed, "buffer_size": stats["size"],
            "samples_dropped_stale": stats["dropped_stale"], "policy_version": version,
            "weight_version_lag": sum(lag.values()) / len(lag),
            # versions between the rows' weights and the ones this step trained (0: on-policy)
            "trained_version_lag": trained_from - sum(trained) / len(trained),
            "trained_version_lag_max": trained_from - min(trained),
            "trained_times_sampled": sum(times) / len(times),  # how often this batch's rows have been trained, on average
            "sync_latency": self.sync.latencies[-1] if self.sync.latencies else None,
        }
        self.metrics.log(record, new_samples=c.samples_generated - self.logged_samples, new_trained=rows.num_rows)
        self.logged_samples = c.samples_generated
        timed = sum(due["seconds"] is not None for due in self.evals_due)
        if cfg.eval.every_seconds and elapsed >= (timed + 1) * cfg.eval.every_seconds:
            self._save_for_evaluation(timed=True)
        if cfg.eval.every and c.learner_steps % cfg.eval.every == 0 and c.learner_steps < cfg.train.steps:
            self._save_for_evaluation()
        if cfg.train.checkpoint_every and c.learner_steps % cfg.train.checkpoint_every == 0 \
                and c.learner_steps < cfg.train.steps:
            self._checkpoint()
        if c.learner_steps % cfg.logging.log_every == 0 or c.learner_steps == cfg.train.steps:
            self.log(f"step {c.learner_steps}/{cfg.train.steps} | loss {record['loss']:.4g} | margin "
                     f"{record['reward_margin']:+.3f} | {record['samples_per_s']:.1f} samples/s | buffer "
                     f"{record['buffer_size']} | version {version} (lag {record['weight_version_lag']:.1f}) | "
                     f"{elapsed:.0f}s")

    # -- checkpoints, restarts, evaluation ------------------------------------------------------------------------

    def _checkpoint(self, final: bool = False) -> Path:
        self.sync.wait()  # generators serve exactly these weights (checkpoint_every is a multiple of sync_every)
        directory = checkpoint.save(self, self._count_restarts(), final)
        self.log(f"[selfplay] checkpoint {directory}")
        return directory

    def _count_restarts(self) -> dict[str, int]:
        """Recover the generators and judges that Ray restarted while idle (no call of ours failed, so nothing told
        us), then count every restart of this run, resumed attempts included."""
        for role, actors in (("generator", self.generators), ("judge", self.judges)):
            for i in range(len(actors)):
                self._recover(role, i)
        now = {**self.restarts, "replay_shard": self.restarts["replay_shard"] + self.replay.restarts}
        return {k: v + self.restarts_before.get(k, 0) for k, v in now.items()}

    def _save_for_evaluation(self, timed: bool = False) -> None:
        """Learner rank 0 writes the policy to out_dir/evals/ now; it is evaluated after the loop (`_evaluate_all`).
        `timed` (eval.every_seconds): it is marked with the loop's seconds when written — in async mode the step
        queued behind the one just finished may run first, and the file then holds that step's weights."""
        path = self.out / "evals" / f"step_{self.counters.learner_steps}.safetensors"
        step = self.learners.save_policy(path)
        seconds = round(time.perf_counter() - self.t0, 3) if timed else None
        self.evals_due.append({"step": step, "seconds": seconds, "path": str(path)})

    def _evaluate_all(self, final_policy: Path, loop_seconds: float) -> dict[str, Any]:
        """The policies saved during the loop, then the final one, each against the initial policy on the
        generators (their files deleted once evaluated). With eval.every_seconds also {"timed_evals": [{seconds,
        step, winrate_vs_initial, stderr, …}]}, the final policy at the loop's end included."""
        records: dict[str, dict] = {}  # a file due at a step and at a time is evaluated once
        timed = []
        for due in self.evals_due:
            if due["path"] not in records:
                records[due["path"]] = self._evaluate(due["step"], due["path"])
            if due["seconds"] is None:
                self.evals.append(records[due["path"]])
            else:
                timed.append({"seconds": due["seconds"], **records[due["path"]]})
        self.evals.append(self._evaluate(self.counters.learner_steps, final_policy))
        for path in records:
            Path(path).unlink(missing_ok=True)
        self.evals_due = []
        if not self.cfg.eval.every_seconds:
            return {}
        return {"timed_evals": [*timed, {"seconds": round(loop_seconds, 3), **self.evals[-1]}]}

    def _evaluate(self, step: int, policy_file: str | Path) -> dict[str, Any]:
        record = self.evaluation.evaluate(step, policy_file)
        self.log(f"[eval] step {step}: win rate vs initial {record['winrate_vs_initial']:.3f} "
                 f"± {record['stderr']:.3f}" + (f", task score {record['task_score']:.3f} (initial "
                                                 f"{record['initial_task_score']:.3f})" if self.task else ""))
        return record

    def _shutdown(self) -> None:
        for handle in self.generators + self.judges:
            ray.kill(handle)
        self.generators, self.judges = [], []
        if self.replay is not None:
            self.replay.shutdown()
            self.restarts["replay_shard"] += self.replay.restarts  # a resumed attempt builds a new buffer
            self.replay.restarts = 0
        if self.learners is not None:
            self.learners.shutdown()
