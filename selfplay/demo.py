"""The embedded demo: settings that make self-play visibly improve the tiny model on the sort task within a
few minutes on 2 CPU cores. Paper-scale settings live in configs/ (and the dataclass defaults)."""

from __future__ import annotations

from selfplay.config import Config, load_config

# shared by all three algorithms: a small, fast loop on the tiny model
COMMON = [
    "out_dir=runs/demo",
    "generation.temperature=1.0",
    "generation.top_p=1.0",
    "generation.prompts_per_request=32",
    "train.lr=2e-4",
    "train.batch_size=32",
    "train.steps=300",
    "replay.capacity=64",  # about two steps of rows: close to on-policy, as in the papers
    "eval.prompts=200",
    "eval.every=100",
    "logging.log_every=20",
    "resources.generator_cpus=0.5",
    "resources.learner_cpus=0.5",
    "resources.judge_cpus=0.25",
    "resources.replay_cpus=0.25",
]
ALGORITHM = {
    "sppo": ["sppo.k=8", "sppo.beta=0.1", "sppo.iterations=5"],
    # ORPO (the paper's alternative to DPO): DPO alone lowers both likelihoods on this tiny model
    "sapo": ["sapo.loss=orpo", "sapo.segment_len=6", "sapo.ema_alpha=0.5", "sapo.ema_every=2",
             "replay.sampling=least_sampled"],
    "srpo": ["srpo.k=4", "srpo.beta=0.1", "srpo.alpha=0.5", "srpo.revisions=1"],
}
# async mode: a buffer of one round (32 prompts: ≤ 32 rows) — each step trains its own round's rows, one version
# old (the bounded schedule makes step n's round with θ_{n-1}), topped up from the round before when ties leave it
# short — instead of a 64-row window of rows one and two versions old. Measured ahead of the window (SPPO at equal
# wall time; SAPO at step 300 in each of 3 seeds: docs/benchmarks.md, "Time to quality"). Not a queue (max_reuse 1):
# a round short by one tie would then stall the learner until the next round is made
ASYNC = {algorithm: ["replay.capacity=32"] for algorithm in ("sppo", "sapo", "srpo")}
# pairs per forward pass, sorted by length (train.micro_batch_size: gradients accumulate to the same step): less
# padding. Learner busy time over the sync demo, against the whole batch in one pass: SPPO −14 %, SAPO −18 % (16
# pairs), SRPO −40 % (8 pairs: its revisions vary most in length). docs/benchmarks.md, "Time to quality"
MICRO_BATCH = {"sppo": 16, "sapo": 16, "srpo": 8}
# with model.lora.rank set (and no train.lr of the user's): LoRA's usual ~10× the full model's learning rate; with
# it, rank 8 reached 0.668 ± 0.021 vs initial in 300 SPPO steps (README)
LORA_LR = "train.lr=2e-3"
QUICK = ["train.steps=12", "train.batch_size=16", "generation.prompts_per_request=16", "sppo.k=4",
         "eval.prompts=40", "eval.every=0", "warmup.steps=30", "logging.log_every=4"]


def demo_overrides(algorithm: str = "sppo", mode: str = "sync", quick: bool = False) -> list[str]:
    if algorithm not in ALGORITHM:
        raise ValueError(f"unknown algorithm {algorithm!r}; use one of {sorted(ALGORITHM)}")
    return [f"algorithm={algorithm}", f"mode={mode}", *COMMON, *ALGORITHM[algorithm],
            *(ASYNC[algorithm] if mode == "async" else []), *(QUICK if quick else [])]


def demo_config(algorithm: str = "sppo", mode: str = "sync", quick: bool = False, extra: list[str] = ()) -> Config:
    """The demo's config with the user's `extra` overrides. Two demo settings follow from what the user set: LoRA's
    learning rate, and the micro-batch, which is left out where it does not divide a learner's share of the batch
    (a batch size or learner count of the user's) — it only makes the step faster."""
    cfg = load_config(None, [*demo_overrides(algorithm, mode, quick), *extra])
    derived = []
    if cfg.model.lora.rank and not _sets("train.lr", extra):
        derived.append(LORA_LR)
    share = cfg.train.batch_size // max(cfg.resources.num_learners, 1)
    if not _sets("train.micro_batch_size", extra) and share % MICRO_BATCH[algorithm] == 0:
        derived.append(f"train.micro_batch_size={MICRO_BATCH[algorithm]}")
    return load_config(None, [*demo_overrides(algorithm, mode, quick), *derived, *extra]) if derived else cfg


def _sets(key: str, extra: list[str]) -> bool:
    return any(e.strip().startswith(f"{key}=") for e in extra)
