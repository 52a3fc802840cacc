"""LoRA (Hu et al., arXiv 2106.09685) through PEFT: a frozen base W and a trained low-rank update,

    h = W x + (α / r) · B A x,      A ∈ R^{r×d_in} (random init), B ∈ R^{d_out×r} (zero init),

so the model starts exactly at the base. One PEFT model holds up to three adapters over the one frozen base
(docs/architecture.md, "LoRA"):
- `default`: the policy, the only trained tensors;
- `reference`: the reference policy, frozen — at first the base itself (a copy of the untrained adapter, B = 0:
  the base's log-probs exactly), then whatever a reference refresh copies into it (SPPO: the policy);
- `ema`: SAPO's EMA policy, an EMA of the policy adapter.
No second copy of the base exists: the reference and the EMA are adapters of megabytes.

Adapters travel, and are saved, under PEFT's saved names (`…q_proj.lora_A.weight`, no adapter name): the keys of
`adapter_model.safetensors`, which `PeftModel.from_pretrained` and vLLM's LoRA loader read.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

ADAPTERS = {"policy": "default", "reference": "reference", "ema": "ema"}
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def lora_enabled(lora_cfg) -> bool:
    return bool(lora_cfg.rank)


def peft_config(lora_cfg):
    """PEFT's LoraConfig from `model.lora` (target_modules null: every linear layer but the output layer)."""
    from peft import LoraConfig

    return LoraConfig(r=lora_cfg.rank, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                      target_modules=list(lora_cfg.target_modules) if lora_cfg.target_modules else "all-linear",
                      bias="none", task_type="CAUSAL_LM")


def with_adapters(model: torch.nn.Module, lora_cfg, frozen: tuple[str, ...] = ()) -> torch.nn.Module:
    """`model` wrapped by PEFT with the trained policy adapter and, for each of `frozen` ("reference", "ema"), a
    frozen adapter starting as a copy of it. Only the policy adapter requires grad; the base is frozen."""
    from peft import get_peft_model

    # adapters in the model's dtype (PEFT would make them float32 on a bf16 model): learner and generators then
    # agree on what a push carries whatever the dtype, and a bf16 push is half the bytes
    peft_model = get_peft_model(model, peft_config(lora_cfg), autocast_adapter_dtype=False)
    for which in frozen:
        peft_model.add_adapter(ADAPTERS[which], peft_config(lora_cfg), autocast_adapter_dtype=False)
        copy_adapter(peft_model, "policy", which)
    peft_model.set_adapter(ADAPTERS["policy"])  # active and trainable; every other adapter frozen
    return peft_model


def saved_name(param_name: str, which: str) -> str | None:
    """`…q_proj.lora_A.default.weight` → `…q_proj.lora_A.weight` for which="policy"; None if not that adapter's."""
    tag = f".{ADAPTERS[which]}."
    if ".lora_" not in param_name or tag not in param_name:
        return None
    return param_name.replace(tag, ".", 1)


def adapter_parameters(model: torch.nn.Module, which: str) -> list[tuple[str, torch.nn.Parameter]]:
    """(saved name, parameter) of one adapter, in the model's order."""
    out = [(saved_name(n, which), p) for n, p in model.named_parameters()]
    return [(n, p) for n, p in out if n is not None]


@torch.no_grad()
def copy_adapter(model: torch.nn.Module, source: str, target: str) -> None:
    """Adapter `target` ← adapter `source` (whole tensors; under ZeRO-3 the caller copies partitions instead)."""
    dst = dict(adapter_parameters(model, target))
    for name, p in adapter_parameters(model, source):
        dst[name].copy_(p)


@contextlib.contextmanager
def using_adapter(model: torch.nn.Module, which: str):
    """Run `model` as the reference or EMA policy: that adapter active, dropout off; the policy adapter active and
    trainable again on exit (PEFT's set_adapter also sets which adapter requires grad)."""
    training = model.training
    if which != "policy":
        model.set_adapter(ADAPTERS[which], inference_mode=True)
    model.eval()
    try:
        yield model
    finally:
        model.set_adapter(ADAPTERS["policy"])
        model.train(training)


class AdapterView:
    """A frozen policy (reference, EMA) that is an adapter of a shared PEFT model, callable like a model."""

    def __init__(self, model: torch.nn.Module, which: str):
        self.model, self.which = model, which

    def __call__(self, *args, **kwargs):
        with using_adapter(self.model, self.which):
            return self.model(*args, **kwargs)


def adapter_specs(model: torch.nn.Module, which: str = "policy") -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """{saved name: (shape, dtype)} of an adapter: what a push carries (ZeRO-3 shapes from `ds_shape`)."""
    return {n: (tuple(getattr(p, "ds_shape", None) or p.shape), p.dtype) for n, p in adapter_parameters(model, which)}


@torch.no_grad()
def load_adapter_state(model: torch.nn.Module, state: dict[str, torch.Tensor], which: str = "policy") -> None:
    """Copy saved-name tensors into one adapter of `model` (all of them must be there)."""
    params = dict(adapter_parameters(model, which))
    missing, extra = sorted(params.keys() - state.keys()), sorted(state.keys() - params.keys())
    if missing or extra:
        raise ValueError(f"adapter tensors do not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, tensor in state.items():
        params[name].copy_(tensor)


def write_adapter_config(model: torch.nn.Module, base_model: str, directory: Path) -> None:
    """adapter_config.json of the policy adapter as PEFT writes it (target modules resolved to names), naming the
    base model (`base_model_name_or_path`)."""
    import copy

    config = copy.copy(model.peft_config[ADAPTERS["policy"]])
    config.base_model_name_or_path = base_model
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(directory))


def merge_weights(base: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """W + (α / r) · B A, computed in float32 and returned in W's dtype: the merged weight of one layer."""
    delta = lora_b.float() @ lora_a.float()
    return (base.float() + scale * delta).to(base.dtype)


def check_adapter_checkpoint(path: Path, model: torch.nn.Module, specs: dict[str, dict[str, tuple]]) -> None:
    """Raise ModelLoadError naming every mismatch between a LoRA learner checkpoint (`adapter/`, `ema.safetensors`,
    `reference.safetensors`) and this run's adapters: rank, alpha, target modules, tensor names and shapes.
    `model`: this run's PEFT model; `specs`: {"policy" | "ema" | "reference": {saved name: (shape, dtype)}}. Reads
    headers only."""
    from safetensors import safe_open

    from selfplay.errors import ModelLoadError
    from selfplay.models import _read_config_json

    path = Path(path)
    if not (path / "adapter" / ADAPTER_CONFIG).exists():
        raise ModelLoadError(f"{path}: not a LoRA checkpoint (no adapter/{ADAPTER_CONFIG}), but model.lora.rank is "
                             "set; a full fine-tuning run resumes with model.lora.rank: 0")
    problems = []
    found, wanted = _read_config_json(path / "adapter" / ADAPTER_CONFIG), model.peft_config[ADAPTERS["policy"]]
    for key, mine in (("r", wanted.r), ("lora_alpha", wanted.lora_alpha), ("target_modules", wanted.target_modules)):
        theirs = found.get(key)
        if isinstance(mine, (set, list)) and isinstance(theirs, list):
            theirs, mine = sorted(theirs), sorted(mine)
        if theirs != mine:
            problems.append(f"{key}: checkpoint {theirs!r}, this run {mine!r}")
    files = {"policy": path / "adapter" / ADAPTER_WEIGHTS, "ema": path / "ema.safetensors",
             "reference": path / "reference.safetensors"}
    for which, expected in specs.items():
        try:
            with safe_open(str(files[which]), framework="pt") as f:
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as e:  # missing or unreadable: named, not a traceback
            problems.append(f"{files[which].name}: unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
            continue
        wrong = sorted(n for n in expected if n in shapes and shapes[n] != tuple(expected[n][0]))
        missing, extra = sorted(expected.keys() - shapes.keys()), sorted(shapes.keys() - expected.keys())
        for what, names in (("missing", missing), ("unexpected", extra), ("wrongly shaped", wrong)):
            if names:
                problems.append(f"{files[which].name}: {len(names)} {what} tensors (e.g. {names[0]})")
    if problems:
        raise ModelLoadError(f"{path}: LoRA checkpoint does not match this run ({len(problems)} problem(s)):\n  "
                             + "\n  ".join(problems))
