"""LearnerActor: one DeepSpeed engine per actor, data-parallel over a process group created inside Ray.

A `LearnerGroup` (driver side) starts `num_learners` actors, wires them into one torch.distributed group
(gloo on CPU, NCCL on GPU), splits every batch of replay rows evenly over the ranks and returns rank-averaged
metrics. Each rank holds the frozen reference model and, for SAPO, the EMA policy, on the engine's device in its
dtype; both are updated one parameter at a time (under ZeRO-3 partition by partition, and built partitioned:
no rank ever holds a second full model). A step runs in
micro-batches of `train.micro_batch_size` pairs whose gradients DeepSpeed accumulates; only rank 0 keeps host
copies of the weights, to publish and save them (docs/architecture.md, "Learners").
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import random
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import torch

from actors.faults import HoldPoints
from actors.placement import Placement
from actors.remote import ActorDiedError, dead_actors, get_all, peak_rss_mb, reset_peak_rss
from selfplay.config import Config
from selfplay.ema import ema_update
from selfplay.lora import (
    ADAPTER_WEIGHTS,
    ADAPTERS,
    AdapterView,
    adapter_parameters,
    check_adapter_checkpoint,
    lora_enabled,
    merge_weights,
    with_adapters,
    write_adapter_config,
)
from selfplay.objectives import encode_rows, preference_loss
from selfplay.recipes import make_recipe
from selfplay.weights import (
    WeightSyncError,
    bucket_entries,
    bucket_sizes,
    checksum,
    fill_bucket,
    plan_buckets,
    write_safetensors,
)


def deepspeed_config(cfg: Config, world_size: int, on_gpu: bool, model: torch.nn.Module | None = None) -> dict[str, Any]:
    """DeepSpeed's JSON config from ours: ZeRO stage, precision, optimizer, clipping, batch sizes; under ZeRO-3
    its gather and bucket limits sized to `model`; `train.deepspeed` merged last."""
    share = cfg.train.batch_size // world_size
    micro = cfg.train.micro_batch_size or share
    ds: dict[str, Any] = {
        "train_batch_size": cfg.train.batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": share // micro,  # DeepSpeed scales each micro-batch's loss by 1/this
        "gradient_clipping": cfg.train.grad_clip,
        "optimizer": {
            "type": "AdamW",
            # torch_adam: the plain torch AdamW, no fused CUDA/CPU kernel to compile; on GPU the fused one is used
            "params": {"lr": cfg.train.lr, "weight_decay": cfg.train.weight_decay, "torch_adam": not on_gpu},
        } if cfg.train.optimizer == "adamw" else {
            # DeepSpeed builds torch.optim.SGD by name; ZeRO wraps it like any torch optimizer
            "type": "SGD", "params": {"lr": cfg.train.lr, "weight_decay": cfg.train.weight_decay},
        },
        "zero_optimization": {"stage": cfg.train.zero_stage},
        "zero_allow_untested_optimizer": cfg.train.optimizer == "sgd",
        "steps_per_print": 10**9,  # our own metrics, not DeepSpeed's prints
        "wall_clock_breakdown": False,
    }
    if cfg.train.zero_stage >= 1 and not on_gpu:
        # gloo has no reduce-scatter; ZeRO then reduces with all-reduce
        ds["zero_optimization"].update(reduce_scatter=False, overlap_comm=False, contiguous_gradients=False)
    if cfg.train.zero_stage == 3 and model is not None:
        ds["zero_optimization"].update(zero3_limits(model))
    if cfg.train.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif cfg.train.precision == "fp16":
        ds["fp16"] = {"enabled": True, "initial_scale_power": 16}
    return _merged(ds, cfg.train.deepspeed)


def zero3_limits(model: torch.nn.Module) -> dict[str, int]:
    """ZeRO-3's limits on gathered parameters and gradient buckets, sized to the model rather than DeepSpeed's
    defaults (10⁹ live parameters, 5·10⁸-element buckets: below ~1B parameters the whole model stays gathered).
    Live: two decoder layers. The limit caps only what DeepSpeed gathers ahead of need (prefetch); a larger
    parameter (the embedding) is still gathered when its module runs. Sized to the embedding instead, it let a
    0.5B model's backward prefetch ~9 layers at once (a 0.6 GiB rise a rank). The optimizer steps sub-groups of the
    embedding or two layers, whichever is larger (its temporaries are one sub-group, not the rank's whole
    partition); buckets and prefetch as Hugging Face's "auto" (hidden², 0.9·hidden²; parameters under 10·hidden
    stay whole)."""
    sizes = [p.numel() for p in model.parameters()]
    hidden = model.config.hidden_size
    layers = getattr(model.config, "num_hidden_layers", 1) or 1
    two_layers = 2 * (sum(sizes) - max(sizes)) // layers
    group = max(max(sizes), two_layers)
    return {"stage3_max_live_parameters": two_layers, "stage3_max_reuse_distance": group, "sub_group_size": group,
            "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden), "reduce_bucket_size": hidden * hidden,
            "stage3_param_persistence_threshold": 10 * hidden}


def share_master_partitions(optimizer) -> int:
    """ZeRO-3 keeps an fp32 master copy of each rank's partition. Where the partition already is that copy (fp32
    weights on the optimizer's device, no offload) DeepSpeed means to use it as its own master ("aliases", in
    stage3.py), but it compares a torch.device with a device-name string, which is never equal; so fp32 training
    held every partition twice (0.92 GiB a rank at the 0.5B shape on 2 ranks). Point each master at its partition:
    its step then updates the weights in place, and DeepSpeed's copy back from master to partition is a copy onto
    itself. Returns the bytes freed."""
    saved = 0
    if getattr(optimizer, "offload_optimizer", False):  # the master lives on the host, by design
        return saved
    for part, master in zip(getattr(optimizer, "fp16_partitioned_groups_flat", ()),
                            getattr(optimizer, "fp32_partitioned_groups_flat", ())):
        if (part is None or master is part or master.data_ptr() == part.data_ptr() or part.dtype != master.dtype
                or part.device != master.device or part.shape != master.shape or not torch.equal(part, master)):
            continue
        master.data = part.data  # the same tensor object: the optimizer's groups and state keep their keys
        saved += part.numel() * part.element_size()
    return saved


def _merged(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`extra` over `base`: mappings merge key by key, anything else replaces."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _skip_deepspeed_jit_ops() -> None:
    """On CPU, DeepSpeed compiles a shared-memory all-reduce op (~1 minute) on first init. gloo works without it,
    and we use torch's AdamW, so mark every JIT op incompatible: nothing gets compiled."""
    import deepspeed.ops

    deepspeed.ops.__dict__["__compatible_ops__"] = {}


# glibc's malloc raises its mmap threshold to the largest block freed so far (up to 32 MiB), after which freed
# tensors stay in the heap, resident: at the 0.5B shape a ZeRO-3 rank on CPU then held ~3 GB more after a step
# than its tensors, and two ranks hit the memory limit at step 2. A fixed threshold returns every block of 4 MiB
# or more to the OS when it is freed (docs/benchmarks.md, "Scale ladder").
CPU_LEARNER_ENV = {"env_vars": {"MALLOC_MMAP_THRESHOLD_": str(4 << 20)}}
DEATH_SETTLE_S = 60.0  # a failed collective: how long the other ranks get to report a death


@ray.remote
class LearnerActor:
    def __init__(self, cfg_dict: dict, rank: int, world_size: int, policy: str):
        self.cfg = Config.from_dict(cfg_dict)
        self.rank, self.world_size, self.policy_path = rank, world_size, policy
        self.on_gpu = torch.cuda.is_available()
        self.engine = self.reference = self.ema = None
        self.partitioned = False  # ZeRO-3: the reference and the EMA are partitioned like the policy
        self.master_bytes_shared = 0  # ZeRO-3, fp32: the optimizer's master copy is the partition itself
        self.busy_seconds = 0.0  # training, publishing weights, refreshing the reference: the rest is idle
        self.holds = HoldPoints()  # chaos tests only: hold a step until the test kills this process

    def address(self) -> tuple[str, int]:
        """Rendezvous address for the process group (asked of rank 0 only)."""
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def setup(self, master_addr: str, master_port: int, timeout_s: float = 300.0) -> dict[str, Any]:
        import datetime

        import deepspeed

        from selfplay.models import load_policy_and_tokenizer

        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(self.rank),
                          WORLD_SIZE=str(self.world_size), LOCAL_RANK="0")
        if not self.on_gpu:
            _skip_deepspeed_jit_ops()
        deepspeed.init_distributed(dist_backend="nccl" if self.on_gpu else "gloo", auto_mpi_discovery=False,
                                   timeout=datetime.timedelta(seconds=timeout_s))
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        model, self.tokenizer = load_policy_and_tokenizer(dataclasses.replace(cfg.model, policy=self.policy_path),
                                                          cfg.seed)
        model.train()
        n = sum(p.numel() for p in model.parameters())
        if cfg.train.gradient_checkpointing:  # non-reentrant: works with frozen inputs and ZeRO-3's hooks
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.recipe = make_recipe(cfg)  # the loss, whether to keep an EMA, and how it moves
        self.spec = self.recipe.loss
        self.lora = cfg.model.lora if lora_enabled(cfg.model.lora) else None
        if self.lora:  # one base, adapters for the policy, the reference and the EMA (selfplay/lora.py)
            model = with_adapters(model, self.lora, frozen=tuple(
                w for w, kept in (("reference", self.spec.needs_reference), ("ema", self.recipe.ema)) if kept))
            self._init_engine(model, model_parameters=[p for p in model.parameters() if p.requires_grad])
            self.reference = AdapterView(self.engine.module, "reference") if self.spec.needs_reference else None
            self.ema = AdapterView(self.engine.module, "ema") if self.recipe.ema else None
        else:  # frozen models: the reference (SPPO refreshes it each iteration) and SAPO's EMA policy
            needs_reference = self.spec.needs_reference
            if cfg.train.zero_stage == 3:  # each rank holds 1/world of every model, gathered layer by layer
                ds_config = self._init_engine(model, model_parameters=model.parameters())
                frozen = {k: v for k, v in ds_config.items() if k not in ("optimizer", "zero_allow_untested_optimizer")}
                separate = self._reference_checkpoint() if needs_reference else None  # loaded once the policy is split
                self.reference = (deepspeed.initialize(model=separate, config=frozen)[0] if separate is not None
                                  else self._partitioned_copy(frozen) if needs_reference else None)
                self.ema = self._partitioned_copy(frozen) if self.recipe.ema else None
                for which in ("ema",) if separate is not None else ("reference", "ema"):  # both start as the policy
                    if getattr(self, which) is not None:
                        self._copy_partitions(which, "policy")
            else:  # whole copies on every rank, where the policy computes, in its dtype
                reference = (self._reference_checkpoint() or _frozen(copy.deepcopy(model))) if needs_reference else None
                ema = _frozen(copy.deepcopy(model)) if self.recipe.ema else None
                self._init_engine(model, model_parameters=model.parameters())  # moves only the policy
                dtype = next(self.engine.module.parameters()).dtype
                for m in (reference, ema):
                    if m is not None:
                        m.to(device=self.engine.device, dtype=dtype)
                self.reference, self.ema = reference, ema
        self.step = 0
        self.version = 0
        info = {"rank": self.rank, "parameters": n, "zero_stage": cfg.train.zero_stage,
                "trained_parameters": sum(int(np.prod(s)) for s, _ in self._specs("policy").values())}
        if self.partitioned:  # as DeepSpeed read them: ours, or train.deepspeed's
            e = self.engine
            info["zero3_limits"] = {"max_live_parameters": e.zero_max_live_parameters(),
                                    "max_reuse_distance": e.zero_max_reuse_distance(),
                                    "prefetch_bucket_size": e.zero_prefetch_bucket_size(),
                                    "reduce_bucket_size": e.zero_reduce_bucket_size(),
                                    "param_persistence_threshold": e.zero_param_persistence_threshold()}
            info["master_bytes_shared"] = self.master_bytes_shared
        return info

    def _init_engine(self, model: torch.nn.Module, model_parameters) -> dict[str, Any]:
        import deepspeed

        from selfplay.models import weights_only_checkpoint_loading

        ds_config = deepspeed_config(self.cfg, self.world_size, self.on_gpu, model)
        self.engine, *_ = deepspeed.initialize(model=model, model_parameters=model_parameters, config=ds_config)
        # DeepSpeed reads its own checkpoints with a full unpickler (weights_only off), which runs any pickle
        weights_only_checkpoint_loading(self.engine)
        self.partitioned = self.cfg.train.zero_stage == 3
        if self.partitioned:
            self.master_bytes_shared = share_master_partitions(self.engine.optimizer)
        return ds_config

    def _reference_checkpoint(self) -> torch.nn.Module | None:
        """The separate reference checkpoint `model.reference` names, frozen; None: the reference starts as the policy."""
        from selfplay.models import load_causal_lm

        m = self.cfg.model
        return _frozen(load_causal_lm(m.reference, m.dtype, m.trust_remote_code, self.tokenizer, self.cfg.seed)) \
            if m.reference else None

    def _partitioned_copy(self, frozen: dict[str, Any]):
        """A frozen ZeRO-3 engine of the policy's architecture, built partitioned: under `zero.Init` each module's
        weights are split as the module is made, and left uninitialized (the caller copies the policy's partitions
        in). A deepcopy of the loaded policy would have held one more full model per rank (at 7B in bf16, 14.5 GB
        of host memory per rank per copy)."""
        import deepspeed
        from transformers.initialization import no_init_weights

        policy = self.engine.module
        split = deepspeed.zero.Init(config_dict_or_path=frozen)
        # the policy's dtype: zero.Init's own `dtype` argument is lost on a CPU (an operator-precedence slip in
        # DeepSpeed's _set_dtype picks bfloat16 whatever is asked)
        split.dtype = next(policy.parameters()).ds_tensor.dtype
        with torch.random.fork_rng(devices=[]), no_init_weights(), split:
            module = type(policy)(policy.config)
        module.tie_weights()  # no_init_weights skipped it with the rest of post-init
        with torch.no_grad():  # buffers (rotary frequencies) are whole on every rank and were not initialized either
            for (name, buffer), (source_name, source) in zip(module.named_buffers(), policy.named_buffers(), strict=True):
                assert name == source_name, (name, source_name)
                buffer.copy_(source)
        return deepspeed.initialize(model=_frozen(module), config=frozen)[0]

    # -- training ---------------------------------------------------------------------------------------------

    def train_step(self, rows: pa.Table) -> dict[str, float]:
        """One optimizer step on this rank's share of the batch, in micro-batches of `train.micro_batch_size`
        pairs of similar length (less padding) whose gradients accumulate; metrics are averaged over all ranks."""
        self.holds.enter(f"train_step {self.step + 1}")
        start, version_at_start = time.perf_counter(), self.version
        data = rows.to_pydict()
        n, train = rows.num_rows, self.cfg.train
        micro = train.micro_batch_size or n
        if train.micro_batch_size and n != train.batch_size // self.world_size:  # DeepSpeed counts micro-batches
            raise ValueError(f"{n} rows for a learner whose share of train.batch_size is "
                             f"{train.batch_size // self.world_size}: with train.micro_batch_size the step needs exactly that")
        order = sorted(range(n), key=lambda i: len(data["prompt"][i]) + max(len(data["chosen"][i]),
                                                                           len(data["rejected"][i])))
        # sums over micro-batches: loss and margin (of their means), tokens, pairs, prompts and responses cut
        totals = torch.zeros(6, dtype=torch.float64)
        grad_norm = None
        for first in range(0, n, micro):
            part = {k: [v[i] for i in order[first:first + micro]] for k, v in data.items()}
            batches = encode_rows(self.tokenizer, part, self.spec, train.max_prompt_tokens, train.max_response_tokens,
                                  share_prompts=train.share_prompts and not train.gradient_checkpointing)
            batches = {k: {name: t.to(self.engine.device) for name, t in b.items()} for k, b in batches.items()}
            p_w = torch.tensor(part["p_chosen"], dtype=torch.float32) if "p_chosen" in part else None
            p_l = torch.tensor(part["p_rejected"], dtype=torch.float32) if "p_rejected" in part else None
            loss_vec, m = preference_loss(self.engine, self.reference, batches, self.spec, p_w, p_l)
            self.engine.backward(loss_vec.mean())
            if first + micro >= n:  # the accumulation boundary: the next engine.step() updates the weights
                grad_norm = self._grad_norm_before_step()
            self.engine.step()
            pairs = batches["pairs"]
            totals += torch.tensor([loss_vec.mean().item(), m["reward_margin"].mean().item(), float(m["tokens"].sum()),
                                    float(len(loss_vec)), float(pairs["prompt_truncated"][:len(loss_vec)].sum()),
                                    float(pairs["response_truncated"].sum())], dtype=torch.float64)
        self.step += 1
        if self.ema is not None and self.step % self.recipe.ema.every == 0:
            self._update_ema()
        if grad_norm is None:  # ZeRO >= 1: DeepSpeed's optimizer computed it during step()
            grad_norm = self.engine.get_global_grad_norm()
        steps = -(-n // micro)
        torch.distributed.all_reduce(totals)
        return {
            "loss": totals[0].item() / (steps * self.world_size),
            "reward_margin": totals[1].item() / (steps * self.world_size),
            "tokens": totals[2].item(),
            "pairs": totals[3].item(),
            "prompts_truncated": int(totals[4].item()),
            "responses_truncated": int(totals[5].item()),
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "step": self.step,
            "version_at_start": version_at_start,  # rank 0's: the newest version published before this step ran
            "step_seconds": self._busy_since(start),
        }

    def _busy_since(self, start: float) -> float:
        seconds = time.perf_counter() - start
        self.busy_seconds += seconds
        return seconds

    def hold(self, point: str, marker: str, skip: int = 0) -> None:
        """Chaos tests: hold `train_step N` (step N) until this process is killed (actors/faults.py)."""
        self.holds.arm(point, marker, skip)

    def stats(self) -> dict[str, Any]:
        present = [w for w, m in (("policy", self.engine), ("reference", self.reference), ("ema", self.ema))
                   if m is not None]
        # where each model's tensors are, and in which dtype: one model off the engine's device fails step 1
        placement = {w: sorted({f"{t.device}/{t.dtype}".replace("torch.", "") for _, t in self._named(w)})
                     for w in present}
        return {"rank": self.rank, "step": self.step, "policy_version": self.version, "busy_seconds": self.busy_seconds,
                "placement": placement, "partitioned": self.partitioned, "peak_rss_mb": peak_rss_mb()}

    def reset_peak_memory(self) -> None:
        """Start `peak_rss_mb` over, e.g. after loading, to measure training."""
        reset_peak_rss()

    def _grad_norm_before_step(self) -> float | None:
        """Without ZeRO, DeepSpeed does not report the norm: gradients are full (and all-reduced) here."""
        if self.cfg.train.zero_stage > 0:
            return None
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()

    def refresh_reference(self, source: str = "policy") -> None:
        """Reference ← the current policy or EMA policy (the recipe's `reference_refresh` says which, and when),
        one parameter at a time, on the device: no gathered model, no host copy."""
        if self.reference is None:
            return
        start = time.perf_counter()
        if self.partitioned:
            self._copy_partitions("reference", source)
        else:
            reference = dict(self._named("reference"))
            with torch.no_grad():
                for name, p in self._each_parameter(source):
                    reference[name].copy_(p.detach())
        self._busy_since(start)

    @torch.no_grad()
    def _copy_partitions(self, target: str, source: str) -> None:
        """ZeRO-3: `target` ← `source` partition to partition (identical layouts), on every rank."""
        for t, s in self._partition_pairs(target, source):
            t.copy_(s)

    def _update_ema(self) -> None:
        """θ_ema ← α θ_ema + (1 − α) θ where θ_ema lives: under ZeRO-3 each rank updates its partition."""
        if self.partitioned:
            for e, src in self._partition_pairs("ema", "policy"):
                ema_update([e], [src], self.recipe.ema.alpha)
        else:
            ema = dict(self._named("ema"))
            for name, p in self._each_parameter("policy"):
                ema_update([ema[name]], [p], self.recipe.ema.alpha)

    # -- weights ------------------------------------------------------------------------------------------------

    def _named(self, which: str) -> list[tuple[str, torch.nn.Parameter]]:
        """(name, parameter) of the policy, EMA or reference as it is stored (under ZeRO-3: partitioned). With LoRA:
        that adapter's tensors under PEFT's saved names (the base is shared and frozen)."""
        if self.lora:
            if which != "policy" and getattr(self, which) is None:
                raise ValueError(f"this learner has no {which} adapter")
            return adapter_parameters(self.engine.module, which)
        model = {"policy": self.engine, "ema": self.ema, "reference": self.reference}[which]
        if model is None:
            raise ValueError(f"this learner has no {which} model")
        return list((model.module if which == "policy" or self.partitioned else model).named_parameters())

    def _specs(self, which: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """{name: (full shape, dtype)} of what `_each_parameter(which)` yields, read without gathering."""
        return {n: (tuple(getattr(p, "ds_shape", None) or p.shape), p.dtype) for n, p in self._named(which)}

    def _gathered(self, params: list, modifier_rank: int | None = None):
        """Under ZeRO-3, `params` gathered whole for the block (a collective: every rank must enter it); with
        `modifier_rank`, what that rank writes into them is partitioned back on exit."""
        if not self.partitioned:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)

    def _partition_pairs(self, target: str, source: str):
        """ZeRO-3: (tensor of `target`, the same of `source`) to update in place on this rank — each parameter's
        partition, and for a parameter under `stage3_param_persistence_threshold` (norms, LoRA factors), which
        every rank also keeps whole and computes with, that whole copy too (a gather does not refresh it), from the
        source gathered if it is not whole itself. Every rank must iterate (a gather is a collective)."""
        targets = dict(self._named(target))
        for name, p in self._named(source):
            t = targets[name]
            yield t.ds_tensor, p.ds_tensor
            if t.data.numel() == t.ds_numel:  # whole on this rank (persistent)
                with self._gathered([p]):
                    yield t.data, p.data

    def _each_parameter(self, which: str, modifier_rank: int | None = None):
        """(name, full parameter) of the policy, EMA or reference, one at a time. Under ZeRO-3 each parameter is
        gathered for its turn only, so no rank ever holds a whole model gathered."""
        for name, p in self._named(which):
            with self._gathered([p], modifier_rank):
                yield name, p

    def full_state(self, which: str = "policy") -> dict[str, torch.Tensor]:
        """Full, unsharded parameters as CPU tensors on rank 0, {} on the others (every rank must call this under
        ZeRO-3): only the rank that sends or saves them keeps a host copy."""
        state = {}
        for name, p in self._each_parameter(which):
            if self.rank == 0:
                state[name] = p.detach().to("cpu", copy=True).contiguous()
        return state

    def _buckets(self, which: str, bucket_bytes: int, buffers: int) -> tuple[list[dict], Iterator[torch.Tensor | None]]:
        """The manifest of `which`, planned without gathering, and an iterator that fills its buckets one at a time
        (ZeRO-3: each bucket's parameters gathered for its turn only, so no rank ever holds a gathered model).
        Every rank must run the iterator to its end (the gathers are collectives); rank 0 gets each bucket, on the
        parameters' device, the others None. Buckets take turns in `buffers` reused buffers (the consumer must be
        done with a bucket `buffers` buckets later); 0: each bucket is a tensor of its own."""
        manifest, named = plan_buckets(self._specs(which), bucket_bytes), dict(self._named(which))
        largest, pool = max(bucket_sizes(manifest), default=0), []

        def fill() -> Iterator[torch.Tensor | None]:
            for i, entries in enumerate(bucket_entries(manifest)):
                params = [named[m["name"]] for m in entries]
                with self._gathered(params):
                    if self.rank == 0 and len(pool) < buffers:
                        pool.append(torch.empty(largest, dtype=torch.uint8, device=params[0].device))
                    bucket = fill_bucket(entries, params, buffer=pool[i % buffers] if buffers else None) \
                        if self.rank == 0 else None
                yield bucket

        return manifest, fill()

    def publish(self, which: str = "policy", bucket_bytes: int = 64 << 20, bump: bool = True) -> dict[str, Any] | None:
        """Put the weights in the object store bucket by bucket, as the next version (bump=False: the current one
        again, for generators that start after a resume). Collective under ZeRO-3: every rank calls it; rank 0
        returns {version, manifest, checksums, buckets: [ObjectRef], nbytes}, the others None."""
        start = time.perf_counter()
        # own tensors: ray.put of a view into a larger buffer would serialize the whole buffer
        manifest, buckets = self._buckets(which, bucket_bytes, buffers=0)
        refs, checksums = [], []
        for bucket in buckets:
            if bucket is not None:
                checksums.append(checksum(bucket))
                refs.append(ray.put(bucket.cpu()))  # host memory: this bucket and the object store's copy
        if self.rank != 0:
            return None
        self.version += int(bump)
        self._busy_since(start)
        return {"version": self.version, "manifest": manifest, "checksums": checksums, "buckets": refs,
                "nbytes": sum(bucket_sizes(manifest))}

    def open_channel(self, host: str, port: int, rank: int, size: int, backend: str, timeout_s: float) -> bool:
        """Join the weight broadcast group as its sender (rank 0 only)."""
        from actors.weight_sync import BroadcastChannel

        if getattr(self, "channel", None) is not None:
            self.channel.close()
        self.channel = BroadcastChannel(host, port, rank, size, timeout_s=timeout_s, backend=backend)
        return True

    def publish_broadcast(self, which: str = "policy", bucket_bytes: int = 64 << 20,
                          bump: bool = True) -> dict[str, Any] | None:
        """Like `publish`, but rank 0 broadcasts each bucket to the generators as soon as it is filled, while the
        next one is gathered; returns once every generator has received the last one."""
        start = time.perf_counter()
        from actors.weight_sync import BroadcastChannel

        manifest, buckets = self._buckets(which, bucket_bytes, buffers=BroadcastChannel.IN_FLIGHT)
        if self.rank != 0:
            for _ in buckets:  # take part in every gather
                pass
            return None
        self.version += int(bump)
        try:
            if self.channel is None:
                raise WeightSyncError("learner rank 0 has no weight broadcast group (a broken one was closed)")
            sent = self.channel.send(self.version, manifest, buckets)
        except WeightSyncError:  # a receiver died: close the group so the others fail now, not at their timeout,
            if self.channel is not None:  # and take part in the remaining gathers (ZeRO-3: every rank, every bucket)
                self.channel.close()
                self.channel = None
            for _ in buckets:
                pass
            raise
        self._busy_since(start)
        return {"version": self.version, "nbytes": sent, "buckets": len(bucket_sizes(manifest))}

    def get_version(self) -> int:
        return self.version

    # -- checkpoints -------------------------------------------------------------------------------------------

    def save_checkpoint(self, directory: str, merged: bool = True) -> str:
        """Model (a Hugging Face directory) + EMA + reference in safetensors, streamed a parameter at a time by
        rank 0; optimizer (DeepSpeed, all ZeRO stages), RNG, step, version. With LoRA: the policy adapter in PEFT's
        layout (`adapter/`), the EMA and reference adapters, DeepSpeed's state without the frozen base, and the
        merged model in `model/` only when `merged` (the final checkpoint: what evaluation and users load)."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self.engine.save_checkpoint(str(out / "deepspeed"), tag="latest", save_latest=False,
                                    exclude_frozen_parameters=bool(self.lora))
        _save_rng(out, self.rank)
        if self.lora:
            self._stream("policy", out / "adapter" / ADAPTER_WEIGHTS)
        if not self.lora or merged:
            self._stream("merged" if self.lora else "policy", out / "model" / "model.safetensors")
        for which in ("ema", "reference"):
            if getattr(self, which) is not None:
                self._stream(which, out / f"{which}.safetensors")
        if self.rank == 0:
            if self.lora:
                write_adapter_config(self.engine.module, self.policy_path, out / "adapter")
            if not self.lora or merged:
                _save_model_files(self._base_model(), self.tokenizer, out / "model")
            (out / "trainer_state.json").write_text(json.dumps({"step": self.step, "policy_version": self.version}))
        torch.distributed.barrier()
        return str(out)

    def save_policy(self, path: str) -> int:
        """The policy as its generators load it (the tensors `publish` sends: with LoRA the adapter) in one
        safetensors file, streamed by rank 0 (actors/evaluation.py). Returns the step it holds."""
        self._stream("policy", Path(path))
        return self.step

    def _base_model(self) -> torch.nn.Module:
        """The transformers model under DeepSpeed (and under PEFT's wrapper, with LoRA)."""
        return self.engine.module.get_base_model() if self.lora else self.engine.module

    def _stream(self, which: str, path: Path) -> None:
        """Write one model's parameters to a safetensors file as they are gathered (rank 0 writes; the others
        take part in each gather under ZeRO-3): host memory for one parameter at a time, not a model."""
        if which == "merged":
            specs, tensors = self._merged_specs(), self._each_merged_parameter()
        else:
            specs, tensors = list(self._specs(which).items()), (p for _, p in self._each_parameter(which))
        if self.rank == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_safetensors(path, [(n, shape, dtype) for n, (shape, dtype) in specs], tensors)
        else:
            for _ in tensors:
                pass

    def _merged_layers(self) -> list[tuple[str, torch.nn.Parameter, tuple | None]]:
        """LoRA: (name in the base model, base parameter, (lora_A, lora_B) of the policy adapter or None)."""
        params = dict(self.engine.module.named_parameters())
        out = []
        for name, p in params.items():
            if ".lora_" in name:
                continue
            plain = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
            layer = name.split(".base_layer.")[0] if name.endswith(".base_layer.weight") else None
            pair = (params[f"{layer}.lora_A.default.weight"], params[f"{layer}.lora_B.default.weight"]) if layer else None
            out.append((plain, p, pair))
        return out

    def _merged_specs(self) -> list[tuple[str, tuple[tuple[int, ...], torch.dtype]]]:
        return [(n, (tuple(getattr(p, "ds_shape", None) or p.shape), p.dtype)) for n, p, _ in self._merged_layers()]

    def _each_merged_parameter(self):
        """LoRA: the merged policy W + (α/r)·B·A a layer at a time (gathered together under ZeRO-3)."""
        scale = self.lora.alpha / self.lora.rank
        for _, p, pair in self._merged_layers():
            with self._gathered([p, *(pair or ())]):
                yield merge_weights(p.detach(), *pair, scale) if pair else p.detach()

    def load_checkpoint(self, directory: str) -> dict[str, int]:
        from safetensors.torch import load_file

        from selfplay.models import check_checkpoint_compatible

        src = Path(directory)
        if self.lora:  # a clear error for another model's or another adapter's checkpoint
            check_adapter_checkpoint(src, self.engine.module, {w: self._specs(w) for w in ADAPTERS
                                                      if w == "policy" or getattr(self, w) is not None})
        else:
            check_checkpoint_compatible(src, self.engine.module)
        self.engine.load_checkpoint(str(src / "deepspeed"), tag="latest", load_optimizer_states=True,
                                    load_lr_scheduler_states=True, load_module_strict=not self.lora)
        for w in ("ema", "reference"):
            if getattr(self, w) is not None:
                state = load_file(str(src / f"{w}.safetensors")) if self.rank == 0 or not self.partitioned else {}
                with torch.no_grad():
                    for name, p in self._each_parameter(w, modifier_rank=0):  # rank 0's copy is partitioned out
                        if name in state:
                            p.copy_(state[name])
        _load_rng(src, self.rank)
        state = json.loads((src / "trainer_state.json").read_text())
        self.step, self.version = state["step"], state["policy_version"]
        return state


def _save_model_files(model, tokenizer, directory: Path) -> None:
    """Everything of a Hugging Face model directory but the weights (streamed there separately). A function of
    its own: Ray pickles actor methods by value, and cloudpickle would take a method naming both `torch` and
    `config` for a user of the unpicklable `torch.*.config` modules."""
    from selfplay.models import quiet_transformers

    quiet_transformers()
    model.config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def _frozen(model: torch.nn.Module) -> torch.nn.Module:
    model.eval().requires_grad_(False)
    return model


def _save_rng(out: Path, rank: int) -> None:
    """RNG state without pickle: torch generators as tensors (safetensors), Python/NumPy states as JSON."""
    from safetensors.torch import save_file

    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(tensors, str(out / f"rng_rank{rank}.safetensors"))
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, state, gauss = random.getstate()
    (out / f"rng_rank{rank}.json").write_text(json.dumps({
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached], "python": [version, list(state), gauss]}))


def _load_rng(src: Path, rank: int) -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(src / f"rng_rank{rank}.safetensors"))
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available() and "cuda0" in tensors:
        torch.cuda.set_rng_state_all([tensors[f"cuda{i}"] for i in range(torch.cuda.device_count())])
    state = json.loads((src / f"rng_rank{rank}.json").read_text())
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, inner, gauss = state["python"]
    random.setstate((version, tuple(inner), gauss))


class LearnerGroup:
    """Driver-side handle on `num_learners` LearnerActors forming one data-parallel group.

    Every call waits at most `timeout_s` and names the rank that failed; a learner failure stops the group
    (the caller resumes from the last checkpoint).
    """

    def __init__(self, cfg: Config, policy: str | None = None, *, timeout_s: float = 600.0, num_cpus: float | None = None,
                 num_gpus: float | None = None, placement: Placement | None = None):
        """`placement`: the run's groups (the driver's); without it the group places its ranks itself."""
        r = cfg.resources
        r = dataclasses.replace(r, learner_cpus=r.learner_cpus if num_cpus is None else num_cpus,
                                learner_gpus=r.learner_gpus if num_gpus is None else num_gpus)
        self.cfg, self.world_size, self.timeout_s = dataclasses.replace(cfg, resources=r), r.num_learners, timeout_s
        self.own_placement = placement is None
        self.placement = Placement(self.cfg, roles=("learner",)) if placement is None else placement
        policy = policy or cfg.model.policy
        self.actors = [
            LearnerActor.options(num_cpus=r.learner_cpus, num_gpus=r.learner_gpus,
                                 scheduling_strategy=self.placement.strategy("learner", rank),
                                 runtime_env=None if r.learner_gpus else CPU_LEARNER_ENV).remote(
                cfg.to_dict(), rank, self.world_size, policy)
            for rank in range(self.world_size)
        ]
        addr, port = self._get([self.actors[0].address.remote()], "address")[0]
        self.info = self._get([a.setup.remote(addr, port) for a in self.actors], "setup")

    def train_step(self, rows: pa.Table) -> dict[str, float]:
        """Split rows evenly over the ranks (train.batch_size rows in all) and take one step."""
        return self.finish_step(self.train_step_async(rows))

    def train_step_async(self, rows: pa.Table) -> list:
        """Start a step and return at once (the refs); `finish_step` collects the metrics."""
        if rows.num_rows % self.world_size:
            raise ValueError(f"{rows.num_rows} rows do not split evenly over {self.world_size} learners")
        share = rows.num_rows // self.world_size
        return [a.train_step.remote(rows.slice(r * share, share)) for r, a in enumerate(self.actors)]

    def finish_step(self, refs: list) -> dict[str, float]:
        return self._get(refs, "train_step")[0]

    def publish(self, which: str = "policy", bucket_bytes: int = 64 << 20) -> dict[str, Any]:
        """Gathered weights in the object store: {version, manifest, checksums, buckets, nbytes}."""
        return self._get(self.call_async("publish", which, bucket_bytes), "publish")[0]

    def call_async(self, method: str, *args) -> list[ray.ObjectRef]:
        """Call `method` on every rank (collectives need them all) and return the refs at once, rank 0's first."""
        return [getattr(a, method).remote(*args) for a in self.actors]

    def stats(self) -> list[dict[str, Any]]:
        return self._get([a.stats.remote() for a in self.actors], "stats")

    def full_state(self, which: str = "policy") -> dict[str, torch.Tensor]:
        return self._get([a.full_state.remote(which) for a in self.actors], "full_state")[0]

    def save_policy(self, path: str | Path) -> int:
        """The policy in one safetensors file, as generators load it; returns the learners' step."""
        return self._get([a.save_policy.remote(str(path)) for a in self.actors], "save_policy")[0]

    def refresh_reference(self, source: str = "policy") -> None:
        self._get([a.refresh_reference.remote(source) for a in self.actors], "refresh_reference")

    def save_checkpoint(self, directory: str | Path, merged: bool = True) -> str:
        return self._get([a.save_checkpoint.remote(str(directory), merged) for a in self.actors],
                         "save_checkpoint")[0]

    def load_checkpoint(self, directory: str | Path) -> dict[str, int]:
        return self._get([a.load_checkpoint.remote(str(directory)) for a in self.actors], "load_checkpoint")[0]

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a)
        self.actors = []
        if self.own_placement:
            self.placement.remove()

    def _get(self, refs: list, what: str) -> list:
        try:
            results = get_all(dict(enumerate(refs)), self.timeout_s, what, "learner rank")
        except ActorDiedError:
            raise
        except Exception as e:
            # a rank that dies fails its peers' collectives (gloo: "Connection reset by peer"): name the dead rank,
            # so that the run resumes from its checkpoint instead of stopping on a peer's transport error
            dead = dead_actors(dict(enumerate(refs)), DEATH_SETTLE_S)
            if dead:
                raise ActorDiedError(f"learner rank {dead[0]}: actor died during {what} ({e})", dead[0],
                                     "learner rank") from e
            raise
        return [results[i] for i in range(len(refs))]
