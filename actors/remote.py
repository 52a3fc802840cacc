"""Remote calls with deadlines: every wait on an actor is bounded and a failure names the actor."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import ray


def get_all(refs: Mapping[Any, ray.ObjectRef], timeout_s: float, what: str, role: str) -> dict[Any, Any]:
    """ray.get every ref within one shared deadline. Errors name the actor as "<role> <key>"."""
    deadline = time.monotonic() + timeout_s
    out = {}
    for key, ref in refs.items():
        try:
            out[key] = ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
        except ray.exceptions.GetTimeoutError:
            raise TimeoutError(f"{role} {key}: {what} did not finish within {timeout_s:.0f}s") from None
        except ray.exceptions.RayActorError as e:
            raise RuntimeError(f"{role} {key}: actor died during {what}: {e}") from e
        except ray.exceptions.RayTaskError as e:
            cause = e.cause if e.cause is not None else e
            if _plain(cause):  # same type, message prefixed with the actor it came from
                raise type(cause)(f"{role} {key}: {what} failed: {cause}") from e
            raise cause from e
    return out


def _plain(exc: BaseException) -> bool:
    """Exceptions that can be rebuilt from a message (the common built-in ones)."""
    return type(exc).__module__ == "builtins"
