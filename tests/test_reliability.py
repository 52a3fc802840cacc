"""Faults on a real Ray cluster: actors killed mid-run are restarted and recovered, a learner failure resumes by
itself. (A killed job that resumes to the same weights, and a node that dies: tests/test_multinode.py.)"""

import json
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


def start_driver(cfg, out: Path, resume: bool = False):
    from actors.driver import Driver

    driver, result = Driver(cfg, out, log=print), {}

    def run():
        try:
            result["summary"] = driver.run(resume=resume)
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


def kill_when_held(ray, points: dict[str, tuple], thread, timeout_s: float = 300) -> list[str]:
    """points: {name: (actor, marker)}. Kill each actor once it is held inside its armed call (its marker exists),
    in whatever order they get there; returns the order."""
    killed = []
    while len(killed) < len(points):
        wait_for(lambda: any(m.exists() for n, (_, m) in points.items() if n not in killed) or not thread.is_alive(),
                 timeout_s, f"an armed call of {sorted(set(points) - set(killed))}")
        assert thread.is_alive(), f"the run ended before {sorted(set(points) - set(killed))} were held"
        for name, (actor, marker) in points.items():
            if name not in killed and marker.exists():
                ray.kill(actor, no_restart=False)  # Ray restarts it; the driver must recover it
                killed.append(name)
    return killed


def test_killed_generator_judge_and_replay_shard_are_restarted_and_nothing_is_lost(ray_cluster, tmp_path,
                                                                                   warm_policy_dir):
    # max_reuse=1: every step needs fresh rows, so the run cannot finish while an actor is held
    cfg = demo_config("sppo", "async", quick=True, extra=[
        "train.steps=16", f"model.policy={warm_policy_dir}", "eval.prompts=10", "resources.generator_cpus=0.25",
        "replay.max_reuse=1"])
    out = tmp_path / "chaos"
    driver, thread, result = start_driver(cfg, out)
    wait_for(lambda: driver.sync is not None or not thread.is_alive(), 300, "the actors")
    # each actor is killed inside a call, at a known point: its second request / judge call / add from now on
    points = {"generator": (driver.generators[0], "request"), "judge": (driver.judges[0], "judge"),
              "replay_shard": (driver.replay.shards[0], "add")}
    for name, (actor, point) in points.items():
        ray_cluster.get(actor.hold.remote(point, str(tmp_path / f"{name}.held"), 1), timeout=120)
    kill_when_held(ray_cluster, {n: (a, tmp_path / f"{n}.held") for n, (a, _) in points.items()}, thread)
    summary = finish(thread, result)
    assert summary["learner_steps"] == cfg.train.steps and summary["policy_version"] == cfg.train.steps
    assert summary["actor_restarts"] == {"generator": 1, "judge": 1, "replay_shard": 1}
    # the held request and the held judge call were sent again, not dropped
    assert summary["requests_reissued"] >= 2
    assert summary["rows_lost"] == 0  # every acknowledged row is in the buffer, or was sampled/evicted/retired
    assert summary["rows_replayed_after_restart"] >= 1  # rows acknowledged before the shard died came back
    # the restarted generator rejoined the weight pushes: it ends serving the final version
    assert summary["generator_versions"] == [cfg.train.steps] * cfg.resources.num_generators
    assert json.loads((out / "summary.json").read_text())["actor_restarts"] == summary["actor_restarts"]


def test_a_generator_killed_inside_a_broadcast_rejoins_the_collective_group(ray_cluster, tmp_path, warm_policy_dir):
    """weight_sync.transport: collective, async, two generators. Generator 0 is killed while it holds up a weight
    broadcast (inside its second receive): rank 0's send fails and it closes the group, so generator 1's receive
    fails at once instead of at its timeout; the restarted generator 0 comes back through a new group that every
    member joins, and a new version goes to both. The run finishes with both on the final version."""
    steps = 8
    cfg = demo_config("sppo", "async", quick=True, extra=[
        f"train.steps={steps}", f"model.policy={warm_policy_dir}", "eval.prompts=10", "resources.generator_cpus=0.25",
        "resources.num_generators=2", "weight_sync.transport=collective", "weight_sync.bucket_mb=1"])
    out = tmp_path / "collective-chaos"
    driver, thread, result = start_driver(cfg, out)
    wait_for(lambda: driver.sync is not None or not thread.is_alive(), 300, "the actors")
    marker = tmp_path / "receive.held"
    ray_cluster.get(driver.generators[0].hold.remote("receive", str(marker), 1), timeout=120)
    started = time.time()
    kill_when_held(ray_cluster, {"generator": (driver.generators[0], marker)}, thread)
    summary = finish(thread, result)
    assert time.time() - started < 300  # nobody waited out a broadcast timeout (600 s)
    assert summary["learner_steps"] == steps and summary["actor_restarts"]["generator"] == 1
    assert summary["policy_version"] == steps + 1  # every step's push, and the rejoin's
    assert summary["generator_versions"] == [steps + 1] * 2


def final_weights(out: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(out / "checkpoints" / f"step_{step}" / "model" / "model.safetensors"))


def test_a_learner_failure_resumes_from_the_last_checkpoint_by_itself(ray_cluster, tmp_path, warm_policy_dir):
    """Two learner ranks; rank 1 dies inside step 7 (as Ray's memory monitor kills one). Rank 0's collective then
    fails with gloo's `Connection reset by peer`, which must still be read as rank 1's death: the run resumes."""
    cfg = demo_config("sppo", "sync", quick=True, extra=[
        "train.steps=12", "train.checkpoint_every=2", "train.max_resumes=1", f"model.policy={warm_policy_dir}",
        "eval.prompts=10", "resources.generator_cpus=0.25", "resources.num_learners=2",
        "resources.learner_cpus=0.5"])
    out = tmp_path / "learner-dies"
    driver, thread, result = start_driver(cfg, out)
    wait_for(lambda: driver.sync is not None or not thread.is_alive(), 300, "the actors")
    # rank 1 dies inside step 7: the checkpoints of steps 2, 4 and 6 are written, the run is not finished
    marker = tmp_path / "learner.held"
    ray_cluster.get(driver.learners.actors[1].hold.remote("train_step 7", str(marker)), timeout=120)
    wait_for(lambda: marker.exists() or not thread.is_alive(), 300, "step 7")
    assert (out / "checkpoints" / "step_6" / "driver_state.json").exists()
    ray_cluster.kill(driver.learners.actors[1])
    summary = finish(thread, result)
    assert summary["resumed_from"] == [6] and summary["learner_steps"] == cfg.train.steps
    assert summary["rows_lost"] == 0
