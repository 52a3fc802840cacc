"""A run's checkpoint and its resume (docs/architecture.md, "Faults and resume").

`checkpoints/step_N/` holds the learners' state (weights, optimizer, EMA, reference, RNG), a replay snapshot
and, written last and atomically, `driver_state.json`: counters, prompt-stream position, the requests still in
flight, restarts and the policies saved for evaluation. A checkpoint without driver_state.json is incomplete
and never resumed from. `policy_file` is the file of it that generators load (evaluation).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

STATE = "driver_state.json"


def write_json(path: Path, data: dict[str, Any], indent: int | None = None) -> None:
    """Write through a temporary file: a reader sees the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=indent))
    tmp.replace(path)


def save(driver, restarts: dict[str, int], final: bool = False) -> Path:
    """Learners, then the replay snapshot, then the driver's state (last: it marks the checkpoint complete). A LoRA
    run writes its merged model (`model/`) only in the final checkpoint; every checkpoint has the adapters."""
    step = driver.counters.learner_steps
    directory = driver.out / "checkpoints" / f"step_{step}"
    driver.learners.save_checkpoint(directory, merged=final)
    driver.replay.snapshot(directory / "replay")
    write_json(directory / STATE, {
        "step": step, "policy_version": driver.sync.latest_version, "initial_policy": driver.initial_policy,
        "counters": dataclasses.asdict(driver.counters), "logged_samples": driver.logged_samples,
        "extra_prompts": driver.extra_prompts,
        "evals_due": driver.evals_due, "restarts": restarts, "resumes": driver.resumes,
        **driver.inflight.state(),  # the requests in flight are sent again first: their rows were not yet stored
    })
    return directory


def policy_file(directory: Path, lora: bool) -> Path:
    """The checkpoint's policy as generators load it: the model's safetensors, or with LoRA the adapter's."""
    from selfplay.lora import ADAPTER_WEIGHTS

    return directory / "adapter" / ADAPTER_WEIGHTS if lora else directory / "model" / "model.safetensors"


def load(out: Path, checkpoint: Path | None) -> dict[str, Any]:
    if checkpoint is None:
        raise FileNotFoundError(f"{out}: no complete checkpoint to resume from (a checkpoint is complete once its "
                                f"{STATE} is written; set train.checkpoint_every)")
    return json.loads((checkpoint / STATE).read_text())


def restore(driver, state: dict[str, Any]) -> None:
    """Put the freshly built actors and the driver back at a checkpoint's step."""
    directory = driver.out / "checkpoints" / f"step_{state['step']}"
    driver.learners.load_checkpoint(directory)
    driver.replay.restore(directory / "replay")
    for key, value in state["counters"].items():  # in place: the driver's parts share this Counters
        setattr(driver.counters, key, value)
    driver.logged_samples, driver.extra_prompts = state["logged_samples"], state.get("extra_prompts", 0)
    driver.evals_due, driver.resumes = list(state["evals_due"]), [*state["resumes"], state["step"]]
    driver.inflight.load_state(state)
    metrics = driver.out / "metrics.jsonl"  # steps after the checkpoint are run again: their lines go
    if metrics.exists():
        lines = [ln for ln in metrics.read_text().splitlines() if ln and json.loads(ln)["step"] <= state["step"]]
        metrics.write_text("".join(ln + "\n" for ln in lines))
