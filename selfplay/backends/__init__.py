"""Generation backends behind one small interface. Adding one (e.g. SGLang) is one file with these methods:

    generate(prompt_ids, *, num_samples, temperature, top_p, max_new_tokens, seed) -> list[list[Completion]]
    load_weights(named: iterable of (name, tensor))  # full weights of the same architecture (with `lora`: the
                                               # policy adapter, PEFT's saved names), applied in place as the
                                               # iterator yields them (a streamed update arrives bucket by bucket)
    param_specs() -> {name: (shape, dtype)}    # what load_weights accepts, for manifest checks
    copies_on_load: bool                       # load_weights is done with each tensor before it takes the next
    concurrent: bool                           # also `async generate_async(...)`: calls in flight share the engine

Backends work on token ids: prompts are tokenized once, by our tokenizer, whatever the engine.
"""

from __future__ import annotations


def make_backend(name: str, model_path: str, **options):
    if name == "hf":
        from selfplay.backends.hf import HFBackend

        return HFBackend(model_path, **options)
    if name == "vllm":
        from selfplay.backends.vllm import VLLMBackend

        return VLLMBackend(model_path, **options)
    raise ValueError(f"unknown generation backend {name!r}; use 'hf' or 'vllm'")
