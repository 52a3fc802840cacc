"""Load and save policy, reference and tokenizer — from the embedded tiny model, a local path or a hub id.

Weights load from safetensors only (a pickle checkpoint can run arbitrary code), and a checkpoint's own
Python code runs only when `trust_remote_code` is set explicitly. A checkpoint that does not fit — another
architecture, missing or wrongly shaped tensors, a truncated file — is refused with a ModelLoadError naming
the path and the fields or tensors, never loaded with silently re-initialized weights.

`safe_torch_load` / `weights_only_checkpoint_loading` are for the one pickle format we cannot avoid:
DeepSpeed's optimizer state (`checkpoints/step_N/deepspeed/*.pt`), which DeepSpeed itself loads with
`torch.load` with weights_only switched off.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from selfplay.errors import ModelLoadError

TINY = "tiny"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def quiet_transformers() -> None:
    """No progress bar per checkpoint load/save: they clutter run logs and Ray's log stream."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def load_tokenizer(path: str, trust_remote_code: bool = False, seed: int = 0):
    base = adapter_base(path)
    if base is not None:  # a LoRA adapter directory: its base model's tokenizer
        return load_tokenizer(base, trust_remote_code, seed)
    if path == TINY:
        from selfplay.tiny import build_tokenizer

        return build_tokenizer(seed)
    from transformers import AutoTokenizer

    local_model_dir(path, "tokenizer")  # a missing local directory is named as such
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: cannot load tokenizer: {e}") from e
    if tok.pad_token is None:  # many base models ship none; EOS is the usual stand-in
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(path: str, dtype: str = "float32", trust_remote_code: bool = False, tokenizer=None, seed: int = 0):
    """A causal LM in eval mode. `tiny` builds the embedded model (it needs the tokenizer for its vocabulary)."""
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}")
    base = adapter_base(path)
    if base is not None:
        return _merged_adapter(path, base, dtype, trust_remote_code, tokenizer, seed)
    if path == TINY:
        from selfplay.tiny import build_model

        return build_model(tokenizer if tokenizer is not None else load_tokenizer(TINY, seed=seed), seed).to(DTYPES[dtype])
    local = local_model_dir(path)
    if local is not None:
        check_model_dir(local, trust_remote_code)
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            path, dtype=DTYPES[dtype], use_safetensors=True, trust_remote_code=trust_remote_code,
            output_loading_info=True,
        )
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as e:
        detail = _shape_report(local) if local is not None and isinstance(e, RuntimeError) else None
        raise ModelLoadError(f"{path}: cannot load causal LM: {detail or _first_line(e)}") from e
    missing, mismatched = list(info.get("missing_keys") or []), list(info.get("mismatched_keys") or [])
    if missing or mismatched:  # transformers would go on with randomly initialized tensors
        raise ModelLoadError(
            f"{path}: the weights do not fit the architecture in its config.json: "
            + "; ".join(filter(None, [_listed("missing tensors", missing), _listed("wrongly shaped", mismatched)]))
        )
    return model.eval()


def causal_lm_skeleton(path: str, dtype: str = "float32", trust_remote_code: bool = False, tokenizer=None,
                       seed: int = 0) -> torch.nn.Module:
    """The model's modules with their parameters on the meta device: every name, shape and dtype, no weights (no
    memory; only config.json is read). What a generator checks a weight update against, without a second copy of
    the model beside its engine's. A LoRA adapter directory gives its base model's skeleton."""
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}")
    path = adapter_base(path) or path
    if path == TINY:
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(TINY, seed=seed)
        from selfplay.tiny import build_model

        with torch.device("meta"):
            return build_model(tokenizer, seed).to(DTYPES[dtype])
    from transformers import AutoConfig, AutoModelForCausalLM

    quiet_transformers()
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"{path}: cannot read the model's config: {_first_line(e)}") from e
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)


def adapter_base(path: str) -> str | None:
    """The base model of a PEFT LoRA adapter directory (adapter_config.json, no config.json), else None."""
    local = Path(path).expanduser()
    if not (local / "adapter_config.json").is_file() or (local / "config.json").exists():
        return None
    base = _read_config_json(local / "adapter_config.json").get("base_model_name_or_path")
    if not base:
        raise ModelLoadError(f"{local}/adapter_config.json: no base_model_name_or_path (the model the adapter is for)")
    return base


def _merged_adapter(path: str, base: str, dtype: str, trust_remote_code: bool, tokenizer, seed: int):
    """The base with the adapter at `path` merged in: a plain causal LM, as fast as the base."""
    from peft import PeftModel

    model = load_causal_lm(base, dtype, trust_remote_code, tokenizer, seed)
    try:
        return PeftModel.from_pretrained(model, path).merge_and_unload().eval()
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelLoadError(f"{path}: cannot apply the LoRA adapter to {base}: {_first_line(e)}") from e


def local_model_dir(path: str, what: str = "causal LM") -> Path | None:
    """The directory when `path` names a local one; None for a hub id. A path-like name that does not exist
    is an error here, not a confusing hub lookup."""
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    if local.exists():
        raise ModelLoadError(f"{path}: cannot load {what}: is a file; a model is a directory "
                             "(config.json + *.safetensors)")
    if path.startswith(("/", "./", "../", "~")) or path.count("/") > 1:
        raise ModelLoadError(f"{path}: cannot load {what}: model directory not found")
    return None


def _shape_report(local: Path) -> str | None:
    """Which tensors of a local checkpoint disagree with the shapes its config.json implies."""
    try:
        from transformers import AutoConfig, AutoModelForCausalLM

        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(local)))
        problems = [p for f in sorted(local.glob("*.safetensors")) for p in _tensor_problems(f, skeleton, "model")]
    except Exception:  # the report is a courtesy; the original error is still raised
        return None
    return "the weights do not fit the architecture in its config.json: " + "; ".join(problems) if problems else None


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _listed(what: str, items: list, n: int = 5) -> str:
    if not items:
        return ""
    shown = ", ".join(str(x) for x in sorted(items, key=str)[:n])
    return f"{len(items)} {what} ({shown}{', …' if len(items) > n else ''})"


def _read_config_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(f"{path.parent}: no config.json (not a Hugging Face model directory)") from None
    except UnicodeDecodeError as e:
        raise ModelLoadError(f"{path}: not UTF-8 (byte {e.start}: {e.reason})") from None
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def check_model_dir(local: Path, trust_remote_code: bool) -> None:
    """A local model directory must hold safetensors weights and a config.json of a causal LM."""
    _safetensors_files(local)
    config = _read_config_json(local / "config.json")
    model_type = config.get("model_type")
    if config.get("auto_map") and trust_remote_code:
        return  # the checkpoint's own code defines the architecture
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        archs = config.get("architectures") or []
        custom = " (it ships its own model code: set model.trust_remote_code: true only if you trust it)" \
            if config.get("auto_map") else ""
        raise ModelLoadError(
            f"{local}/config.json: model_type {model_type!r} (architectures {archs}) is not a causal language "
            f"model transformers can load{custom}; point the path at a causal LM checkpoint"
        )


# ----------------------------------------------------------------------------------------------------------
# Does a checkpoint fit the model we are about to load it into?

ARCH_FIELDS = (  # config.json fields that decide parameter shapes (GPT-2 style names included)
    "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "intermediate_size", "vocab_size", "head_dim", "tie_word_embeddings",
    "n_embd", "n_layer", "n_head", "n_inner", "n_positions",
)


def check_checkpoint_compatible(path: str | Path, expected: Any) -> None:
    """Raise ModelLoadError naming every mismatch when the checkpoint at `path` does not fit `expected`.

    path: a Hugging Face model directory (config.json + *.safetensors), a learner checkpoint directory
      (`checkpoints/step_N`: model/, optional ema.safetensors and reference.safetensors, trainer_state.json,
      deepspeed/) or a single .safetensors file.
    expected: the model to load into (a torch module with `.config`; also checks tensor names and shapes from
      the safetensors headers, nothing is read beyond them — pass the module before or after DeepSpeed
      wraps it, ZeRO-3 shapes are read from `ds_shape`), a transformers config, a dict of config fields, or
      another model directory.
    Pure reading of small headers: cheap enough to run on every rank before `engine.load_checkpoint`.
    """
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: checkpoint not found")
    problems: list[str] = []
    model_dir, tensor_files = _checkpoint_parts(path, problems)
    module = _module_of(expected)
    if model_dir is not None:
        found = _read_config_json(model_dir / "config.json")
        wanted = _config_dict(expected)
        for key in ARCH_FIELDS:
            if key in found or key in wanted:
                a, b = found.get(key), wanted.get(key)
                if a != b and not (key == "head_dim" and (a is None or b is None)):
                    problems.append(f"{key}: checkpoint {a!r}, expected {b!r}")
    if module is not None:
        for file, names in tensor_files:
            problems.extend(_tensor_problems(file, module, names))
    if problems:
        raise ModelLoadError(f"{path}: checkpoint does not match the model ({len(problems)} problem(s)):\n  "
                             + "\n  ".join(problems))


def _checkpoint_parts(path: Path, problems: list[str]) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(directory holding config.json, [(safetensors file, which parameters it holds)])."""
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ModelLoadError(f"{path}: not a .safetensors file (pickle formats are refused)")
        return None, [(path, "parameters")]
    if (path / "model").is_dir() or (path / "trainer_state.json").exists():  # a learner checkpoint
        for part in ("model", "trainer_state.json", "deepspeed"):
            if not (path / part).exists():
                problems.append(f"incomplete learner checkpoint: {part} is missing")
        model_dir = path / "model" if (path / "model").is_dir() else None
        files = [(f, "model") for f in sorted(model_dir.glob("*.safetensors"))] if model_dir else []
        files += [(path / f"{w}.safetensors", "parameters") for w in ("ema", "reference")
                  if (path / f"{w}.safetensors").exists()]
        if model_dir is not None and not files:
            problems.append("model/: no *.safetensors weights")
        return model_dir, files
    if not (path / "config.json").exists():
        raise ModelLoadError(f"{path}: neither a model directory (config.json) nor a learner checkpoint (model/)")
    return path, [(f, "model") for f in _safetensors_files(path)]


def _safetensors_files(directory: Path) -> list[Path]:
    """The directory's *.safetensors files; none at all is an error (we never fall back to a pickle format)."""
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        found = sorted(p.name for p in directory.iterdir())[:8]
        raise ModelLoadError(
            f"{directory}: no *.safetensors weights (found {found}); pickle checkpoints are refused because "
            "loading them can execute code — convert with save_pretrained(..., safe_serialization=True)"
        )
    return files


def _module_of(expected: Any):
    return expected if isinstance(expected, torch.nn.Module) else None


def _config_dict(expected: Any) -> dict[str, Any]:
    if isinstance(expected, torch.nn.Module):
        expected = getattr(expected, "config", None)
        if expected is None:
            return {}
    if isinstance(expected, (str, Path)):
        return _read_config_json(Path(expected) / "config.json")
    if isinstance(expected, Mapping):
        return dict(expected)
    if hasattr(expected, "to_dict"):
        return expected.to_dict()
    raise TypeError(f"expected a model, a config, a dict or a model directory, got {type(expected).__name__}")


def _tensor_problems(file: Path, module: torch.nn.Module, which: str) -> list[str]:
    """Names and shapes in a safetensors header against the module's parameters (tied ones counted once)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        return [f"{file.name}: unreadable safetensors file ({_first_line(e)})"]
    params = dict(module.named_parameters(remove_duplicate=False))
    ids: dict[int, set[str]] = {}
    for name, p in params.items():
        ids.setdefault(id(p), set()).add(name)
    expected = {n: tuple(getattr(p, "ds_shape", None) or p.shape) for n, p in params.items()}
    if which == "model":  # save_pretrained also writes persistent buffers
        expected.update({n: tuple(b.shape) for n, b in module.named_buffers()})
    out = []
    unexpected = sorted(k for k in shapes if k not in expected)
    wrong = [f"{k} {list(shapes[k])} vs {list(expected[k])}" for k in sorted(shapes)
             if k in expected and shapes[k] != expected[k]]
    missing = sorted(n for n in params if n not in shapes and not (ids[id(params[n])] & shapes.keys()))
    for what, items in (("unexpected tensors", unexpected), ("wrong shapes (checkpoint vs model)", wrong),
                        ("missing tensors", missing)):
        if items:
            out.append(f"{file.name}: {_listed(what, items)}")
    return out


# ----------------------------------------------------------------------------------------------------------
# torch.load, only with weights_only=True

# DeepSpeed classes inside its optimizer checkpoints: plain data (a loss-scale record, an enum, a slice
# address), safe to allow in the weights-only unpickler. Anything else in a .pt file is refused.
DEEPSPEED_SAFE_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


def _safe_globals() -> list:
    import importlib

    out = []
    for dotted in DEEPSPEED_SAFE_GLOBALS:
        module, _, name = dotted.rpartition(".")
        try:
            out.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):  # another DeepSpeed version, or none installed
            continue
    return out


def safe_torch_load(path: str | Path, map_location=None):
    """torch.load with weights_only=True (tensors, containers, numbers and DEEPSPEED_SAFE_GLOBALS only).
    A file needing anything else — e.g. a pickle that would run code — raises ModelLoadError naming it."""
    import pickle

    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        detail = next((line.strip() for line in str(e).splitlines() if "Unsupported global" in line
                       or "unsupported" in line.lower()), _first_line(e))
        raise ModelLoadError(f"{path}: refused to unpickle (weights_only=True): {detail}") from None


def weights_only_checkpoint_loading(engine) -> None:
    """Make a DeepSpeed engine read its checkpoints with `safe_torch_load` instead of DeepSpeed's own
    `torch.load` with weights_only switched off. Call once after `deepspeed.initialize`, before `engine.load_checkpoint`."""
    checkpoint_engine = getattr(engine, "checkpoint_engine", None)
    if checkpoint_engine is None:
        raise ValueError("this DeepSpeed engine has no checkpoint_engine yet; call after deepspeed.initialize")

    def load(path, map_location=None):
        return safe_torch_load(path, map_location=map_location)

    checkpoint_engine.load = load


def load_policy_and_tokenizer(model_cfg, seed: int = 0):
    """(policy, tokenizer) from a `ModelConfig`."""
    tok = load_tokenizer(model_cfg.policy, model_cfg.trust_remote_code, seed)
    model = load_causal_lm(model_cfg.policy, model_cfg.dtype, model_cfg.trust_remote_code, tok, seed)
    return model, tok


def save_pretrained(model, tokenizer, out_dir: str | Path) -> Path:
    """Save as a Hugging Face checkpoint with safetensors weights."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    quiet_transformers()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def forward_parameters(model) -> Mapping[str, Any]:
    """The parameters of the forward that computes: through a DeepSpeed engine (`module`), a PEFT wrapper (which
    passes keyword arguments on to its base model, naming neither `position_ids` nor `logits_to_keep`) and a LoRA
    adapter view (`selfplay.lora.AdapterView`)."""
    import inspect

    for _ in range(4):
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), torch.nn.Module):
            model = model.module
        elif not isinstance(model, torch.nn.Module) and hasattr(model, "model"):
            model = model.model
        else:
            break
    return inspect.signature(model.forward).parameters
