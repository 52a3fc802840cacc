"""The driver: builds generators, judges, replay shards and learners from the config and runs self-play.

    prompts → GeneratorActor ×G → JudgeActor ×J → ReplayBuffer (S shards) → LearnerGroup (L ranks)
                ▲                                                               │
                └────────────── WeightSync (object store | broadcast) ◄─────────┘

sync  — lock-step, the papers' schedule: generate → judge → store → train → push weights (and wait).
async — generators never wait: each always has a request in flight; judged rows stream into the buffer;
        learners train from the buffer as soon as it holds a batch; weights are pushed every `sync_every`
        steps without waiting, and generators apply them between batches. Rows more than
        `replay.max_staleness` versions old are dropped at sampling time and counted.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray

from actors.generator import GeneratorActor
from actors.judge import JudgeActor
from actors.learner import LearnerGroup
from actors.metrics import RunMetrics, plot
from actors.remote import ActorDiedError, get_all, wait_restarted
from actors.replay import ReplayBuffer
from actors.weight_sync import WeightSync
from selfplay.config import Config, check_resources
from selfplay.preflight import latest_checkpoint, run_prompts
from selfplay.recipes import make_recipe
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
class Counters:
    samples_generated: int = 0  # responses sampled
    groups_judged: int = 0
    rows_added: int = 0  # replay rows acknowledged by the buffer
    skipped_ties: int = 0  # judged groups without a row: the judge could not tell the candidates apart,
    skipped_invalid: int = 0  # … it returned NaN / inf / an out-of-range probability,
    skipped_empty: int = 0  # … or every candidate was empty
    empty_responses: int = 0  # empty candidates, judged as losing without asking the judge
    samples_trained: int = 0
    learner_steps: int = 0
    weight_syncs: int = 0
    requests_reissued: int = 0  # generator requests or judge calls sent again after their actor died


class LearnerFailure(RuntimeError):
    """A learner rank died: the step cannot finish. The run resumes from its last checkpoint."""


@dataclasses.dataclass
class Request:
    """A generator request, kept until its rows are stored, so that it can be sent again."""
    generator: int
    prompts: list[Prompt]
    seed: int


def _prompt(d: dict[str, Any]) -> Prompt:
    return Prompt(**{**d, "messages": tuple(d["messages"]) if d.get("messages") else None})


class Driver:
    def __init__(self, cfg: Config, out_dir: str | Path, log: Callable[[str], None] = print):
        self.cfg, self.out, self.log = cfg, Path(out_dir), log
        self.counters = Counters()
        self.evals: list[dict[str, Any]] = []
        self.intervals: dict[str, list[tuple[float, float]]] = {"generate": [], "train": []}
        self._requests = 0  # generator requests issued: each gets its own sampling seed
        self._logged_samples = 0  # samples_generated already counted in the Ray counter
        self.restarts = {"generator": 0, "judge": 0, "replay_shard": 0}  # actors Ray restarted, recovered here
        self.resumes: list[int] = []  # steps this run resumed from
        self._resume_state: dict[str, Any] | None = None
        self._restarts_before: dict[str, int] = {}  # restarts before the last resume
        self.backlog: list[Request] = []  # requests to send before new ones (in flight at a resumed checkpoint)
        self.prompts_skipped = 0  # bad records of a prompt file skipped with task.skip_bad_records

    # -- set-up ---------------------------------------------------------------------------------------------------

    def _prompts(self) -> tuple[list[Prompt], list[Prompt], Any]:
        train, held, task, skipped = run_prompts(self.cfg)
        self.prompts_skipped = len(skipped)
        for problem in skipped[:5]:
            self.log(f"[selfplay] skipped {problem}")
        if skipped:
            self.log(f"[selfplay] {len(skipped)} bad record(s) of {self.cfg.task.path} skipped "
                     "(task.skip_bad_records); the first ones are listed above")
        return train, held, task

    def _initial_policy(self) -> str:
        """The tiny model is warmed up into a weak initial policy first; any other model starts as it is."""
        cfg = self.cfg
        if cfg.model.policy != "tiny":
            return cfg.model.policy
        import torch

        from selfplay.models import load_policy_and_tokenizer, save_pretrained
        from selfplay.warmup import supervised_warmup

        torch.manual_seed(cfg.seed)
        model, tok = load_policy_and_tokenizer(cfg.model, cfg.seed)
        if cfg.warmup.steps:
            supervised_warmup(model, tok, self.train_prompts, steps=cfg.warmup.steps, batch_size=cfg.warmup.batch_size,
                              lr=cfg.warmup.lr, seed=cfg.seed, log=self.log, log_every=max(1, cfg.warmup.steps // 2))
        return str(save_pretrained(model, tok, self.out / "initial_policy"))

    def _build(self, policy: str) -> None:
        cfg, r = self.cfg, self.cfg.resources
        cfg_dict = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, policy=policy)).to_dict()
        # generators, judges and replay shards are restarted by Ray when they die and recovered by the driver;
        # learners are not (a step needs every rank): a learner failure resumes the run from a checkpoint
        self.generators = [
            GeneratorActor.options(num_cpus=r.generator_cpus, num_gpus=r.generator_gpus, max_restarts=r.max_restarts)
            .remote(cfg_dict, policy, i) for i in range(r.num_generators)
        ]
        self.judges = [
            JudgeActor.options(num_cpus=r.judge_cpus, num_gpus=r.judge_gpus, max_restarts=r.max_restarts)
            .remote(cfg.judge, cfg.task, cfg.algorithm) for _ in range(r.num_judges)
        ]
        self.replay = ReplayBuffer.from_config(cfg)
        self.learners = LearnerGroup(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, policy=policy)))
        self.pids = {"generator": self._pids(self.generators, "generator"), "judge": self._pids(self.judges, "judge")}
        if self._resume_state is not None:
            self._restore(self._resume_state)
        self.sync = WeightSync(self.learners, self.generators, transport=cfg.weight_sync.transport, mode=cfg.mode,
                               bucket_bytes=cfg.weight_sync.bucket_mb << 20, which=self.recipe.weights, timeout_s=600)
        self.sync.on_generator_died = self._generator_died

    @staticmethod
    def _pids(actors: list, role: str) -> dict[int, int]:
        return {i: s["pid"] for i, s in get_all({i: a.stats.remote() for i, a in enumerate(actors)}, 600, "start",
                                                 role).items()}

    # -- recovery of restarted actors -----------------------------------------------------------------------------

    def _restarted(self, role: str, i: int) -> None:
        """Actor i of `role` died and Ray restarts it: wait for it, count the restart once (by its new pid)."""
        actors = self.generators if role == "generator" else self.judges
        try:
            pid = wait_restarted(actors[i], 600, role, i)["pid"]
        except ActorDiedError as e:
            raise RuntimeError(f"{role} {i} died and was not restarted (resources.max_restarts="
                               f"{self.cfg.resources.max_restarts} reached): {e}") from e
        if pid != self.pids[role][i]:
            self.pids[role][i] = pid
            self.restarts[role] += 1
            self.log(f"[selfplay] {role} {i} was restarted (pid {pid}); any work it lost is sent again")

    def _generator_died(self, i: int) -> None:
        self._restarted("generator", i)
        self.sync.restore_generator(i)  # the newest weights, before it serves its next request

    def _reissue(self, request: Request) -> ray.ObjectRef:
        self.counters.requests_reissued += 1
        return self.recipe.request(self.generators[request.generator], request.prompts, seed=request.seed)

    # -- the run --------------------------------------------------------------------------------------------------

    def run(self, resume: bool = False) -> dict[str, Any]:
        """Run to `train.steps`. resume=True continues the run in `out_dir` from its newest complete checkpoint.
        A learner failure resumes from the newest checkpoint up to `train.max_resumes` times."""
        cfg = self.cfg
        start = time.perf_counter()
        self.out.mkdir(parents=True, exist_ok=True)
        # an impossible layout (more GPUs than the cluster has) fails here, naming the fields, not as a hang
        check_resources(cfg, ray.cluster_resources(), [n["Resources"] for n in ray.nodes() if n["Alive"]])
        self.recipe = make_recipe(cfg)
        self.train_prompts, self.eval_prompts, self.task = self._prompts()
        self.stream = PromptStream(self.train_prompts, cfg.seed)
        if resume:
            checkpoint = latest_checkpoint(self.out)
            if checkpoint is None:
                raise FileNotFoundError(f"{self.out}: no complete checkpoint to resume from (a checkpoint is complete "
                                        "once its driver_state.json is written; set train.checkpoint_every)")
            self._resume_state = json.loads((checkpoint / "driver_state.json").read_text())
            self._restarts_before = self._resume_state["restarts"]  # counted by the process that was stopped
            self.initial_policy = self._resume_state["initial_policy"]
            self.log(f"[selfplay] resuming {self.out} from {checkpoint.name}")
        else:
            (self.out / "config.yaml").write_text(cfg.to_yaml())
            self.log(f"[selfplay] {cfg.algorithm} in {cfg.mode} mode → {self.out}")
            self.initial_policy = self._initial_policy()
        while True:
            try:
                summary = self._run_once(start)
                break
            except LearnerFailure as e:
                checkpoint = latest_checkpoint(self.out)
                if len(self.resumes) >= cfg.train.max_resumes or checkpoint is None:
                    hint = "" if checkpoint else " (no checkpoint yet: set train.checkpoint_every)"
                    raise LearnerFailure(f"{e}. Resume with: selfplay run --resume {self.out}{hint}") from e
                self.log(f"[selfplay] {e}; resuming from {checkpoint.name} "
                         f"({len(self.resumes) + 1}/{cfg.train.max_resumes})")
                self._resume_state = json.loads((checkpoint / "driver_state.json").read_text())
        self.log(f"[selfplay] done in {summary['wall_seconds']:.0f}s: win rate vs initial "
                 f"{summary['winrate_vs_initial']:.3f} on {summary['eval_prompts']} held-out prompts → "
                 f"{self.out / 'summary.json'}")
        return summary

    def _run_once(self, start: float) -> dict[str, Any]:
        cfg = self.cfg
        self.log(f"[selfplay] starting {cfg.resources.num_generators} generator(s), {cfg.resources.num_judges} judge(s), "
                 f"{cfg.resources.replay_shards} replay shard(s), {cfg.resources.num_learners} learner(s)")
        self.metrics = None
        self.generating: dict[ray.ObjectRef, Request] = {}
        self.judging: dict[ray.ObjectRef, tuple[int, Request, list]] = {}
        try:
            self._build(self.initial_policy)
            self.metrics = RunMetrics(self.out, cfg, run_name=self.out.name)
            self.t0 = time.perf_counter()
            if self.recipe.weights == "ema" or self._resume_state is not None:
                # SAPO generators serve the EMA policy from the first batch; resumed ones the checkpoint's weights
                self.sync.push(republish=self._resume_state is not None)
                self.sync.wait()
            self._resume_state = None
            (self._run_sync if cfg.mode == "sync" else self._run_async)()
            self.sync.wait()
            self.utilization = self._utilization(time.perf_counter() - self.t0)
            final = self._checkpoint()
            self._evaluate(final_dir=final / "model")
            summary = self._summary(time.perf_counter() - start)
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
            self.metrics.summary(summary)
            plot(self.metrics.records, self.evals, self.out)
            return summary
        except ActorDiedError as e:
            if e.role == "learner rank":
                raise LearnerFailure(f"learner rank {e.key} died at step {self.counters.learner_steps}") from e
            raise
        finally:
            if self.metrics is not None:
                self.metrics.close()
            self._shutdown()

    # -- requests: sent, collected, and sent again when their actor died ------------------------------------------

    def _request(self, i: int) -> ray.ObjectRef:
        """Generator i's next request: a backlog request first (in flight when a resumed checkpoint was taken)."""
        if self.backlog:
            request = self.backlog.pop(0)
            request.generator = i
        else:
            self._requests += 1
            request = Request(i, self.stream.take(self.cfg.generation.prompts_per_request),
                              self.cfg.seed * 100_003 + self._requests)
        ref = self.recipe.request(self.generators[i], request.prompts, seed=request.seed)
        self.generating[ref] = request
        return ref

    def _generated(self, ref: ray.ObjectRef) -> list[dict] | None:
        """The request's results, or None when its generator died (it is restarted and the request sent again)."""
        request = self.generating.pop(ref)
        try:
            return get_all({request.generator: ref}, 600, "generate", "generator")[request.generator]
        except ActorDiedError:
            self._generator_died(request.generator)
            self.generating[self._reissue(request)] = request
            return None

    def _judge(self, results: list[dict], request: Request) -> ray.ObjectRef:
        self.counters.samples_generated += self.recipe.responses(results)
        j = request.generator % len(self.judges)
        groups = self.recipe.groups(results)
        ref = self.judges[j].judge.remote(groups)
        self.judging[ref] = (j, request, groups)
        return ref

    def _judged(self, ref: ray.ObjectRef) -> dict | None:
        """The verdict, or None when the judge died (it is restarted and the same groups sent again)."""
        j, request, groups = self.judging.pop(ref)
        try:
            return get_all({j: ref}, 600, "judge", "judge")[j]
        except ActorDiedError:
            self._restarted("judge", j)
            self.counters.requests_reissued += 1
            self.judging[self.judges[j].judge.remote(groups)] = (j, request, groups)
            return None

    def _store(self, verdict: dict) -> None:
        self.counters.groups_judged += len(verdict["verdicts"])
        for key in ("skipped_ties", "skipped_invalid", "skipped_empty", "empty_responses"):
            setattr(self.counters, key, getattr(self.counters, key) + verdict.get(key, 0))
        self.counters.rows_added += self.replay.add(verdict["rows"])

    # -- the two schedules ----------------------------------------------------------------------------------------

    def _run_sync(self) -> None:
        cfg = self.cfg
        for step in range(self.counters.learner_steps, cfg.train.steps):
            self._maybe_refresh_reference(step)
            # one round of generation per step; more while the buffer cannot fill a batch (ties give no row)
            for _ in range(20):
                t = time.perf_counter()
                for i in range(len(self.generators)):
                    self._request(i)
                while self.generating or self.judging:  # every request generated and judged, whatever died
                    ref = next(iter(self.generating or self.judging))
                    if ref in self.generating:
                        request = self.generating[ref]
                        results = self._generated(ref)
                        if results is not None:
                            self._judge(results, request)
                    else:
                        verdict = self._judged(ref)
                        if verdict is not None:
                            self._store(verdict)
                self.intervals["generate"].append((t, time.perf_counter()))
                if self.replay.stats()["size"] >= cfg.train.batch_size:
                    break
            t = time.perf_counter()
            metrics = self._train_batch()
            self.intervals["train"].append((t, time.perf_counter()))
            self._after_step(metrics)

    def _run_async(self) -> None:
        cfg = self.cfg
        for i in range(len(self.generators)):
            self._request(i)
        started = {ref: time.perf_counter() for ref in self.generating}
        # up to two learner steps queued: the next one starts the moment the last ends, with no driver round trip
        # in between (a weight publish asked for meanwhile runs between them, in the order it was asked). Never
        # past a checkpoint: the learners must be at exactly the checkpoint's step when it is saved.
        training: collections.deque = collections.deque()
        submitted = self.counters.learner_steps
        every = cfg.train.checkpoint_every
        while self.counters.learner_steps < cfg.train.steps:
            while (len(training) < 2 and submitted < cfg.train.steps
                   and not (every and submitted % every == 0 and self.counters.learner_steps < submitted)
                   and self.replay.stats()["size"] >= cfg.train.batch_size):
                self._maybe_refresh_reference(submitted)
                rows = self.replay.sample(cfg.train.batch_size, current_version=self.learner_version())
                if rows.num_rows < cfg.train.batch_size:
                    break
                training.append((self.learners.train_step_async(rows), time.perf_counter(), rows))
                submitted += 1
            waiting = [*self.generating, *self.judging, *(training[0][0] if training else []), *self.sync.waitables()]
            ready, _ = ray.wait(waiting, num_returns=1, timeout=600)
            if not ready:
                raise TimeoutError("no generator, judge, learner or weight publish finished within 600s")
            ref = ready[0]
            if ref in self.generating:  # a generator is done: judge its batch and give it the next one at once
                request = self.generating[ref]
                results = self._generated(ref)
                if results is None:  # its generator was restarted and has the request again
                    started.pop(ref)
                    started.update({r: time.perf_counter() for r in self.generating if r not in started})
                    continue
                self.intervals["generate"].append((started.pop(ref), time.perf_counter()))
                self._judge(results, request)
                started[self._request(request.generator)] = time.perf_counter()
            elif ref in self.judging:
                verdict = self._judged(ref)
                if verdict is not None:
                    self._store(verdict)
            elif training and ref in training[0][0]:
                refs, t, rows = training.popleft()
                metrics = self.learners.finish_step(refs)
                self.intervals["train"].append((t, time.perf_counter()))
                self._after_step(metrics, rows)
            else:  # a weight publish returned: send the generators their loads
                self.sync.poll()
        while self.judging:  # rows already generated are stored, not dropped
            verdict = self._judged(next(iter(self.judging)))
            if verdict is not None:
                self._store(verdict)

    def _train_batch(self) -> dict[str, Any]:
        rows = self.replay.sample(self.cfg.train.batch_size, current_version=self.learner_version())
        if rows.num_rows < self.cfg.train.batch_size:
            c = self.counters
            raise RuntimeError(
                f"only {rows.num_rows} preference pairs for a batch of {self.cfg.train.batch_size}: of "
                f"{c.groups_judged} judged prompts, {c.skipped_ties} had candidates the judge could not tell apart, "
                f"{c.skipped_invalid} got an invalid judgement (NaN/inf) and {c.skipped_empty} had only empty responses. "
                "The policy's samples are too alike (warm it up more, or raise generation.temperature / the K)."
            )
        return {**self.learners.train_step(rows), "_rows": rows}

    def _after_step(self, metrics: dict[str, Any], rows=None) -> None:
        cfg, c = self.cfg, self.counters
        rows = metrics.pop("_rows", rows)
        c.learner_steps += 1
        c.samples_trained += rows.num_rows
        versions = rows.column("policy_version").to_pylist()
        if c.learner_steps % cfg.train.sync_every == 0:
            self.sync.push()
            c.weight_syncs += 1
        else:
            self.sync.poll()
        learner_version = self.learner_version()
        lag = self.sync.version_lag(learner_version)
        stats = self.replay.stats()
        elapsed = time.perf_counter() - self.t0
        record = {
            "step": c.learner_steps, "time": round(elapsed, 3), "loss": metrics["loss"],
            "reward_margin": metrics["reward_margin"], "grad_norm": metrics["grad_norm"],
            "samples_generated": c.samples_generated, "samples_trained": c.samples_trained,
            "samples_per_s": c.samples_generated / elapsed, "buffer_size": stats["size"],
            "samples_dropped_stale": stats["dropped_stale"], "policy_version": learner_version,
            "weight_version_lag": sum(lag.values()) / len(lag),
            "trained_version_lag": learner_version - sum(versions) / len(versions),
            "sync_latency": self.sync.latencies[-1] if self.sync.latencies else None,
        }
        self.metrics.log(record, new_samples=c.samples_generated - self._logged_samples, new_trained=rows.num_rows)
        self._logged_samples = c.samples_generated
        if cfg.eval.every and c.learner_steps % cfg.eval.every == 0 and c.learner_steps < cfg.train.steps:
            self._evaluate()
        if cfg.train.checkpoint_every and c.learner_steps % cfg.train.checkpoint_every == 0 \
                and c.learner_steps < cfg.train.steps:
            self._checkpoint()
        if c.learner_steps % cfg.logging.log_every == 0 or c.learner_steps == cfg.train.steps:
            self.log(f"step {c.learner_steps}/{cfg.train.steps} | loss {record['loss']:.4g} | margin "
                     f"{record['reward_margin']:+.3f} | {record['samples_per_s']:.1f} samples/s | buffer "
                     f"{record['buffer_size']} | version {learner_version} (lag {record['weight_version_lag']:.1f}) | "
                     f"{elapsed:.0f}s")

    def learner_version(self) -> int:
        """The newest weight version asked of the learners (generators serve it once its push completes)."""
        return self.sync.latest_version

    def _maybe_refresh_reference(self, step: int) -> None:
        if self.recipe.refresh_reference(step, self.cfg.train.steps):
            self.learners.refresh_reference()
            self.log(f"[selfplay] step {step}: new SPPO iteration, reference ← current policy")

    # -- checkpoints and resume -----------------------------------------------------------------------------------

    def _checkpoint(self) -> Path:
        """Learners (weights, optimizer, EMA, reference, RNG), replay snapshot, then the driver's state — written
        last, atomically: a checkpoint without driver_state.json is incomplete and never resumed from."""
        self.sync.wait()  # generators serve exactly these weights (checkpoint_every is a multiple of sync_every)
        directory = self.out / "checkpoints" / f"step_{self.counters.learner_steps}"
        self.learners.save_checkpoint(directory)
        self.replay.snapshot(directory / "replay")
        in_flight = [r for r in self.generating.values()] + [r for _, r, _ in self.judging.values()]
        state = {
            "step": self.counters.learner_steps, "policy_version": self.learner_version(),
            "initial_policy": self.initial_policy, "counters": dataclasses.asdict(self.counters),
            "requests": self._requests, "logged_samples": self._logged_samples, "evals": self.evals,
            "stream": self.stream.state(), "restarts": self._all_restarts(), "resumes": self.resumes,
            # sent again first on resume: their rows were not yet acknowledged when this checkpoint was taken
            "in_flight": [{"prompts": [dataclasses.asdict(p) for p in r.prompts], "seed": r.seed} for r in in_flight],
        }
        tmp = directory / "driver_state.json.tmp"
        tmp.write_text(json.dumps(state))
        tmp.replace(directory / "driver_state.json")
        self.log(f"[selfplay] checkpoint {directory}")
        return directory

    def _restore(self, state: dict[str, Any]) -> None:
        """Put the freshly built actors and the driver back at a checkpoint's step."""
        directory = self.out / "checkpoints" / f"step_{state['step']}"
        self.learners.load_checkpoint(directory)
        self.replay.restore(directory / "replay")
        self.counters = Counters(**state["counters"])
        self._requests, self._logged_samples = state["requests"], state["logged_samples"]
        self.evals, self.resumes = list(state["evals"]), [*state["resumes"], state["step"]]
        self.stream.load_state(state["stream"])
        self.backlog = [Request(0, [_prompt(p) for p in r["prompts"]], r["seed"]) for r in state["in_flight"]]
        metrics = self.out / "metrics.jsonl"  # steps after the checkpoint are run again: their lines go
        if metrics.exists():
            lines = [ln for ln in metrics.read_text().splitlines() if ln and json.loads(ln)["step"] <= state["step"]]
            metrics.write_text("".join(ln + "\n" for ln in lines))

    def _all_restarts(self) -> dict[str, int]:
        """Restarts recovered in this run, resumed attempts included (judges and generators that were restarted
        while idle are found by their new pid)."""
        for role, actors in (("generator", self.generators), ("judge", self.judges)):
            for i in range(len(actors)):
                self._restarted(role, i)
        now = {**self.restarts, "replay_shard": self.restarts["replay_shard"] + self.replay.restarts}
        return {k: v + self._restarts_before.get(k, 0) for k, v in now.items()}

    # -- evaluation and outputs -----------------------------------------------------------------------------------

    def _evaluate(self, final_dir: Path | None = None) -> dict[str, Any]:
        """Current policy vs the initial one on held-out prompts (the task judge, or the configured judge)."""
        from selfplay.evaluate import against_initial
        from selfplay.judges import make_judge
        from selfplay.models import load_causal_lm, load_tokenizer

        cfg = self.cfg
        tok = load_tokenizer(self.initial_policy, cfg.model.trust_remote_code)
        current = load_causal_lm(str(final_dir or self.initial_policy), cfg.model.dtype, cfg.model.trust_remote_code,
                                 tok)
        if final_dir is None:
            current.load_state_dict(self.learners.full_state(), strict=False)
        result = against_initial(cfg, current, self.initial_policy, self.eval_prompts, make_judge(cfg.judge, cfg.task),
                                 self.task, tokenizer=tok)
        record = {"step": self.counters.learner_steps, "winrate_vs_initial": result["winrate"],
                  "stderr": result["stderr"], "task_score": result["task_score_a"],
                  "initial_task_score": result["task_score_b"], "n": result["n"]}
        self.evals.append(record)
        self.log(f"[eval] step {record['step']}: win rate vs initial {record['winrate_vs_initial']:.3f} "
                 f"± {record['stderr']:.3f}" + (f", task score {record['task_score']:.3f} (initial "
                                                 f"{record['initial_task_score']:.3f})" if self.task else ""))
        return record

    def _utilization(self, loop_seconds: float) -> dict[str, Any]:
        """Throughput and idle fractions of the training loop (set-up, final checkpoint and eval excluded). Busy
        time is measured inside the actors: generating or loading weights; training, publishing weights."""
        generators = get_all({i: g.stats.remote() for i, g in enumerate(self.generators)}, 60, "stats", "generator")
        learners = self.learners.stats()
        busy_g = [s["busy_seconds"] for s in generators.values()]
        busy_l = [s["busy_seconds"] for s in learners]
        return {
            "loop_seconds": round(loop_seconds, 3),
            "samples_trained_per_s": self.counters.samples_trained / loop_seconds,
            "samples_generated_per_s": self.counters.samples_generated / loop_seconds,
            "generator_idle_fraction": 1 - sum(busy_g) / (len(busy_g) * loop_seconds),
            "learner_idle_fraction": 1 - sum(busy_l) / (len(busy_l) * loop_seconds),
            "generator_versions": [generators[i]["policy_version"] for i in sorted(generators)],  # served at the end
        }

    def _summary(self, wall: float) -> dict[str, Any]:
        c, final, stats = self.counters, self.evals[-1], self.replay.stats()
        return {
            "algorithm": self.cfg.algorithm, "mode": self.cfg.mode, "policy_version": self.learner_version(),
            "learner_steps": c.learner_steps, "samples_generated": c.samples_generated,
            "samples_trained": c.samples_trained, "samples_dropped_stale": stats["dropped_stale"],
            "weight_syncs": c.weight_syncs, "winrate_vs_initial": final["winrate_vs_initial"],
            "winrate_stderr": final["stderr"], "task_score": final["task_score"],
            "initial_task_score": final["initial_task_score"], "eval_prompts": final["n"],
            "wall_seconds": round(wall, 2), "actor_restarts": self._all_restarts(), "resumed_from": self.resumes,
            "requests_reissued": c.requests_reissued, "rows_added": c.rows_added,
            # acknowledged rows the buffer no longer accounts for (in it, sampled away, evicted or dropped): 0
            "rows_lost": c.rows_added - stats["added"], "rows_replayed_after_restart": self.replay.replayed_rows,
            "skipped_ties": c.skipped_ties, "skipped_invalid": c.skipped_invalid, "skipped_empty": c.skipped_empty,
            "empty_responses": c.empty_responses, "prompts_skipped": self.prompts_skipped,
            "generate_train_overlap_seconds": round(self.overlap(), 3),
            "rows_evicted": stats["evicted"], "rows_retired": stats["retired"], **self.utilization,
            "evals": self.evals,
        }

    def overlap(self) -> float:
        """Seconds during which a generation request and a learner step were both running."""
        total = 0.0
        for gs, ge in self.intervals["generate"]:
            for ts, te in self.intervals["train"]:
                total += max(0.0, min(ge, te) - max(gs, ts))
        return total

    def _shutdown(self) -> None:
        for handle in getattr(self, "generators", []) + getattr(self, "judges", []):
            ray.kill(handle)
        if hasattr(self, "replay"):
            self.replay.shutdown()
            self.restarts["replay_shard"] += self.replay.restarts  # a resumed attempt builds a new buffer
            self.replay.restarts = 0
        if hasattr(self, "learners"):
            self.learners.shutdown()
