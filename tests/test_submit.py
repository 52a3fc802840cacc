"""The job's runtime_env. A job submitted end to end, killed and resubmitted: tests/test_multinode.py."""

import os
from pathlib import Path

import pytest

from deploy import submit as jobs

ROOT = Path(__file__).resolve().parent.parent


def test_runtime_env_passes_secrets_as_env_and_excludes_heavy_dirs(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "k")
    spec = jobs.runtime_env(ROOT, env={"A": "1"})
    assert spec["env_vars"] == {**{k: os.environ[k] for k in jobs.PASS_THROUGH if k in os.environ}, "A": "1"}
    assert ".venv" in spec["excludes"] and spec["working_dir"] == str(ROOT)
    assert set(jobs.runtime_env(None, env={"A": "1"})) == {"env_vars"}  # --no-upload: the code is on the nodes
    with pytest.raises(ValueError, match="nothing to run"):
        jobs.submit([], address="http://127.0.0.1:1")
