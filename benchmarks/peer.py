"""Peer comparison against TRL: our pipeline and TRL's online DPO trainer on the same tiny initial policy, the same
sort-task prompts and the same rule judge, measured in one run.

    python -m benchmarks.peer            # the demo's settings (300 steps of 32 pairs); prints one JSON line
    python -m benchmarks.peer --quick    # the demo's --quick settings, 60 steps of 16 pairs instead of 12
    pip install -e ".[bench]"            # TRL; without it the benchmark prints {"skipped": ...}

What runs, in this order:
1. Ours: `Driver(demo_config("sppo", mode)).run()` on a local Ray cluster — it warms the tiny model up into
   `initial_policy/` (the weak starting policy), then runs `train.steps` learner steps (generator, judge, replay
   shard and learner actors) and plays the final policy against the initial one on the held-out prompts.
2. TRL: `trl.experimental.online_dpo.OnlineDPOTrainer` starts from the same `initial_policy/` weights, trains on
   the same training prompts with the same judge (through `PairwiseJudgeReward`) until the time budget is spent,
   and its final policy is evaluated exactly as ours (same held-out prompts, judge, greedy decoding, seed).

The wall-time budget, precisely: the `time` of our last learner step in `metrics.jsonl` — seconds from the start
of the driver's training loop (every actor built and its model loaded) to the end of step N. It therefore
excludes Ray start-up, the warm-up, actor and model start-up, the final checkpoint and the evaluation (intermediate
evaluations are switched off with `eval.every=0` so none falls inside the loop). TRL gets the same seconds: the
clock starts at the Trainer's `on_train_begin` (model, reference copy, optimizer and data loader already built) and
`BudgetStop` ends training at the first step that ends with the budget spent, so TRL overshoots by less than one
step; its actual seconds are reported. Neither system's model loading nor evaluation is inside its seconds.

Pairs trained per second = preference pairs that went into optimizer steps / those seconds (ours: replay rows
trained on; TRL: one pair per prompt, `per_device_train_batch_size` per step).

What is matched: initial weights, tokenizer and chat template, training prompts, held-out prompts, judge (the
task's rule judge with its temperature), learning rate, β, pairs per optimizer step, max_new_tokens, sampling
temperature and top_p, AdamW without weight decay, gradient clipping, a constant learning rate, fp32 on CPU.
What differs by design: ours runs SPPO (K samples per prompt → K×K judge matrix → Hedge targets, square loss,
reference refreshed every `sppo.iterations`-th of the steps) with generation, judging and training in separate
actors that overlap in async mode; TRL's online DPO samples 2 completions per prompt with the policy being trained,
in-process and in lock-step (generate → reward → DPO sigmoid loss against a fixed reference), and it trains on
tied pairs too (our recipe drops groups whose K samples all tie). TRL runs with `torch.set_num_threads(1)`
(`--trl-threads`), like each of our one-CPU actors; ours may keep both cores busy when generator and learner overlap.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from selfplay.demo import demo_config

SKIPPED = {"skipped": "pip install -e .[bench]"}
# --quick: the demo's quick settings run 12 steps (~4 s of training), too short for TRL to take more than a few
# steps; 60 keeps the whole run near a minute
QUICK_STEPS = 60
BUDGET = ("our training-loop seconds for all steps (metrics.jsonl `time` of the last step: actors and models already "
          "up, no evaluation inside); TRL: from on_train_begin, stopped at the first step that ends past it")


def _log(message: str) -> None:
    """Progress goes to stderr: stdout carries only the JSON line."""
    print(message, file=sys.stderr, flush=True)


# -- the judge as TRL 1.16 wants it ------------------------------------------------------------------------------


def _text(message) -> str:
    """The plain text of a TRL prompt or completion: a string, or a conversation whose last message counts."""
    if isinstance(message, str):
        return message
    return message[-1]["content"]


class PairwiseJudgeReward:
    """Our pairwise judge as a TRL reward function.

    TRL 1.16's online DPO has no judge argument any more, only `reward_funcs`. It calls them once per step with
    `prompts = 2 * batch` and the two completions of prompt i at positions i and i + n, then takes the first as
    chosen where reward[i] >= reward[i + n]. Returning P(a ≻ b) for the first and P(b ≻ a) = 1 − P(a ≻ b) for
    the second makes TRL pick exactly the completion our judge prefers, from one `compare` call per step, and
    a tie (P = ½) gives equal rewards, as the judge meant.
    """

    __name__ = "selfplay_judge"  # TRL names reward functions in its logs by __name__

    def __init__(self, judge):
        self.judge = judge
        self.pairs = 0
        self.ties = 0  # pairs the judge could not tell apart (TRL still trains on them)

    def __call__(self, prompts, completions, **_: Any) -> list[float]:
        n = len(prompts) // 2
        texts = [_text(p) for p in prompts]
        if len(prompts) != 2 * n or len(completions) != len(prompts) or texts[:n] != texts[n:]:
            raise ValueError("expected TRL's online DPO layout: the batch's prompts twice, two completions each")
        a = [_text(c) for c in completions[:n]]
        b = [_text(c) for c in completions[n:]]
        p = self.judge.compare(texts[:n], a, b).double().tolist()
        self.pairs += n
        self.ties += sum(1 for x in p if x == 0.5)
        return p + [1.0 - x for x in p]


# -- TRL's run under the time budget -----------------------------------------------------------------------------


def budget_stop(seconds: float):
    """A TrainerCallback that ends training at the first step that ends with `seconds` spent since train begin."""
    from transformers import TrainerCallback

    class BudgetStop(TrainerCallback):
        def __init__(self):
            self.start = self.elapsed = None
            self.steps = 0

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.steps = state.global_step
            self.elapsed = time.perf_counter() - self.start
            if self.elapsed >= seconds:
                control.should_training_stop = True

    return BudgetStop()


def trl_config(cfg, out_dir: Path):
    """OnlineDPOConfig with our run's settings (see the module docstring for what is matched)."""
    from trl.experimental.online_dpo import OnlineDPOConfig

    return OnlineDPOConfig(
        output_dir=str(out_dir),
        per_device_train_batch_size=cfg.train.batch_size,  # prompts per step = pairs per step
        gradient_accumulation_steps=1,
        learning_rate=cfg.train.lr,
        lr_scheduler_type="constant",  # our learner's rate is constant; TRL's default decays with max_steps
        warmup_steps=0,
        weight_decay=cfg.train.weight_decay,
        max_grad_norm=cfg.train.grad_clip,
        max_steps=1_000_000,  # never reached: BudgetStop ends training
        beta=cfg.sppo.beta,
        loss_type="sigmoid",
        max_new_tokens=cfg.generation.max_new_tokens,
        temperature=cfg.generation.temperature,
        top_p=cfg.generation.top_p,
        top_k=0,
        seed=cfg.seed,
        use_cpu=True,
        bf16=False,
        fp16=False,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_drop_last=True,  # every step a full batch, as our learner's (2000 prompts are not a multiple)
    )


def run_trl(cfg, initial_policy: str, train_prompts, judge, budget_s: float, threads: int,
            out_dir: Path) -> tuple[Any, dict[str, Any]]:
    """Train TRL's online DPO from the initial policy for `budget_s` seconds; return the model and its figures."""
    from datasets import Dataset
    from trl.experimental.online_dpo import OnlineDPOTrainer

    from selfplay.models import load_causal_lm, load_tokenizer

    tok = load_tokenizer(initial_policy, cfg.model.trust_remote_code)
    model = load_causal_lm(initial_policy, cfg.model.dtype, cfg.model.trust_remote_code, tok)
    # conversational prompts: TRL applies the tokenizer's chat template itself (the same string as chat_prompt)
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": p.text}]} for p in train_prompts])
    reward, stop = PairwiseJudgeReward(judge), budget_stop(budget_s)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        trainer = OnlineDPOTrainer(model=model, reward_funcs=reward, args=trl_config(cfg, out_dir),
                                   train_dataset=data, processing_class=tok, callbacks=[stop])
        trainer.train()
    finally:
        torch.set_num_threads(previous)
    pairs = reward.pairs  # TRL calls the reward once per step, on exactly the pairs that step trains on
    figures = {
        "steps": stop.steps, "pairs_trained": pairs, "seconds": round(stop.elapsed, 2),
        "pairs_per_s": round(pairs / stop.elapsed, 2),
        "pairs_judged": reward.pairs,  # every TRL pair is fresh: generated, judged and trained on once
        "responses_generated": 2 * reward.pairs, "tied_pairs": reward.ties,
        "torch_threads": threads,
    }
    return trainer.accelerator.unwrap_model(trainer.model).eval(), figures


# -- ours ----------------------------------------------------------------------------------------------------------


def run_ours(cfg, out_dir: Path) -> tuple[dict[str, Any], float]:
    """The whole pipeline on a local Ray cluster of our own; returns its summary and its training-loop seconds."""
    import ray

    from actors.driver import Driver

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, namespace="selfplay-peer-bench")
    try:
        summary = Driver(cfg, out_dir, log=_log).run()
    finally:
        ray.shutdown()  # only the cluster this process started: TRL then has the cores to itself
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line]
    return summary, float(records[-1]["time"])


# -- the benchmark -------------------------------------------------------------------------------------------------


def run(quick: bool = False, mode: str = "async", trl_threads: int = 1, seed: int = 0) -> dict[str, Any]:
    if importlib.util.find_spec("trl") is None:
        return dict(SKIPPED)
    from actors.driver import Driver
    from selfplay.evaluate import against_initial
    from selfplay.judges import make_judge

    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # we import trl.experimental on purpose
    t0, load_before = time.perf_counter(), os.getloadavg()[0]
    workdir = Path(tempfile.mkdtemp(prefix="bench-peer-"))
    # eval.every=0: no evaluation inside our training loop, so the budget is training time only
    extra = [f"seed={seed}", f"out_dir={workdir / 'ours'}", "eval.every=0"] + (
        [f"train.steps={QUICK_STEPS}"] if quick else [])
    cfg = demo_config("sppo", mode, quick=quick, extra=extra)

    with contextlib.redirect_stdout(sys.stderr):  # Ray, the driver and TRL print progress; stdout is for JSON
        _log(f"[peer] ours: SPPO {mode}, {cfg.train.steps} steps of {cfg.train.batch_size} pairs")
        summary, budget = run_ours(cfg, workdir / "ours")
        initial_policy = str(workdir / "ours" / "initial_policy")
        # the prompts and task exactly as the driver drew them
        train_prompts, eval_prompts, task = Driver(cfg, workdir / "unused", log=_log)._prompts()
        judge = make_judge(cfg.judge, cfg.task)
        _log(f"[peer] TRL online DPO for the same {budget:.1f}s of training")
        model, trl = run_trl(cfg, initial_policy, train_prompts, judge, budget, trl_threads, workdir / "trl")
        result = against_initial(cfg, model, initial_policy, eval_prompts, judge, task)  # as the driver does

    ours = {
        "system": f"selfplay SPPO ({mode}, Ray actors: 1 generator, 1 judge, 1 replay shard, 1 DeepSpeed learner)",
        "steps": summary["learner_steps"], "pairs_trained": summary["samples_trained"],
        "seconds": round(budget, 2), "pairs_per_s": round(summary["samples_trained"] / budget, 2),
        # replay rows can be sampled more than once: rows_added is how many distinct pairs were judged
        "pairs_judged": summary["rows_added"], "responses_generated": summary["samples_generated"],
        "skipped_tied_groups": summary["skipped_ties"],
        "winrate_vs_initial": round(summary["winrate_vs_initial"], 4),
        "winrate_stderr": round(summary["winrate_stderr"], 4), "task_score": round(summary["task_score"], 4),
    }
    trl.update({
        "system": f"TRL {_version('trl')} OnlineDPOTrainer (in-process, sync, 2 completions per prompt)",
        "winrate_vs_initial": round(result["winrate"], 4), "winrate_stderr": round(result["stderr"], 4),
        "task_score": round(result["task_score_a"], 4),
    })
    out = {
        "benchmark": "peer", "command": "python -m benchmarks.peer" + (" --quick" if quick else "")
        + (f" --mode {mode}" if mode != "async" else "") + (f" --trl-threads {trl_threads}" if trl_threads != 1 else "")
        + (f" --seed {seed}" if seed else ""), "seed": seed,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, "
                   f"Python {platform.python_version()}",
        "model": "tiny (0.44M params), warmed up", "task": "sort", "judge": f"rule (temperature {cfg.judge.temperature})",
        "budget_seconds": round(budget, 2), "budget": BUDGET,
        "settings": {"lr": cfg.train.lr, "beta": cfg.sppo.beta, "pairs_per_step": cfg.train.batch_size,
                     "max_new_tokens": cfg.generation.max_new_tokens, "temperature": cfg.generation.temperature,
                     "top_p": cfg.generation.top_p, "ours_k": cfg.sppo.k, "trl_k": 2},
        "eval_prompts": result["n"], "initial_task_score": round(summary["initial_task_score"], 4),
        "ours": ours, "trl": trl,
        "versions": {name: _version(name) for name in ("trl", "transformers", "torch", "ray")},
        "seconds": round(time.perf_counter() - t0, 1),
        # the machine is shared: the 1-minute load average before and after says how busy it was besides us
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    return out


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the demo's --quick settings (12 steps)")
    parser.add_argument("--mode", choices=("async", "sync"), default="async", help="our pipeline's mode")
    parser.add_argument("--trl-threads", type=int, default=1, help="torch threads for TRL's trainer (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="the demo's seed: warm-up, prompts, sampling (default 0)")
    args = parser.parse_args(argv)
    out = run(quick=args.quick, mode=args.mode, trl_threads=args.trl_threads, seed=args.seed)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
