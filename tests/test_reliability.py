"""Faults on a real Ray cluster: actors killed mid-run are restarted and recovered, a killed job resumes from its
checkpoint to the same final step (and, in sync mode, to the same weights), a learner failure resumes by itself."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from selfplay.demo import demo_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]
ROOT = Path(__file__).resolve().parent.parent


def steps_done(out: Path) -> int:
    path = out / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return json.loads(lines[-1])["step"] if lines else 0


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.time() + timeout_s
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def start_driver(cfg, out: Path):
    from actors.driver import Driver

    driver, result = Driver(cfg, out, log=print), {}

    def run():
        try:
            result["summary"] = driver.run()
        except BaseException as e:  # re-raised by the test
            result["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return driver, thread, result


def finish(thread, result) -> dict:
    thread.join(timeout=600)
    assert not thread.is_alive(), "the run did not finish"
    if "error" in result:
        raise result["error"]
    return result["summary"]


def test_killed_generator_judge_and_replay_shard_are_restarted_and_nothing_is_lost(ray_cluster, tmp_path,
                                                                                   warm_policy_dir):
    cfg = demo_config("sppo", "async", quick=True, extra=[
        "train.steps=24", f"model.policy={warm_policy_dir}", "eval.prompts=10", "resources.generator_cpus=0.25"])
    out = tmp_path / "chaos"
    driver, thread, result = start_driver(cfg, out)
    wait_for(lambda: steps_done(out) >= 3 or not thread.is_alive(), 300, "step 3")
    # mid-run: a generator (with a request in flight), a judge and a replay shard die; Ray restarts them
    ray_cluster.kill(driver.generators[0], no_restart=False)
    ray_cluster.kill(driver.judges[0], no_restart=False)
    ray_cluster.kill(driver.replay.shards[0], no_restart=False)
    summary = finish(thread, result)
    assert summary["learner_steps"] == cfg.train.steps and summary["policy_version"] == cfg.train.steps
    assert summary["actor_restarts"] == {"generator": 1, "judge": 1, "replay_shard": 1}
    assert summary["rows_lost"] == 0  # every acknowledged row is in the buffer, or was sampled/evicted/retired
    assert summary["requests_reissued"] >= 1  # the generator's in-flight request was sent again, not dropped
    # the restarted generator rejoined the weight pushes: it ends serving the final version
    assert summary["generator_versions"] == [cfg.train.steps] * cfg.resources.num_generators
    assert json.loads((out / "summary.json").read_text())["actor_restarts"] == summary["actor_restarts"]


def final_weights(out: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(out / "checkpoints" / f"step_{step}" / "model" / "model.safetensors"))


def test_a_killed_job_resumes_from_its_checkpoint_to_the_same_final_step_and_weights(ray_cluster, tmp_path,
                                                                                      warm_policy_dir):
    from actors.driver import Driver
    from selfplay.config import load_config

    overrides = ["train.steps=10", "train.checkpoint_every=2", f"model.policy={warm_policy_dir}", "eval.prompts=10",
                 "resources.generator_cpus=0.25", "train.batch_size=16", "generation.prompts_per_request=16",
                 "sppo.k=4", "logging.log_every=1"]
    cfg = load_config(str(ROOT / "configs" / "demo.yaml"), overrides)
    straight = Driver(cfg, tmp_path / "straight", log=print).run()

    out = tmp_path / "killed"
    address = ray_cluster._private.worker.global_worker.node.address  # the job joins the session's cluster
    job = subprocess.Popen(
        [sys.executable, "-m", "selfplay.cli", "run", str(ROOT / "configs" / "demo.yaml"), "--out", str(out),
         *[a for o in overrides for a in ("--set", o)]],
        cwd=ROOT, env={**os.environ, "RAY_ADDRESS": address}, start_new_session=True)
    try:
        wait_for(lambda: (out / "checkpoints" / "step_4" / "driver_state.json").exists() or job.poll() is not None,
                 400, "the checkpoint at step 4")
        os.killpg(job.pid, signal.SIGKILL)  # the whole job, mid-run: no clean-up of any kind
    finally:
        job.wait(timeout=60)
    assert not (out / "summary.json").exists(), "the job finished before it could be killed"

    resumed = Driver(load_config(str(out / "config.yaml")), out, log=print).run(resume=True)
    assert resumed["resumed_from"] and resumed["resumed_from"][0] >= 4
    for key in ("learner_steps", "policy_version", "samples_trained", "rows_lost"):
        assert resumed[key] == straight[key], key
    assert resumed["rows_lost"] == 0
    # same optimizer, RNG, replay contents and prompt stream: the resumed run ends on the very same weights
    a, b = final_weights(tmp_path / "straight", 10), final_weights(out, 10)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11))  # the steps run again after the checkpoint replaced the killed run's lines


def test_a_learner_failure_resumes_from_the_last_checkpoint_by_itself(ray_cluster, tmp_path, warm_policy_dir):
    cfg = demo_config("sppo", "sync", quick=True, extra=[
        "train.steps=12", "train.checkpoint_every=2", "train.max_resumes=1", f"model.policy={warm_policy_dir}",
        "eval.prompts=10", "resources.generator_cpus=0.25"])
    out = tmp_path / "learner-dies"
    driver, thread, result = start_driver(cfg, out)
    wait_for(lambda: (out / "checkpoints" / "step_4" / "driver_state.json").exists() or not thread.is_alive(), 300,
             "the checkpoint at step 4")
    ray_cluster.kill(driver.learners.actors[0])
    summary = finish(thread, result)
    assert summary["resumed_from"] and summary["learner_steps"] == cfg.train.steps
    assert summary["rows_lost"] == 0
