"""Supervised warm-up and task evaluation: turn the random tiny model into a weak but non-trivial policy.

Self-play needs a starting policy whose samples differ in quality; a short SFT on reference answers gives one.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path

import torch

from selfplay.generation import generate
from selfplay.logprobs import build_batch, response_logprobs
from selfplay.tasks import Prompt, Task, chat_prompt


def encode_pairs(tokenizer, prompts: list[Prompt], responses: list[str]) -> dict[str, torch.Tensor]:
    """Chat-formatted prompt tokens + response tokens ending in EOS, as a right-padded training batch."""
    prompt_ids = [tokenizer(chat_prompt(tokenizer, p), add_special_tokens=False)["input_ids"] for p in prompts]
    response_ids = [tokenizer(r + tokenizer.eos_token, add_special_tokens=False)["input_ids"] for r in responses]
    return build_batch(prompt_ids, response_ids, tokenizer.pad_token_id, padding_side="right")


def supervised_warmup(
    model,
    tokenizer,
    prompts: list[Prompt],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int = 0,
    log: Callable[[str], None] | None = print,
    log_every: int = 25,
) -> list[float]:
    """Fit reference answers with token-mean NLL on the response only; returns the loss per step."""
    missing = [p.prompt_id for p in prompts if p.reference is None]
    if missing:
        raise ValueError(f"warm-up needs reference answers; {len(missing)} prompts have none (e.g. {missing[0]})")
    rng = random.Random(seed)
    optim = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: min(1.0, (s + 1) / 10))  # short warm-up of lr
    model.train()
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(1, steps + 1):
        batch_prompts = rng.sample(prompts, min(batch_size, len(prompts)))
        batch = encode_pairs(tokenizer, batch_prompts, [p.reference for p in batch_prompts])
        logp, ntok = response_logprobs(model, batch)
        loss = -logp.sum() / ntok.sum()
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        schedule.step()
        losses.append(loss.item())
        if log and (step % log_every == 0 or step == steps):
            log(f"warm-up step {step}/{steps}  loss {loss.item():.3f}  {step / (time.perf_counter() - start):.1f} steps/s")
    model.eval()
    return losses


def evaluate_task(
    model, tokenizer, task: Task, prompts: list[Prompt], *, max_new_tokens: int = 24, temperature: float = 0.0,
    seed: int = 0,
) -> dict[str, float]:
    """Mean task score and exact-answer rate of the policy's answers (greedy unless a temperature is given)."""
    texts = [chat_prompt(tokenizer, p) for p in prompts]
    completions = generate(model, tokenizer, texts, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    scores = [task.score(p.text, c[0].text) for p, c in zip(prompts, completions)]
    return {
        "score": sum(scores) / len(scores),
        "exact": sum(s == 1.0 for s in scores) / len(scores),
        "n": float(len(scores)),
    }


def initial_policy(cfg, prompts: list[Prompt], out_dir: Path, log: Callable[[str], None] = print) -> str:
    """The run's initial policy: the tiny model is warmed up on `prompts` into a weak one and saved under
    `out_dir/initial_policy`; any other model starts as it is."""
    if cfg.model.policy != "tiny":
        return cfg.model.policy
    from selfplay.models import load_policy_and_tokenizer, save_pretrained

    torch.manual_seed(cfg.seed)
    model, tok = load_policy_and_tokenizer(cfg.model, cfg.seed)
    if cfg.warmup.steps:
        supervised_warmup(model, tok, prompts, steps=cfg.warmup.steps, batch_size=cfg.warmup.batch_size,
                          lr=cfg.warmup.lr, seed=cfg.seed, log=log, log_every=max(1, cfg.warmup.steps // 2))
    return str(save_pretrained(model, tok, Path(out_dir) / "initial_policy"))
