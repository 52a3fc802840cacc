"""Typed run configuration: dataclasses loaded from YAML, `--set a.b=c` overrides, validated up front.

Every problem — unknown key, wrong type, impossible value — is reported before anything starts, each naming
the key and where it came from (`file:line` or `--set`). All problems are reported at once.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration problem; the message names the key and its source."""


@dataclass
class LoRAConfig:
    rank: int = 0  # 0: full fine-tuning; r > 0: train LoRA adapters of rank r on a frozen base (selfplay/lora.py)
    alpha: float = 16.0  # the update is scaled by alpha / rank
    dropout: float = 0.0
    target_modules: list[str] | None = None  # module names (e.g. [q_proj, v_proj]); null: every linear layer


@dataclass
class ModelConfig:
    policy: str = "tiny"  # "tiny" builds the embedded model; otherwise a local directory or hub id
    reference: str | None = None  # defaults to the initial policy
    trust_remote_code: bool = False  # executing a checkpoint's Python code must be asked for explicitly
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    lora: LoRAConfig = field(default_factory=LoRAConfig)


@dataclass
class TaskConfig:
    name: str = "sort"  # a synthetic task from selfplay.tasks, "file" for a prompt file, "hf" for a HF dataset
    path: str | None = None  # file: a JSONL, JSON or Parquet file; hf: a hub id, a save_to_disk directory, data files
    split: str = "train"  # hf: the dataset's split
    prompt_field: str = "prompt"
    reference_field: str | None = None  # prompt files: a reference answer per prompt (SAPO's chosen)
    heldout_fraction: float = 0.05  # prompt files: share of prompts kept out of training for evaluation
    max_prompt_chars: int = 32_000  # prompt files: a longer prompt is a bad record (chat: all messages together)
    skip_bad_records: bool = False  # prompt files: false = any bad record stops the run before it starts;
    # true = bad records are skipped, counted and logged with file:line (PromptSet.skipped)
    train_size: int = 2000
    eval_size: int = 200
    min_items: int = 4
    max_items: int = 8


@dataclass
class WarmupConfig:
    steps: int = 60  # supervised steps: the random tiny model becomes a weak (~30% score) initial policy
    batch_size: int = 64
    lr: float = 2e-3


@dataclass
class GenerationConfig:
    backend: Literal["hf", "vllm"] = "hf"
    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 24
    prompts_per_request: int = 8  # prompts in one generator call (each yields one judge group)
    gpu_memory_utilization: float = 0.2  # vLLM only; on CPU it is the share of RAM kept for the KV cache
    # vLLM only: the longest sequence (prompt + response tokens) the engine serves; null: the model's own limit
    # (32,768 for Mistral-7B). Set it to what the prompts need: the KV cache must hold one sequence of this length
    max_model_len: int | None = None
    # async mode: requests each generator works on at once. vLLM runs them in one batch (the next request's
    # prompts fill the places of finished sequences); hf takes them one after another (no round trip between)
    requests_in_flight: int = 1


@dataclass
class EvalConfig:
    prompts: int = 200  # held-out prompts for winrate_vs_initial
    temperature: float = 0.0  # 0: greedy, deterministic answers from both policies
    every: int = 0  # also evaluate every N learner steps (0: only at the end)
    # also keep the policy every N seconds of the training loop and evaluate those copies after the run: quality
    # vs wall time with no evaluation inside the timed loop (benchmarks.time_to_quality); 0: off
    every_seconds: float = 0.0


@dataclass
class JudgeConfig:
    kind: Literal["rule", "pairrm"] = "rule"
    path: str | None = None  # PairRM checkpoint (local directory or hub id)
    batch_size: int = 32
    temperature: float = 0.1  # rule judges: P(a≻b) = σ((score_a − score_b) / temperature)


@dataclass
class SPPOConfig:
    k: int = 5  # samples per prompt (paper: 5)
    beta: float = 0.001  # η = 1/β (paper: 0.001)
    iterations: int = 3


@dataclass
class SAPOConfig:
    loss: Literal["dpo", "ipo", "orpo"] = "dpo"
    beta: float = 0.1  # DPO β (IPO's τ)
    orpo_lambda: float = 0.1
    ema_alpha: float = 0.5  # paper: 0.5
    ema_every: int = 2  # paper: every 2 steps
    segment_len: int = 256  # paper: 256
    # learner steps between reference ← EMA policy refreshes (official SAPO: ref_update_mode ema); 0 = never
    reference_update_every: int = 0


@dataclass
class SRPOConfig:
    k: int = 1  # answers sampled per prompt besides the revision (1: the pair is answer vs its revision)
    alpha: float = 0.5
    beta: float = 0.1
    revisions: int = 1
    revision_template: str = (
        "{prompt}\n\nHere is a previous answer:\n{response}\n\nImprove it. Reply with the improved answer only."
    )


@dataclass
class TrainConfig:
    loss: Literal["dpo", "ipo", "orpo", "sppo", "srpo"] | None = None  # None: the algorithm's own loss
    lr: float = 5e-7
    batch_size: int = 8  # pairs per learner step, across all learners
    steps: int = 100
    zero_stage: int = 0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    optimizer: Literal["adamw", "sgd"] = "adamw"  # sgd: plain SGD, for equivalence checks (an update linear in the gradient)
    # how a response's token log-probs are reduced before the loss: sum = the papers' sequence log-probs;
    # token_mean = per-token means (sum / response tokens), as TRL's IPO. Not applied to ORPO (already means).
    loss_average: Literal["sum", "token_mean"] = "sum"
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    sync_every: int = 1  # push weights to generators every N learner steps
    checkpoint_every: int = 0  # 0: only at the end (a multiple of sync_every: generators then serve these weights)
    max_resumes: int = 0  # a learner failure resumes the run from its last checkpoint up to this many times
    # memory: pairs per forward/backward on each learner (the rest accumulates); None: the learner's whole share
    micro_batch_size: int | None = None
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% more compute
    # the responses of one prompt (a pair's two, SRPO's revisions) run it once, over its keys and values: fewer
    # tokens through the model, the same loss. Off under gradient_checkpointing (it drops the KV cache)
    share_prompts: bool = True
    max_prompt_tokens: int | None = None  # longer prompts lose their start (counted: prompts_truncated)
    max_response_tokens: int | None = None  # longer responses lose their end (counted: responses_truncated)
    # async: each step waits for its round of fresh rows (as a sync step: generation.prompts_per_request per
    # generator), generated at most N policy versions before the weights it trains (generation waits for new
    # weights); 1 = one-step off-policy. None: nothing waits (rows trained many versions late, and re-trained)
    max_policy_lag: int | None = 1
    # stop the training loop after this many seconds of it (at least one step; the steps started finish, then the
    # final checkpoint and evaluation); None: train.steps decides. A resumed attempt counts its own loop. Step-based
    # schedules (SPPO iterations, eval.every, checkpoint_every) still count in train.steps
    max_seconds: float | None = None
    # merged last into the DeepSpeed config the learner writes (docs/cluster.md), e.g.
    # {zero_optimization: {stage3_max_live_parameters: 100000000}}; a key ours sets is replaced, nested keys merge
    deepspeed: dict[str, Any] = field(default_factory=dict)


@dataclass
class ReplayConfig:
    capacity: int = 2000  # rows per run (split over shards); paper SAPO: 2000
    sampling: Literal["uniform", "fifo_recent", "fifo_oldest", "least_sampled"] = "uniform"
    replace: bool = False
    max_staleness: int | None = None  # versions; None keeps every row
    max_reuse: int | None = None  # a row leaves the buffer once sampled this many times; None: no limit


PROMPT_SETS = ("file", "hf")  # task.name values that read prompts (a file; a Hugging Face dataset), not a synthetic task
Strategy = Literal["STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD"]  # Ray placement-group strategies


@dataclass
class ResourcesConfig:
    num_generators: int = 1
    num_learners: int = 1
    num_judges: int = 1
    replay_shards: int = 1
    generator_gpus: float = 0.0
    generator_cpus: float = 1.0
    learner_gpus: float = 0.0
    learner_cpus: float = 1.0
    judge_gpus: float = 0.0
    judge_cpus: float = 1.0
    replay_cpus: float = 0.5
    max_restarts: int = 3  # per generator, judge and replay shard: restarts by Ray before its death fails the run
    # placement (selfplay.placement): Ray's group strategies, plus custom resources and node labels per role
    learner_strategy: Strategy = "STRICT_PACK"  # every rank on one node; PACK/SPREAD let them cross nodes (warned)
    judge_strategy: Strategy = "PACK"
    replay_strategy: Strategy = "PACK"
    generator_resources: dict[str, float] = field(default_factory=dict)  # e.g. {generator_node: 1}
    learner_resources: dict[str, float] = field(default_factory=dict)
    judge_resources: dict[str, float] = field(default_factory=dict)
    replay_resources: dict[str, float] = field(default_factory=dict)
    generator_labels: dict[str, str] = field(default_factory=dict)  # e.g. {ray.io/accelerator-type: H100}
    learner_labels: dict[str, str] = field(default_factory=dict)
    judge_labels: dict[str, str] = field(default_factory=dict)
    replay_labels: dict[str, str] = field(default_factory=dict)
    placement_timeout_s: float = 300.0  # a layout the nodes fit waits this long for resources other work holds


@dataclass
class LoggingConfig:
    wandb: bool = False
    wandb_project: str = "selfplay"
    wandb_group: str | None = None
    log_every: int = 1


@dataclass
class WeightSyncConfig:
    transport: Literal["object_store", "collective"] = "object_store"  # collective: a broadcast group (gloo/NCCL)
    # weights travel as buckets of this many MiB, streamed: sender and receivers each hold ~2 beside the model
    bucket_mb: int = 64
    # vLLM: a load does not wait for the requests running on a generator; they are preempted, their KV recomputed
    # with the new weights, and they go on (as slime and AReaL do). A row records the version its request started
    # with, the oldest that contributed. False: a load waits for them, and each request is served by one version
    mid_request: bool = False


@dataclass
class Config:
    algorithm: Literal["sppo", "sapo", "srpo"] = "sppo"
    mode: Literal["sync", "async"] = "sync"
    seed: int = 0
    out_dir: str = "runs/demo"
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    sppo: SPPOConfig = field(default_factory=SPPOConfig)
    sapo: SAPOConfig = field(default_factory=SAPOConfig)
    srpo: SRPOConfig = field(default_factory=SRPOConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    weight_sync: WeightSyncConfig = field(default_factory=WeightSyncConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        """A Config from its `to_dict()` form (how it travels to actors), checked like a file."""
        return _checked(data, {}, [], None)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ----------------------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read YAML (or start from the defaults when path is None), apply `a.b=c` overrides, build and validate."""
    sources: dict[str, str] = {}
    data: dict[str, Any] = {}
    errors: list[str] = []
    if path is not None:
        data = _read_yaml(Path(path), sources, errors)
    for item in overrides:
        _apply_override(data, item, sources)
    return _checked(data, sources, errors, path)


def _checked(data: dict[str, Any], sources: dict[str, str], errors: list[str], path: str | Path | None) -> Config:
    cfg = _build(Config, data, "", sources, errors)
    errors.extend(validate(cfg, sources))  # also on a partly broken config: report every problem at once
    if errors:
        if len(errors) == 1:  # one line: the problem names its file:line or --set already
            raise ConfigError(f"invalid configuration: {errors[0]}")
        where = f" in {path}" if path is not None else ""
        raise ConfigError(f"invalid configuration{where} ({len(errors)} problems):\n  " + "\n  ".join(errors))
    return cfg


def _read_yaml(path: Path, sources: dict[str, str], errors: list[str]) -> dict[str, Any]:
    """Parse the file; fatal problems raise, duplicate keys are added to `errors` (reported with the rest)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a config file") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte {e.start}, column {column}: {e.reason}); "
                          "save the file as UTF-8") from None
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{path}{line}: malformed YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    _record_lines(node, "", str(path), sources)
    errors.extend(_duplicate_keys(node, "", str(path)))
    return data


def _duplicate_keys(node: yaml.Node | None, prefix: str, fname: str) -> list[str]:
    """A key written twice in one mapping: YAML keeps the last value silently, so one of the two is a mistake."""
    out: list[str] = []
    if not isinstance(node, yaml.MappingNode):
        return out
    seen: dict[str, int] = {}
    for key_node, value_node in node.value:
        key, line = str(key_node.value), key_node.start_mark.line + 1
        if key in seen:
            out.append(f"{fname}:{line}: {prefix}{key}: duplicate key (first set on line {seen[key]}; "
                       "YAML would keep only the last value)")
        else:
            seen[key] = line
        out.extend(_duplicate_keys(value_node, f"{prefix}{key}.", fname))
    return out


def _record_lines(node: yaml.Node | None, prefix: str, fname: str, sources: dict[str, str]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}{key_node.value}"
            sources[key] = f"{fname}:{key_node.start_mark.line + 1}"
            _record_lines(value_node, key + ".", fname, sources)


def _apply_override(data: dict[str, Any], item: str, sources: dict[str, str]) -> None:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set train.lr=1e-6")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    node = data
    parts = key.split(".")
    for i in range(1, len(parts)):
        sources.setdefault(".".join(parts[:i]), "--set")
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {key}: {part} is a value, not a section")
        node = nxt
    node[parts[-1]] = value
    sources[key] = "--set"


def _where(key: str, sources: dict[str, str]) -> str:
    """Source of a key, or of its closest enclosing section (a missing key is reported at its section)."""
    parts = key.split(".")
    for i in range(len(parts), 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in sources:
            return f"{sources[prefix]}: "
    return ""


def _build(cls, data: Any, prefix: str, sources: dict[str, str], errors: list[str]):
    section = prefix.rstrip(".") or "config"
    if not isinstance(data, dict):
        errors.append(f"{_where(section, sources)}{section}: expected a mapping, got {data!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            elsewhere = _sections_with(str(key), prefix)
            if close:
                hint = f" (did you mean {prefix}{close[0]}?)"
            elif elsewhere:
                hint = f" (it belongs in another section: {' or '.join(elsewhere)})"
            else:
                hint = f" (known: {', '.join(names)})"
            errors.append(f"{_where(full, sources)}{full}: unknown key{hint}")
            continue
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value if value is not None else {}, full + ".", sources, errors)
        else:
            ok, coerced, expected = _coerce(value, hint)
            if ok:
                kwargs[key] = coerced
            else:
                errors.append(f"{_where(full, sources)}{full}: expected {expected}, got {value!r}")
    return cls(**kwargs)


def _sections_with(key: str, prefix: str) -> list[str]:
    """`section.key` for every section (other than `prefix`) that has a key of this name: `train.beta` → sppo.beta."""
    out = []
    for f in dataclasses.fields(Config):
        hint = typing.get_type_hints(Config)[f.name]
        if dataclasses.is_dataclass(hint) and f"{f.name}." != prefix:
            if key in {g.name for g in dataclasses.fields(hint)}:
                out.append(f"{f.name}.{key}")
    return out


def _coerce(value: Any, hint) -> tuple[bool, Any, str]:
    """Check/convert one value against a type hint → (ok, value, description of what was expected)."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        return value in choices, value, "one of " + ", ".join(map(repr, choices))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return True, None, ""
        ok, coerced, expected = _coerce(value, args[0])
        return ok, coerced, f"{expected} or null"
    if origin is dict:
        return isinstance(value, dict), value, "a mapping"
    if hint is bool:
        return isinstance(value, bool), value, "true or false"
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value, "an integer"
    if hint is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "1e-6" as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None and math.isfinite(number):
            return True, number, ""
        return False, value, "a finite number"
    if hint is str:
        return isinstance(value, str), value, "a string"
    return True, value, ""


# ----------------------------------------------------------------------------------------------------------
# Validation: impossible values and combinations


def validate(cfg: Config, sources: dict[str, str] | None = None) -> list[str]:
    """Return a list of problems ("<source>: key: message"); empty when the config can run."""
    from selfplay.recipes import RECIPES  # late: recipes read the config
    from selfplay.tasks import TASKS  # late: tasks import models, which import transformers

    sources = sources or {}
    errors: list[str] = []

    def check(ok: bool, key: str, message: str) -> None:
        if not ok:
            value = _get(cfg, key)
            errors.append(f"{_where(key, sources)}{key}: {message}, got {value!r}")

    for key in ("num_generators", "num_learners", "num_judges", "replay_shards"):
        check(_get(cfg, f"resources.{key}") >= 1, f"resources.{key}", "must be >= 1")
    for role in ("generator", "learner", "judge", "replay"):
        check(_get(cfg, f"resources.{role}_cpus") >= 0, f"resources.{role}_cpus", "must be >= 0")
        if role != "replay":
            gpus = _get(cfg, f"resources.{role}_gpus")
            check(gpus >= 0 and (gpus <= 1 or float(gpus).is_integer()), f"resources.{role}_gpus",
                  "must be >= 0, and a whole number when above 1")
        if isinstance(_get(cfg, f"resources.{role}_resources"), dict):
            check(all(isinstance(k, str) and _number(v) and v >= 0
                      for k, v in _get(cfg, f"resources.{role}_resources").items()),
                  f"resources.{role}_resources", "must map Ray resource names to amounts >= 0")
        if isinstance(_get(cfg, f"resources.{role}_labels"), dict):
            check(all(isinstance(k, str) and isinstance(v, str) for k, v in _get(cfg, f"resources.{role}_labels").items()),
                  f"resources.{role}_labels", "must map Ray node label names to string values (quote numbers)")
    check(cfg.resources.generator_gpus <= 1 or cfg.generation.backend == "vllm", "resources.generator_gpus",
          "above 1 means a tensor-parallel engine, which needs generation.backend vllm")
    check(cfg.resources.placement_timeout_s > 0, "resources.placement_timeout_s", "must be > 0")

    check(cfg.task.name in TASKS or cfg.task.name in PROMPT_SETS, "task.name",
          f"unknown task (known: {', '.join(sorted(TASKS))}, {', '.join(PROMPT_SETS)})")
    check(cfg.task.name not in PROMPT_SETS or bool(cfg.task.path), "task.path",
          f"is required when task.name is {cfg.task.name!r}")
    check(cfg.task.train_size >= 1, "task.train_size", "must be >= 1")
    check(0 < cfg.task.heldout_fraction < 1, "task.heldout_fraction", "must be in (0, 1)")
    needs_answers = cfg.algorithm in RECIPES and RECIPES[cfg.algorithm].needs_reference_answers  # SAPO's chosen
    check(not needs_answers or cfg.task.name not in PROMPT_SETS or bool(cfg.task.reference_field),
          "task.reference_field", f"is required for {cfg.algorithm.upper()} on a prompt file (the chosen responses)")
    check(cfg.task.eval_size >= 1, "task.eval_size", "must be >= 1")
    check(cfg.task.max_prompt_chars >= 1, "task.max_prompt_chars", "must be >= 1")
    check(bool(cfg.model.policy.strip()), "model.policy", "must name a model (tiny, a directory or a hub id)")
    check(bool(cfg.out_dir.strip()), "out_dir", "must not be empty")
    lora = cfg.model.lora
    check(lora.rank >= 0, "model.lora.rank", "must be >= 0 (0: full fine-tuning)")
    check(lora.alpha > 0, "model.lora.alpha", "must be > 0")
    check(0 <= lora.dropout < 1, "model.lora.dropout", "must be in [0, 1)")
    check(lora.target_modules is None or (isinstance(lora.target_modules, list) and bool(lora.target_modules)
                                          and all(isinstance(m, str) and m for m in lora.target_modules)),
          "model.lora.target_modules", "must be a non-empty list of module names, or null (every linear layer)")
    check(not lora.rank or cfg.generation.backend != "vllm" or lora.rank <= 512, "model.lora.rank",
          "must be <= 512 with generation.backend vllm (vLLM's largest LoRA rank)")
    check(not lora.rank or cfg.model.reference is None, "model.reference",
          "cannot be combined with model.lora: the reference is the base model with the adapters off")
    check(cfg.task.min_items >= 1, "task.min_items", "must be >= 1")
    check(cfg.task.max_items >= cfg.task.min_items, "task.max_items", "must be >= task.min_items")

    check(cfg.warmup.steps >= 0, "warmup.steps", "must be >= 0")
    check(cfg.warmup.batch_size >= 1, "warmup.batch_size", "must be >= 1")
    check(cfg.warmup.lr > 0, "warmup.lr", "must be > 0")

    check(cfg.generation.temperature >= 0, "generation.temperature", "must be >= 0")
    check(0 < cfg.generation.top_p <= 1, "generation.top_p", "must be in (0, 1]")
    check(cfg.generation.max_new_tokens >= 1, "generation.max_new_tokens", "must be >= 1")
    check(0 < cfg.generation.gpu_memory_utilization <= 1, "generation.gpu_memory_utilization",
          "must be in (0, 1]")
    check(cfg.generation.max_model_len is None or cfg.generation.max_model_len > cfg.generation.max_new_tokens,
          "generation.max_model_len", "must be > generation.max_new_tokens (a sequence is the prompt and the response)")
    check(cfg.generation.max_model_len is None or cfg.generation.backend == "vllm", "generation.max_model_len",
          "is for generation.backend vllm")

    check(cfg.judge.kind != "pairrm" or bool(cfg.judge.path), "judge.path",
          "is required for the pairrm judge (e.g. llm-blender/PairRM-hf or a local directory)")
    check(cfg.judge.kind != "rule" or cfg.task.name not in PROMPT_SETS, "judge.kind",
          "the rule judge scores the answers of a synthetic task; a prompt set (task.name: file or hf) needs the "
          "pairrm judge")
    check(cfg.judge.batch_size >= 1, "judge.batch_size", "must be >= 1")
    check(cfg.judge.temperature > 0, "judge.temperature", "must be > 0")

    check(cfg.sppo.k >= 2, "sppo.k", "must be >= 2 (SPPO compares K samples of each prompt)")
    check(cfg.sppo.beta > 0, "sppo.beta", "must be > 0 (η = 1/β)")
    check(cfg.sppo.iterations >= 1, "sppo.iterations", "must be >= 1")
    check(cfg.sapo.beta > 0, "sapo.beta", "must be > 0")
    check(cfg.sapo.orpo_lambda >= 0, "sapo.orpo_lambda", "must be >= 0")
    check(0 <= cfg.sapo.ema_alpha <= 1, "sapo.ema_alpha", "must be in [0, 1]")
    check(cfg.sapo.ema_every >= 1, "sapo.ema_every", "must be >= 1")
    check(cfg.sapo.segment_len >= 1, "sapo.segment_len", "must be >= 1")
    check(cfg.sapo.reference_update_every >= 0, "sapo.reference_update_every", "must be >= 0 (0: never)")
    check(0 <= cfg.srpo.alpha <= 1, "srpo.alpha", "must be in [0, 1]")
    check(cfg.srpo.beta > 0, "srpo.beta", "must be > 0")
    check(cfg.srpo.revisions >= 0, "srpo.revisions", "must be >= 0")
    check(cfg.srpo.k >= 1, "srpo.k", "must be >= 1")
    for placeholder in ("{prompt}", "{response}"):
        check(placeholder in cfg.srpo.revision_template, "srpo.revision_template",
              f"must contain {placeholder}")
    template_problem = _template_problem(cfg.srpo.revision_template)
    check(template_problem is None, "srpo.revision_template", template_problem or "")

    check(cfg.train.lr > 0, "train.lr", "must be > 0")
    check(cfg.train.batch_size >= cfg.resources.num_learners, "train.batch_size",
          f"must be >= resources.num_learners ({cfg.resources.num_learners}) so every learner gets a row")
    check(cfg.train.batch_size % max(cfg.resources.num_learners, 1) == 0, "train.batch_size",
          f"must divide evenly over resources.num_learners ({cfg.resources.num_learners})")
    check(cfg.train.steps >= 1, "train.steps", "must be >= 1")
    check(cfg.train.zero_stage in (0, 1, 2, 3), "train.zero_stage", "must be 0, 1, 2 or 3")
    check(cfg.train.weight_decay >= 0, "train.weight_decay", "must be >= 0")
    check(cfg.train.grad_clip >= 0, "train.grad_clip", "must be >= 0 (0 disables clipping)")
    check(cfg.train.sync_every >= 1, "train.sync_every", "must be >= 1")
    check(cfg.train.checkpoint_every >= 0, "train.checkpoint_every", "must be >= 0")
    check(cfg.train.checkpoint_every % cfg.train.sync_every == 0, "train.checkpoint_every",
          f"must be a multiple of train.sync_every ({cfg.train.sync_every}): a resumed run's generators then serve "
          "exactly the checkpoint's weights")
    check(cfg.train.max_resumes >= 0, "train.max_resumes", "must be >= 0")
    share = cfg.train.batch_size // max(cfg.resources.num_learners, 1)
    micro = cfg.train.micro_batch_size
    check(micro is None or (micro >= 1 and share % micro == 0), "train.micro_batch_size",
          f"must be >= 1 and divide each learner's share of the batch (train.batch_size / resources.num_learners = "
          f"{share})")
    for key in ("max_prompt_tokens", "max_response_tokens"):
        limit = getattr(cfg.train, key)
        check(limit is None or limit >= 1, f"train.{key}", "must be >= 1 (or null: no limit)")
    check(cfg.resources.max_restarts >= 0, "resources.max_restarts", "must be >= 0")

    check(cfg.replay.capacity >= cfg.resources.replay_shards, "replay.capacity",
          f"must be >= resources.replay_shards ({cfg.resources.replay_shards})")
    check(cfg.replay.max_staleness is None or cfg.replay.max_staleness >= 0, "replay.max_staleness",
          "must be >= 0 or null")
    check(cfg.replay.max_reuse is None or cfg.replay.max_reuse >= 1, "replay.max_reuse", "must be >= 1 or null")
    check(cfg.train.max_policy_lag is None or cfg.train.max_policy_lag >= 0, "train.max_policy_lag",
          "must be >= 0 or null")
    check(cfg.train.max_seconds is None or cfg.train.max_seconds > 0, "train.max_seconds", "must be > 0 or null")
    check(cfg.logging.log_every >= 1, "logging.log_every", "must be >= 1")
    check(cfg.weight_sync.bucket_mb >= 1, "weight_sync.bucket_mb", "must be >= 1")
    check(not cfg.weight_sync.mid_request or cfg.generation.backend == "vllm", "weight_sync.mid_request",
          "needs generation.backend: vllm (only vLLM resumes a running request on new weights)")
    check(cfg.generation.prompts_per_request >= 1, "generation.prompts_per_request", "must be >= 1")
    check(cfg.generation.requests_in_flight >= 1, "generation.requests_in_flight", "must be >= 1")
    check(cfg.eval.prompts >= 1, "eval.prompts", "must be >= 1")
    check(cfg.eval.temperature >= 0, "eval.temperature", "must be >= 0")
    check(cfg.eval.every >= 0, "eval.every", "must be >= 0 (0: only at the end)")
    check(cfg.eval.every_seconds >= 0, "eval.every_seconds", "must be >= 0 (0: off)")
    return errors


def _template_problem(template: str) -> str | None:
    """Why str.format would fail on the revision template mid-run (an unknown {name}, a lone brace), or None."""
    braces = "write {{ and }} for literal braces"
    try:
        template.format(prompt="p", response="r")
    except KeyError as e:
        return f"has an unknown placeholder {{{e.args[0]}}} (only {{prompt}} and {{response}}; {braces})"
    except (ValueError, IndexError) as e:
        return f"is not a valid format string ({e}; {braces})"
    return None


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _get(cfg: Config, dotted: str) -> Any:
    obj: Any = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


# ----------------------------------------------------------------------------------------------------------
# Resources against a cluster (checked before any actor starts)

_ROLES = (  # (role, count key, per-actor key prefix)
    ("generator", "num_generators"),
    ("learner", "num_learners"),
    ("judge", "num_judges"),
    ("replay", "replay_shards"),
)


def resource_demand(cfg: Config) -> dict[str, list[tuple[str, float, int]]]:
    """What the run's actors ask Ray for: {"CPU"|"GPU": [(per-actor key, amount per actor, actor count)]}."""
    r = cfg.resources
    demand: dict[str, list[tuple[str, float, int]]] = {"CPU": [], "GPU": []}
    for role, count_key in _ROLES:
        count = getattr(r, count_key)
        demand["CPU"].append((f"resources.{role}_cpus", getattr(r, f"{role}_cpus"), count))
        if role != "replay":  # replay shards ask for CPUs only
            demand["GPU"].append((f"resources.{role}_gpus", getattr(r, f"{role}_gpus"), count))
    return demand


def check_resources(cfg: Config, available: dict[str, float]) -> None:
    """Raise ConfigError (a ValueError) when the configured actors ask for more than the cluster has in all.

    `available` is `ray.cluster_resources()` ({"CPU": 16.0, "GPU": 8.0, ...}; a missing key means 0). Pure:
    no Ray call, so it runs before Ray starts. It sums per-actor × count over the roles (resources.<role>_gpus ×
    resources.num_<role>s, ...) for GPUs and CPUs; whether each role fits on the nodes is
    `selfplay.placement.check_placement`'s.
    """
    problems: list[str] = []
    demand = resource_demand(cfg)
    for kind, unit in (("GPU", "GPU(s)"), ("CPU", "CPU(s)")):
        terms = [(key, per, n) for key, per, n in demand[kind] if per * n > 0]
        need = sum(per * n for _, per, n in terms)
        have = float(available.get(kind, 0.0) or 0.0)
        if need > have + 1e-6:
            parts = " + ".join(f"{key} × {_count_key(key)} ({per:g} × {n} = {per * n:g})" for key, per, n in terms)
            problems.append(f"{parts} = {need:g} {unit}, but the cluster has {have:g} {unit}")
    fix = "lower the resources.* counts or per-actor amounts (or --set them), or add nodes"
    if len(problems) == 1:
        raise ConfigError(f"the configured actors do not fit on this Ray cluster: {problems[0]}; {fix}")
    if problems:
        raise ConfigError("the configured actors do not fit on this Ray cluster:\n  " + "\n  ".join(problems)
                          + f"\n  {fix}")


def _count_key(per_actor_key: str) -> str:
    role = per_actor_key.split(".")[1].rsplit("_", 1)[0]
    return "resources." + dict(_ROLES)[role]
