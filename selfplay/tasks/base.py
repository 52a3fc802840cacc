"""What every prompt source and task shares: the Prompt record and chat formatting."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class Prompt:
    prompt_id: str
    text: str  # the user message (or a full chat in `messages`)
    reference: str | None = None  # a known good answer (SAPO's chosen; warm-up target), when there is one
    messages: tuple[dict[str, str], ...] | None = None  # a multi-turn chat, when the source had one


def make_prompt_id(text: str) -> str:
    """Stable id from the prompt text: the replay buffer routes rows by it, so it must not depend on order."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


class Task(Protocol):
    """A verifiable task: it makes prompts and scores responses in [0, 1] without a learned judge."""

    name: str

    def prompts(self, split: str, n: int, seed: int = 0) -> list[Prompt]: ...

    def reference(self, prompt_text: str) -> str: ...

    def score(self, prompt_text: str, response: str) -> float: ...


def chat_prompt(tokenizer: Any, prompt: Prompt | str, system: str | None = None) -> str:
    """Render a prompt with the tokenizer's chat template, ready for the assistant's answer."""
    if isinstance(prompt, Prompt) and prompt.messages:
        messages = [dict(m) for m in prompt.messages]
    else:
        text = prompt.text if isinstance(prompt, Prompt) else prompt
        messages = [{"role": "user", "content": text}]
    if system:
        messages.insert(0, {"role": "system", "content": system})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def response_text(value: Any) -> str:
    """A candidate as text: None (a generator that returned nothing) is the empty response."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    raise ValueError(f"a candidate must be a string, got {type(value).__name__}")
