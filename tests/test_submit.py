"""Ray job submission against a head this test starts on its own ports (and stops, alone)."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from deploy import submit as jobs

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path, monkeypatch):
    """`ray start --head --block` in its own process group: killing that group stops this head and nothing else
    (`ray stop` would stop every Ray process on the machine, the test session's cluster included)."""
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # Ray 2.60 token auth: off on both sides for a local head
    port, dashboard = free_port(), free_port()
    # every port the head opens is its own: the session's test cluster already holds Ray's default agent ports
    own_ports = [f"--{flag}={free_port()}" for flag in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port",
        "ray-client-server-port", "node-manager-port", "object-manager-port")]
    ray_bin = Path(sys.executable).parent / "ray"
    temp = tempfile.mkdtemp(prefix="rayh", dir="/tmp")  # AF_UNIX socket paths must stay under 108 bytes
    log = (tmp_path / "head.log").open("w")
    head = subprocess.Popen(
        [str(ray_bin), "start", "--head", "--block", f"--port={port}", f"--dashboard-port={dashboard}",
         "--dashboard-host=127.0.0.1", "--include-dashboard=true", "--num-cpus=4", "--disable-usage-stats",
         f"--temp-dir={temp}", *own_ports],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, "RAY_AUTH_MODE": "disabled"},
    )
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.time() + 120
    while time.time() < deadline and head.poll() is None:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            break
        except OSError:
            time.sleep(1)
    else:
        os.killpg(head.pid, signal.SIGTERM)
        pytest.fail(f"the Ray head did not come up: {(tmp_path / 'head.log').read_text()[-2000:]}")
    yield address
    os.killpg(head.pid, signal.SIGTERM)
    head.wait(timeout=60)
    shutil.rmtree(temp, ignore_errors=True)


def test_submit_demo_config_as_a_ray_job_and_read_its_outputs(ray_head, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "secret-not-in-any-file")
    out = tmp_path / "job-out"
    command = [sys.executable, "-m", "selfplay.cli", "run", "configs/demo.yaml", "--out", str(out),
               "--set", "train.steps=2", "--set", "warmup.steps=30", "--set", "eval.prompts=10",
               "--set", "eval.every=0", "--set", "train.batch_size=16", "--set", "generation.prompts_per_request=16"]
    sid = jobs.submit(command, address=ray_head, working_dir=ROOT, env={"SELFPLAY_TEST": "1"})
    final = jobs.wait(sid, address=ray_head, timeout_s=600)
    logs = jobs.logs(sid, ray_head)
    assert final == "SUCCEEDED", logs[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["learner_steps"] == 2 and summary["algorithm"] == "sppo"
    assert "win rate vs initial" in logs
    written = "".join(p.read_text(errors="ignore") for p in out.rglob("*") if p.is_file() and p.suffix in
                      (".yaml", ".json", ".jsonl"))
    assert "secret-not-in-any-file" not in written  # secrets reach the job's env, never its files


def test_runtime_env_passes_secrets_as_env_and_excludes_heavy_dirs(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "k")
    spec = jobs.runtime_env(ROOT, env={"A": "1"})
    assert spec["env_vars"] == {**{k: os.environ[k] for k in jobs.PASS_THROUGH if k in os.environ}, "A": "1"}
    assert ".venv" in spec["excludes"] and spec["working_dir"] == str(ROOT)
    with pytest.raises(ValueError, match="nothing to run"):
        jobs.submit([], address="http://127.0.0.1:1")
