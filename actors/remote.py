"""Remote calls with deadlines: every wait on an actor is bounded and a failure names the actor."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import ray


class ActorDiedError(RuntimeError):
    """An actor died during a call. `key` says which one, so a caller whose actors restart can recover it."""

    def __init__(self, message: str, key: Any, role: str = ""):
        super().__init__(message)
        self.key, self.role = key, role


class ActorRestarted(RuntimeError):
    """Raised by a restarted actor until it has been recovered (a generator until it has the current weights,
    a replay shard until its rows are back): serving before that would be stale or lose data silently."""


def restarted() -> bool:
    """Inside an actor: whether this incarnation is a restart by Ray."""
    return ray.get_runtime_context().was_current_actor_reconstructed


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def peak_rss_mb() -> float:
    """Inside an actor: the most resident memory its process has held (since it started or its last
    `reset_peak_rss`), in MiB."""
    return _status_mb("VmHWM")


def rss_mb() -> float:
    """The resident memory of this process now, in MiB."""
    return _status_mb("VmRSS")


def reset_peak_rss() -> None:
    """Start `peak_rss_mb` over from the memory held now (Linux: VmHWM := VmRSS)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


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
            raise ActorDiedError(f"{role} {key}: actor died during {what}: {e}", key, role) from e
        except ray.exceptions.RayTaskError as e:
            cause = e.cause if e.cause is not None else e
            if isinstance(cause, ActorRestarted):  # died while idle: recovered like a death during the call
                raise ActorDiedError(f"{role} {key}: {cause}", key, role) from e
            if _plain(cause):  # same type, message prefixed with the actor it came from
                raise type(cause)(f"{role} {key}: {what} failed: {cause}") from e
            raise cause from e
    return out


def dead_actors(refs: Mapping[Any, ray.ObjectRef], timeout_s: float) -> list[Any]:
    """After a collective call failed: let every call settle (within `timeout_s`) and return the keys of those
    whose actor died. A member that dies fails its peers with a transport error; this names the member."""
    ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
    dead = []
    for key, ref in refs.items():
        try:
            ray.get(ref, timeout=0)
        except ray.exceptions.RayActorError:
            dead.append(key)
        except Exception:  # noqa: BLE001 — a live actor's failure (or one not yet settled): not a death
            pass
    return dead


def _plain(exc: BaseException) -> bool:
    """Exceptions that can be rebuilt from a message (the common built-in ones)."""
    return type(exc).__module__ == "builtins"


def wait_restarted(handle, timeout_s: float, role: str, key: Any) -> Any:
    """Block until a restarting actor answers again and return its `stats()`. Calls to an actor Ray is still
    restarting fail at once as unavailable; an actor that will not come back raises ActorDiedError."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return ray.get(handle.stats.remote(), timeout=max(0.0, deadline - time.monotonic()))
        except ray.exceptions.ActorUnavailableError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{role} {key}: not back within {timeout_s:.0f}s of its restart") from None
            time.sleep(0.2)
        except ray.exceptions.GetTimeoutError:
            raise TimeoutError(f"{role} {key}: not back within {timeout_s:.0f}s of its restart") from None
        except ray.exceptions.RayActorError as e:
            raise ActorDiedError(f"{role} {key}: died and was not restarted: {e}", key, role) from e


def recover(handle, role: str, key: Any, restore: Callable[[], Any], timeout_s: float) -> bool:
    """The one recovery rule for generators, judges and replay shards: actor `key` died and Ray restarts it.
    Wait until it answers, run `restore()` (the newest weights, its rows, …) on the process that says
    `awaiting_restore`, and return True: the caller counts one restart. `ray.kill` and crashes are asynchronous:
    the dying process may still answer for a moment (False: the caller's call fails again and it comes back
    here), and the new one may die during its restore (then it is waited for again, within `timeout_s`)."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = wait_restarted(handle, max(1.0, deadline - time.monotonic()), role, key)
        if not stats["awaiting_restore"]:  # not restarted, or the old process not yet gone
            return False
        try:
            restore()
            return True
        except ActorDiedError:  # died again during its restore: Ray restarts it once more (or gives up)
            if time.monotonic() > deadline:
                raise
