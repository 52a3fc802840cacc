"""Submit selfplay runs as Ray jobs (`ray job submit`, from Python): the working directory travels in the job's
runtime_env, secrets travel as environment variables of the job — never written into files.

    selfplay submit --address http://HEAD:8265 -- selfplay run configs/sppo-mistral7b-pairrm.yaml
    selfplay job status|logs|stop SUBMISSION_ID --address http://HEAD:8265

The address defaults to $RAY_ADDRESS, then http://127.0.0.1:8265 (the dashboard's job server).
"""

from __future__ import annotations

import os
import shlex
import time
from pathlib import Path
from typing import Any

# passed through from the submitting shell when set; values go into the job's env, never into a file
PASS_THROUGH = ("WANDB_API_KEY", "WANDB_MODE", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_BASE_URL", "HF_TOKEN",
                "HF_HUB_OFFLINE", "HF_HOME", "RAY_AUTH_MODE")
# never uploaded with the working directory: environments, outputs, caches
EXCLUDES = [".venv", "runs", "wandb", ".git", "**/__pycache__", ".pytest_cache", ".ruff_cache", "*.egg-info"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def client(address: str | None = None):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address or os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265")


def runtime_env(working_dir: str | Path | None = ".", pip: list[str] | None = None, env: dict[str, str] | None = None,
                conda: str | None = None) -> dict[str, Any]:
    """The job's runtime_env: code, extra packages and environment variables (secrets included, in memory only).
    working_dir None: nothing is uploaded, the code is on every node already (the image, a shared filesystem)."""
    env_vars = {k: os.environ[k] for k in PASS_THROUGH if k in os.environ}
    env_vars.update(env or {})
    spec: dict[str, Any] = {"env_vars": env_vars}
    if working_dir is not None:
        spec.update(working_dir=str(Path(working_dir).resolve()), excludes=EXCLUDES)
    if pip:
        spec["pip"] = pip
    if conda:
        spec["conda"] = conda
    return spec


def submit(entrypoint: list[str] | str, *, address: str | None = None, working_dir: str | Path | None = ".",
           pip: list[str] | None = None, env: dict[str, str] | None = None, submission_id: str | None = None,
           entrypoint_num_cpus: float | None = None, agent_wait_s: float = 120) -> str:
    command = entrypoint if isinstance(entrypoint, str) else shlex.join(entrypoint)
    if not command.strip():
        raise ValueError("nothing to run: give the job's command after --, e.g. -- selfplay run configs/demo.yaml")
    jobs, spec = client(address), runtime_env(working_dir, pip, env)
    deadline = time.monotonic() + agent_wait_s
    while True:
        try:
            return jobs.submit_job(entrypoint=command, runtime_env=spec, submission_id=submission_id,
                                   entrypoint_num_cpus=entrypoint_num_cpus)
        except RuntimeError as e:
            # a head that just started answers before its job agent is up; that is worth waiting for
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(2)


def wait(submission_id: str, *, address: str | None = None, timeout_s: float = 3600, poll_s: float = 2.0,
         log=None) -> str:
    """Wait for a terminal status (SUCCEEDED / FAILED / STOPPED) and return it; TimeoutError names the job."""
    jobs = client(address)
    deadline = time.monotonic() + timeout_s
    status = str(jobs.get_job_status(submission_id))
    while status.split(".")[-1] not in TERMINAL:
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {submission_id} still {status} after {timeout_s:.0f}s")
        time.sleep(poll_s)
        new = str(jobs.get_job_status(submission_id))
        if log and new != status:
            log(f"job {submission_id}: {new.split('.')[-1]}")
        status = new
    return status.split(".")[-1]


def status(submission_id: str, address: str | None = None) -> str:
    return str(client(address).get_job_status(submission_id)).split(".")[-1]


def logs(submission_id: str, address: str | None = None) -> str:
    return client(address).get_job_logs(submission_id)


def stop(submission_id: str, address: str | None = None) -> bool:
    return client(address).stop_job(submission_id)
