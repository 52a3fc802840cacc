"""Load and save policy, reference and tokenizer — from the embedded tiny model, a local path or a hub id.

Weights load from safetensors only (a pickle checkpoint can run arbitrary code), and a checkpoint's own
Python code runs only when `trust_remote_code` is set explicitly.
"""

from __future__ import annotations

from pathlib import Path

import torch

TINY = "tiny"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(RuntimeError):
    """A checkpoint that cannot be loaded as asked; the message names the path and the reason."""


def quiet_transformers() -> None:
    """No progress bar per checkpoint load/save: they clutter run logs and Ray's log stream."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def load_tokenizer(path: str, trust_remote_code: bool = False, seed: int = 0):
    if path == TINY:
        from selfplay.tiny import build_tokenizer

        return build_tokenizer(seed)
    from transformers import AutoTokenizer

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
    if path == TINY:
        from selfplay.tiny import build_model

        return build_model(tokenizer if tokenizer is not None else load_tokenizer(TINY, seed=seed), seed).to(DTYPES[dtype])
    local = Path(path)
    if local.is_dir() and not any(local.glob("*.safetensors")):
        found = sorted(p.name for p in local.iterdir())[:8]
        raise ModelLoadError(
            f"{path}: no *.safetensors weights (found {found}); pickle checkpoints are refused because "
            "loading them can execute code — convert with save_pretrained(..., safe_serialization=True)"
        )
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=DTYPES[dtype], use_safetensors=True, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"{path}: cannot load causal LM: {e}") from e
    return model.eval()


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
