"""Ray job submission to the session's cluster (its dashboard's job server), the working directory uploaded."""

import json
import os
import sys
from pathlib import Path

import pytest

from deploy import submit as jobs

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def test_submit_demo_config_as_a_ray_job_and_read_its_outputs(ray_nodes, tmp_path, monkeypatch):
    ray_head = ray_nodes.dashboard_url  # the session's cluster: its code travels as the job's working_dir
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
