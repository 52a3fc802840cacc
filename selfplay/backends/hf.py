"""The transformers backend: `model.generate` on CPU or GPU."""

from __future__ import annotations

import torch

from selfplay.generation import Completion, generate_ids
from selfplay.models import load_causal_lm


class HFBackend:
    name = "hf"

    def __init__(self, model_path: str, *, tokenizer, dtype: str = "float32", seed: int = 0,
                 trust_remote_code: bool = False, device: str | None = None, **_ignored):
        self.tokenizer = tokenizer
        self.model = load_causal_lm(model_path, dtype, trust_remote_code, tokenizer, seed)
        self.model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()

    def generate(self, prompt_ids: list[list[int]], **sampling) -> list[list[Completion]]:
        return generate_ids(self.model, self.tokenizer, prompt_ids, **sampling)

    def param_specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {n: (tuple(p.shape), p.dtype) for n, p in self.model.named_parameters()}

    @torch.no_grad()
    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.model.named_parameters())
        for name, tensor in state.items():
            params[name].copy_(tensor)

    def state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().clone() for n, p in self.model.named_parameters()}
