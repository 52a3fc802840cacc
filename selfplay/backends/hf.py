"""The transformers backend: a transformers model on CPU or GPU, sampled by `selfplay.generation` (its own decode
loop: one prefill per prompt, finished samples leave the batch). With LoRA (`lora`: the run's `model.lora`) the
model carries the policy adapter (PEFT) over the initial weights, and a weight update is the adapter alone."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from selfplay.generation import Completion, generate_ids
from selfplay.lora import adapter_parameters, lora_enabled, with_adapters
from selfplay.models import load_causal_lm


class HFBackend:
    name = "hf"
    copies_on_load = True  # load_weights copies each tensor before it takes the next
    concurrent = False  # one request at a time

    def __init__(self, model_path: str, *, tokenizer, dtype: str = "float32", seed: int = 0,
                 trust_remote_code: bool = False, device: str | None = None, lora=None, **_ignored):
        self.tokenizer = tokenizer
        self.model = load_causal_lm(model_path, dtype, trust_remote_code, tokenizer, seed)
        self.lora = lora if lora is not None and lora_enabled(lora) else None
        if self.lora:
            self.model = with_adapters(self.model, self.lora)
        self.model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()

    def generate(self, prompt_ids: list[list[int]], *, max_new_tokens: int | list[int] = 32,
                 **sampling) -> list[list[Completion]]:
        """`max_new_tokens` may differ per request: one `generate` per distinct value."""
        if not isinstance(max_new_tokens, list):
            return generate_ids(self.model, self.tokenizer, prompt_ids, max_new_tokens=max_new_tokens, **sampling)
        out: list[list[Completion]] = [[] for _ in prompt_ids]
        for limit in sorted(set(max_new_tokens)):
            idx = [i for i, n in enumerate(max_new_tokens) if n == limit]
            for i, completions in zip(idx, generate_ids(self.model, self.tokenizer, [prompt_ids[i] for i in idx],
                                                        max_new_tokens=limit, **sampling)):
                out[i] = completions
        return out

    def _named(self) -> list[tuple[str, torch.nn.Parameter]]:
        """What a weight update replaces: every parameter, or with LoRA the policy adapter's (PEFT's saved names)."""
        return adapter_parameters(self.model, "policy") if self.lora else list(self.model.named_parameters())

    def param_specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {n: (tuple(p.shape), p.dtype) for n, p in self._named()}

    @torch.no_grad()
    def load_weights(self, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = dict(self._named())
        for name, tensor in named:
            params[name].copy_(tensor)

    def state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().clone() for n, p in self._named()}
