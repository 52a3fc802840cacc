"""`selfplay demo` / `selfplay run` start a fresh local Ray cluster unless told to join one: a Ray head that was
killed (`kill -9`, not `ray stop`) leaves /tmp/ray/ray_current_cluster behind, and a plain `ray.init()` would retry
its dead address for minutes. (An unreachable --address / RAY_ADDRESS is one error at once: test_cli_errors.py.)
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def test_a_demo_after_a_killed_ray_head_runs_on_a_fresh_local_cluster(tmp_path):
    # a Ray temp dir of our own (short: Ray's socket paths must fit in 107 bytes), so the stale file we leave
    # is ours, not the machine's
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=str(ray_tmp), RAY_AUTH_MODE="disabled")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray_cli = Path(sys.executable).parent / "ray"
    stale = ray_tmp / "ray" / "ray_current_cluster"
    head = subprocess.Popen([str(ray_cli), "start", "--head", f"--port={port}", "--num-cpus=1",
                             "--include-dashboard=false", "--block"], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (stale.exists() and stale.read_text().strip().endswith(f":{port}")):
            assert head.poll() is None and time.time() < deadline, "the Ray head did not start"
            time.sleep(0.2)
    finally:
        os.killpg(head.pid, signal.SIGKILL)  # the head and every process it started, with no clean-up
        head.wait(timeout=60)
    assert stale.read_text().strip().endswith(f":{port}")  # left behind, pointing at a dead GCS

    try:
        out = tmp_path / "demo"
        t0 = time.time()
        demo = subprocess.run(
            [sys.executable, "-m", "selfplay.cli", "demo", "--quick", "--out", str(out), "--set", "train.steps=2",
             "--set", "eval.prompts=10", "--set", "logging.log_every=1"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
        output = demo.stdout + demo.stderr
        assert demo.returncode == 0, output[-4000:]
        assert "Failed to connect to GCS" not in output
        assert "[selfplay] starting a local Ray cluster for this run" in demo.stdout
        assert json.loads((out / "summary.json").read_text())["learner_steps"] == 2
        print(f"demo after a killed head: {time.time() - t0:.0f}s")
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
