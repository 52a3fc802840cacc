"""A run across Ray nodes: the session's cluster gets three worker nodes on this host, each with its own custom
resource, and the config pins every role to one of them. Where each actor ran is read from Ray's state API.

    head        the driver (this process, or a submitted job's)
    learners    {learner_node: 2}     both learner ranks (STRICT_PACK)
    generators  {generator_node: 1}   the generator
    services    {service_node: 2}     the judge and the replay shard
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from selfplay.config import load_config
from selfplay.demo import demo_config
from tests.test_reliability import final_weights, finish, start_driver, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.slow]
ROOT = Path(__file__).resolve().parent.parent
PINNED = ["resources.num_learners=2", "resources.learner_cpus=1", "resources.learner_resources.learner_node=1",
          "resources.generator_cpus=1", "resources.generator_resources.generator_node=1",
          "resources.judge_cpus=0.5", "resources.judge_resources.service_node=1",
          "resources.replay_cpus=0.5", "resources.replay_resources.service_node=1"]
ROLES = {"LearnerActor": "learner", "GeneratorActor": "generator", "JudgeActor": "judge",
         "ReplayShardActor": "replay_shard"}


@pytest.fixture(scope="module")
def nodes(ray_nodes):
    """{name: node} of the three worker nodes, removed again after this module (the test that kills one
    replaces it here)."""
    added = {  # started together, waited for once
        "learners": ray_nodes.add_node(num_cpus=2, resources={"learner_node": 2}, object_store_memory=300 << 20,
                                       wait=False),
        "generators": ray_nodes.add_node(num_cpus=1, resources={"generator_node": 1}, object_store_memory=300 << 20,
                                         wait=False),
        "services": ray_nodes.add_node(num_cpus=1, resources={"service_node": 2}, object_store_memory=300 << 20,
                                       wait=False),
    }
    ray_nodes.wait_for_nodes()
    yield added
    for node in added.values():
        if node in ray_nodes.worker_nodes:
            ray_nodes.remove_node(node)


def placed(dashboard: str, before: set[str], nodes: dict) -> dict[str, list[str]]:
    """{role: sorted node names} of the selfplay actors created since `before` (actor ids), from the state API."""
    from ray.util.state import list_actors

    names = {node.node_id: name for name, node in nodes.items()}
    out: dict[str, list[str]] = {}
    for actor in list_actors(address=dashboard, limit=10_000, raise_on_missing_output=False):
        if actor.actor_id not in before and actor.class_name in ROLES:
            out.setdefault(ROLES[actor.class_name], []).append(names.get(actor.node_id, "head"))
    return {role: sorted(where) for role, where in out.items()}


def actor_ids(dashboard: str) -> set[str]:
    from ray.util.state import list_actors

    return {a.actor_id for a in list_actors(address=dashboard, limit=10_000, raise_on_missing_output=False)}


def test_sppo_across_nodes_then_resumed_async_while_the_generators_node_dies(ray_cluster, ray_nodes, nodes,
                                                                             tmp_path, warm_policy_dir):
    """Sync with the collective transport (gloo across the nodes' processes) to a checkpoint; the same run resumed
    in async mode with the object store, and the generator's node dies with a request in flight: Ray moves the
    generator's bundle to a spare node that joined meanwhile, the generator restarts there and is recovered."""
    from actors.driver import Driver

    layout = {"learner": ["learners", "learners"], "generator": ["generators"], "judge": ["services"],
              "replay_shard": ["services"]}
    before = actor_ids(ray_nodes.dashboard_url)
    cfg = demo_config("sppo", "sync", quick=True, extra=[
        *PINNED, "train.steps=2", "train.checkpoint_every=2", f"model.policy={warm_policy_dir}", "eval.prompts=10",
        "train.batch_size=16", "weight_sync.transport=collective"])
    out = tmp_path / "run"
    first = Driver(cfg, out, log=print).run()
    assert first["learner_steps"] == 2 and first["rows_lost"] == 0 and first["generator_versions"] == [2]
    assert placed(ray_nodes.dashboard_url, before, nodes) == layout
    print("placed:", layout)

    before = actor_ids(ray_nodes.dashboard_url)
    # max_reuse=1: every step needs fresh rows, so the run cannot finish while the generator is held
    resumed_cfg = load_config(str(out / "config.yaml"), ["train.steps=5", "mode=async", "replay.max_reuse=1",
                                                          "weight_sync.transport=object_store"])
    driver, thread, result = start_driver(resumed_cfg, out, resume=True)
    wait_for(lambda: driver.sync is not None or not thread.is_alive(), 300, "the actors")
    marker = tmp_path / "generator.held"
    ray_cluster.get(driver.generators[0].hold.remote("request", str(marker), 1), timeout=120)  # its 2nd request
    wait_for(lambda: marker.exists() or not thread.is_alive(), 300, "the generator's second request")
    assert thread.is_alive()
    nodes["spare"] = ray_nodes.add_node(num_cpus=1, resources={"generator_node": 1}, object_store_memory=300 << 20)
    ray_nodes.remove_node(nodes.pop("generators"), allow_graceful=False)
    resumed = finish(thread, result)
    assert resumed["resumed_from"] == [2] and resumed["learner_steps"] == 5 and resumed["policy_version"] == 5
    assert resumed["rows_lost"] == 0 and resumed["generator_versions"] == [5]  # the restarted one got the weights
    assert resumed["actor_restarts"]["generator"] == 1 and resumed["requests_reissued"] >= 1
    moved = placed(ray_nodes.dashboard_url, before, nodes)
    assert moved == {**layout, "generator": ["spare"]}
    print("after the node died:", moved)


def test_a_submitted_job_killed_mid_run_resumes_to_the_same_weights_when_submitted_again(
        ray_cluster, ray_nodes, nodes, tmp_path, monkeypatch, warm_policy_dir):
    """`selfplay run --resume auto`, as the RayJob and Slurm entrypoints run it: the first submission starts the
    run, its driver process is killed after the checkpoint of step 2, the same command submitted again resumes,
    and ends on the weights of a run that was never stopped (sync mode: same optimizer, RNG, replay, prompts).
    --no-upload: this host's nodes share one session directory, and a working_dir that one node's runtime-env
    agent unpacks, another's deletes when it is done with it (Ray assumes a node per host)."""
    from actors.driver import Driver
    from deploy import submit as jobs

    overrides = [*PINNED, "train.steps=4", "train.checkpoint_every=2", f"model.policy={warm_policy_dir}",
                 "eval.prompts=10", "train.batch_size=16", "train.micro_batch_size=8",
                 "generation.prompts_per_request=16", "sppo.k=4"]
    straight = Driver(load_config(str(ROOT / "configs/demo.yaml"), overrides), tmp_path / "straight").run()

    monkeypatch.setenv("WANDB_API_KEY", "secret-not-in-any-file")
    out, address = tmp_path / "job-out", ray_nodes.dashboard_url
    command = [sys.executable, "-m", "selfplay.cli", "run", str(ROOT / "configs/demo.yaml"), "--out", str(out),
               "--resume", "auto", *[a for o in overrides for a in ("--set", o)]]

    def submit(sid: str, *wait: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "selfplay.cli", "submit", "--address", address, "--id", sid,
                               "--no-upload", "--env", "SELFPLAY_TEST=1", *wait, "--", *command],
                              cwd=ROOT, capture_output=True, text=True, timeout=900)

    sid = f"multinode-{os.getpid()}"
    assert submit(sid).returncode == 0
    wait_for(lambda: (out / "checkpoints" / "step_2" / "driver_state.json").exists()
             or jobs.status(sid, address) in ("FAILED", "SUCCEEDED", "STOPPED"), 600, "the checkpoint of step 2")
    assert jobs.status(sid, address) == "RUNNING", jobs.logs(sid, address)[-3000:]
    pid = jobs.client(address).get_job_info(sid).driver_info.pid
    os.kill(int(pid), signal.SIGKILL)  # the job's driver, mid-run: no clean-up of any kind
    assert jobs.wait(sid, address=address, timeout_s=120) == "FAILED"
    assert not (out / "summary.json").exists(), "the job finished before its driver could be killed"

    again = submit(sid + "-again", "--wait")  # the same command: it finds the checkpoint and resumes
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-2000:]
    assert "resuming" in again.stdout
    resumed = json.loads((out / "summary.json").read_text())
    assert resumed["resumed_from"][0] >= 2
    for key in ("learner_steps", "policy_version", "samples_trained", "rows_lost"):
        assert resumed[key] == straight[key], key
    assert resumed["rows_lost"] == 0
    a, b = final_weights(tmp_path / "straight", 4), final_weights(out, 4)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 5))  # the steps run again after the checkpoint replaced the killed run's lines
    written = "".join(p.read_text(errors="ignore") for p in out.rglob("*") if p.is_file() and p.suffix in
                      (".yaml", ".json", ".jsonl"))
    assert "secret-not-in-any-file" not in written  # secrets reach the job's env, never its files


def test_an_out_dir_that_one_node_does_not_see_is_refused_before_any_actor(ray_cluster, ray_nodes, tmp_path):
    """A node in its own mount namespace, with an empty tmpfs over the run's directory: a node-local disk where
    the driver's out_dir should be shared storage."""
    from actors.driver import Driver
    from selfplay.placement import PlacementError

    private = tmp_path / "private"
    private.mkdir()
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs none {private}"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"this machine allows no private mount namespace (unshare -m): {probe.stderr.decode()[-200:]}")
    ports = [f"--{flag}={free_port()}" for flag in ("node-manager-port", "object-manager-port", "metrics-export-port",
                                                    "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                    "runtime-env-agent-port")]
    ray_bin = Path(sys.executable).parent / "ray"
    start = (f"mount -t tmpfs none {private} && exec {ray_bin} start --block --address={ray_nodes.address} "
             f"--num-cpus=0 --resources='{{\"blind_node\": 1}}' --object-store-memory={300 << 20} " + " ".join(ports))
    log = tmp_path / "node.log"  # what `ray start` said, for a node that never joins
    with log.open("w") as out:
        node = subprocess.Popen(["unshare", "-m", "sh", "-c", start], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)

    def joined() -> bool:
        if node.poll() is not None:
            raise AssertionError(f"`ray start` in its own mount namespace exited with {node.returncode}: "
                                 f"{log.read_text()[-2000:]}")
        return any(n["Alive"] and "blind_node" in n["Resources"] for n in ray_cluster.nodes())

    try:
        wait_for(joined, 120, f"the node with its own mount namespace (`ray start`'s output: {log})")
        before = actor_ids(ray_nodes.dashboard_url)
        cfg = demo_config("sppo", "sync", quick=True, extra=["resources.judge_cpus=0",
                                                             "resources.judge_resources.blind_node=1"])
        with pytest.raises(PlacementError, match=r"out_dir .*/private/run is not the same directory on every node: "
                                                 r"the node\(s\) of judge do not see what the driver wrote there"):
            Driver(cfg, private / "run").run()
        assert placed(ray_nodes.dashboard_url, before, {}) == {}  # no actor started
        assert not (private / "run" / "initial_policy").exists()  # nor the warm-up
    finally:
        os.killpg(node.pid, signal.SIGTERM)
        node.wait(timeout=60)
        wait_for(lambda: not any(n["Alive"] and "blind_node" in n["Resources"] for n in ray_cluster.nodes()), 60,
                 "the node to leave")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
