"""Weight synchronization, learner rank 0 → generators (docs/architecture.md, "Weight sync, step by step").

Two transports, one protocol, both streamed: the learners gather one bucket of parameters at a time (ZeRO-3
included: every rank takes part in each gather), rank 0 fills it and sends it, then gathers the next; each
generator checks the manifest against its model before anything moves, then loads each bucket into its engine as
it arrives, after that bucket's checksum. Neither side holds more than about two buckets beside its model.

- `object_store` (default, works everywhere): each bucket is `ray.put` as it is filled and every generator pulls
  them in order (the object store holds the version until the generators have loaded it).
- `collective`: a broadcast group of rank 0 + all generators, outside the learners' own process group (gloo on
  CPU, NCCL on GPU, where buckets go from GPU memory to GPU memory). A header (version, manifest, bucket sizes)
  goes first, then each bucket and its checksum; one bucket is on the wire while the learners gather the next.
  The publish returns once every generator has received the last bucket, so generators receive at push time.

`async` mode does not wait for the generators' acknowledgements (the learners' next step is queued behind the
publish); `sync` mode waits for every one. Every wait has a deadline and names the generator.

A restarted generator gets the newest weights before it serves again (`restore_generator`): the last object-store
version, or — a broadcast group cannot take a new member — a new group for every member and a new version for
every generator (`_rejoin`). A member that dies mid-broadcast fails it for the others at once: rank 0 closes the
group when a send fails, and every pending broadcast is settled before the new group opens.
"""

from __future__ import annotations

import collections
import datetime
import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import ray
import torch

from actors.remote import ActorDiedError, dead_actors, get_all, recover
from selfplay.weights import WeightSyncError, bucket_sizes, checksum_tensor, verified


class BroadcastChannel:
    """A broadcast group (rank 0 sends) built from a TCP store, independent of any default process group."""

    IN_FLIGHT = 2  # buckets posted at once: one on the wire while the next is filled (sender) or loaded (receiver)

    def __init__(self, host: str, port: int, rank: int, size: int, name: str = "weights", timeout_s: float = 300.0,
                 backend: str = "gloo"):
        import torch.distributed as dist

        timeout = datetime.timedelta(seconds=timeout_s)
        self.store = dist.TCPStore(host, port, size, rank == 0, timeout=timeout)
        prefixed = dist.PrefixStore(name, self.store)
        if backend == "nccl":
            self.group = dist.ProcessGroupNCCL(prefixed, rank, size)
            self.device = torch.device("cuda")
        else:
            self.group = dist.ProcessGroupGloo(prefixed, rank, size, timeout)
            self.device = torch.device("cpu")
        self.rank, self.size = rank, size

    def _post(self, *tensors: torch.Tensor) -> list:
        """Start broadcasting `tensors` (on this channel's device) from rank 0; the works to wait on."""
        if self.group is None:
            raise WeightSyncError("this weight broadcast group was closed; a new one must be opened")
        try:
            return [self.group.broadcast(t, 0) for t in tensors]
        except RuntimeError as e:
            raise WeightSyncError(f"weight broadcast failed: {e}") from None

    @staticmethod
    def _wait(works: list) -> None:
        """A member that died (or closed the group) fails every wait on it: WeightSyncError, not a hang."""
        try:
            for work in works:
                work.wait()
        except RuntimeError as e:
            raise WeightSyncError(f"weight broadcast failed: {e}") from None

    def close(self) -> None:
        """Drop the group: its connections close, so a member still waiting on it fails at once."""
        self.group = self.store = None

    def _header(self, header: dict | None = None) -> dict:
        """Send (rank 0) or receive the JSON header, whole, before any bucket."""
        data = json.dumps(header).encode() if self.rank == 0 else b""
        length = torch.tensor([len(data)], dtype=torch.int64, device=self.device)
        self._wait(self._post(length))
        raw = (torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self.device) if self.rank == 0
               else torch.empty(int(length.item()), dtype=torch.uint8, device=self.device))
        self._wait(self._post(raw))
        return header if self.rank == 0 else json.loads(bytes(raw.cpu().numpy()))

    def send(self, version: int, manifest: list[dict], buckets: Iterable[torch.Tensor]) -> int:
        """Header, then each bucket of `buckets` (filled lazily, in manifest order) with its checksum. Returns the
        bytes sent, once every receiver has the last bucket."""
        sizes = bucket_sizes(manifest)
        self._header({"version": version, "manifest": manifest, "sizes": sizes})
        in_flight: collections.deque = collections.deque()  # (tensors kept alive, works)
        sent = 0
        for bucket in buckets:
            bucket = bucket.to(self.device)
            tensors = (bucket, checksum_tensor(bucket))
            in_flight.append((tensors, self._post(*tensors)))
            sent += bucket.numel()
            while len(in_flight) >= self.IN_FLIGHT:  # the previous bucket is delivered before the next is filled
                self._wait(in_flight.popleft()[1])
        for _, works in in_flight:
            self._wait(works)
        if sent != sum(sizes):
            raise WeightSyncError(f"sent {sent} bytes of weights, the manifest announced {sum(sizes)}")
        return sent

    def receive(self, reuse_buffers: bool = False) -> tuple[int, list[dict], list[int], Iterator[torch.Tensor]]:
        """The header's (version, manifest, bucket sizes) and an iterator of verified buckets. The iterator posts
        the next bucket's receive before it yields one; closed early (a refused update), it still receives and
        drops the rest, so the group stays in step with the sender. `reuse_buffers`: buckets take turns in
        IN_FLIGHT buffers (on a CPU, fresh memory costs a page fault per 4 KiB: half the time of a push), for a
        consumer that has copied every tensor of a bucket before it draws the next; otherwise each bucket is new
        memory that lives as long as views of it do (vLLM keeps a layer's tensors until the layer is complete)."""
        header = self._header()
        buckets = self._buckets(header["sizes"], reuse_buffers)
        next(buckets)  # started: closed from here on, even before its first bucket is drawn, it drains the rest
        return header["version"], header["manifest"], header["sizes"], buckets

    def _buckets(self, sizes: list[int], reuse_buffers: bool) -> Iterator[torch.Tensor | None]:
        posted: collections.deque = collections.deque()
        pool = [torch.empty(max(sizes, default=0), dtype=torch.uint8, device=self.device)
                for _ in range(self.IN_FLIGHT if reuse_buffers else 0)]

        def post(i: int) -> None:
            bucket = pool[i % len(pool)][: sizes[i]] if pool else torch.empty(sizes[i], dtype=torch.uint8,
                                                                              device=self.device)
            check = torch.zeros(1, dtype=torch.int64, device=self.device)
            posted.append((i, bucket, check, self._post(bucket, check)))

        following = 0
        try:
            yield None  # the priming step of `receive`
            while posted or following < len(sizes):
                while len(posted) < self.IN_FLIGHT and following < len(sizes):
                    post(following)
                    following += 1
                i, bucket, check, works = posted.popleft()
                self._wait(works)
                yield verified(i, bucket, int(check.item()))
        finally:  # the sender goes on to the end: receive what is left (one bucket at a time) and drop it
            try:
                for i in range(following, len(sizes) + 1):
                    for *_, works in posted:
                        self._wait(works)
                    posted.clear()
                    if i < len(sizes):
                        post(i)
            except WeightSyncError:
                pass  # the group broke: there is nothing left to stay in step with


@dataclass
class Push:
    version: int
    started: float
    publishing: list | None = None  # the learners' publish calls, until rank 0's has returned
    acks: dict[int, ray.ObjectRef] = field(default_factory=dict)  # generator i → its load call
    nbytes: int = 0


class WeightSync:
    """Driver-side: push the learners' weights to generators by object store or broadcast, sync or async.

    A push never blocks the driver in async mode: the publish call is queued on the learners (behind any step
    already queued there) and the generators' loads are sent by `poll`/`wait` once it has returned.
    """

    def __init__(self, learners, generators: list, *, transport: str = "object_store", mode: str = "async",
                 bucket_bytes: int = 64 << 20, timeout_s: float = 300.0, which: str = "policy"):
        if transport not in ("object_store", "collective"):
            raise ValueError(f"unknown weight transport {transport!r}; use object_store or collective")
        if mode not in ("sync", "async"):
            raise ValueError(f"unknown sync mode {mode!r}; use sync or async")
        self.learners, self.generators = learners, list(generators)
        self.transport, self.mode, self.which = transport, mode, which
        self.bucket_bytes, self.timeout_s = bucket_bytes, timeout_s
        self.pending: list[Push] = []
        self.latencies: list[float] = []  # publish → last generator acknowledged, seconds
        # the newest version asked of the learners (rank 0 counts the same way; a resumed learner starts above 0)
        self.latest_version = get_all({0: learners.actors[0].get_version.remote()}, timeout_s, "version", "learner")[0]
        self.generator_versions = {i: 0 for i in range(len(self.generators))}  # fresh generators: initial weights
        # the newest version whose load has been sent to generator i: requests sent after it are served with it
        self.sent_versions = dict(self.generator_versions)
        self.last_published: dict | None = None  # the newest object-store update: a restarted generator loads it
        # generator i died during a weight load: the driver recovers it (and counts it); standalone, just recover
        self.on_generator_died = lambda i: recover(self.generators[i], "generator", i,
                                                   lambda: self.restore_generator(i), self.timeout_s)
        if transport == "collective":
            self._open_channel()

    def _open_channel(self) -> None:
        rank0 = self.learners.actors[0]
        host, port = ray.get(rank0.address.remote(), timeout=self.timeout_s)
        size = 1 + len(self.generators)
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        refs = {"learner 0": rank0.open_channel.remote(host, port, 0, size, backend, self.timeout_s)}
        for i, g in enumerate(self.generators):
            refs[f"generator {i}"] = g.open_channel.remote(host, port, i + 1, size, backend, self.timeout_s)
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=self.timeout_s)
        missing = [who for who, ref in refs.items() if ref not in ready]
        if missing:  # every generator must reach learner rank 0 over TCP (another node, a firewall, a dead actor)
            raise WeightSyncError(f"weight_sync.transport: collective: {', '.join(missing)} did not join the "
                                  f"broadcast group at {host}:{port} within {self.timeout_s:.0f}s; every generator "
                                  "must reach learner rank 0 (or use weight_sync.transport: object_store)")
        get_all(refs, self.timeout_s, "open weight channel", "actor")

    def push(self, republish: bool = False) -> Push:
        """Publish the current weights as a new version (republish: as the learners' current version, for
        generators that start after a resume); in sync mode, return once every generator serves it."""
        self.latest_version += 0 if republish else 1
        # the object store holds one version, not two: a generator restarted from here on is loaded by this
        # push's dispatch (or, once it has been dispatched, from this push's buckets)
        self.last_published = None
        method = "publish" if self.transport == "object_store" else "publish_broadcast"
        push = Push(self.latest_version, time.perf_counter(),
                    publishing=self.learners.call_async(method, self.which, self.bucket_bytes, not republish))
        if self.transport == "collective":  # the broadcast needs every receiver: they join now, in queue order
            push.acks = {i: g.receive_weights.remote() for i, g in enumerate(self.generators)}
            self.sent_versions = dict.fromkeys(push.acks, push.version)
        self.pending.append(push)
        if self.mode == "sync":
            self.wait()
        return push

    def waitables(self) -> list[ray.ObjectRef]:
        """Publish calls still running: a driver waiting on its actors also wakes for these (then `poll`)."""
        return [r for p in self.pending if p.publishing for r in p.publishing]

    def _dispatch(self, push: Push, timeout_s: float) -> None:
        """Rank 0 has published: check its version; object store: send every generator its load call (collective:
        their receive calls went out with the publish). A broadcast that failed because a generator died brings
        that generator back (`_rejoin`: this push is superseded)."""
        try:
            pub = get_all(dict(enumerate(push.publishing)), timeout_s, f"publish v{push.version}", "learner rank")[0]
        except WeightSyncError:
            if not self._revive_dead_receivers(push):
                raise
            return
        if pub["version"] != push.version:
            raise WeightSyncError(f"learner rank 0 published version {pub['version']}, expected {push.version}")
        if self.transport == "object_store":
            push.acks = {i: g.load_weights.remote(pub["version"], pub["buckets"], pub["manifest"], pub["checksums"])
                         for i, g in enumerate(self.generators)}
            self.last_published, self.sent_versions = pub, dict.fromkeys(push.acks, pub["version"])
        push.publishing, push.nbytes = None, pub["nbytes"]

    def poll(self) -> list[int]:
        """Dispatch finished publishes; versions whose every generator has acknowledged since the last call
        (non-blocking)."""
        done = []
        for push in list(self.pending):
            if push not in self.pending:  # superseded by a rejoin meanwhile
                continue
            if push.publishing:
                ready, _ = ray.wait(push.publishing, num_returns=len(push.publishing), timeout=0)
                if len(ready) == len(push.publishing):
                    self._dispatch(push, self.timeout_s)
                    if push not in self.pending:
                        continue
            if not push.publishing:
                ready, _ = ray.wait(list(push.acks.values()), num_returns=len(push.acks), timeout=0)
                if len(ready) == len(push.acks):
                    self._finish(push)
                    done.append(push.version)
                    continue
            if time.perf_counter() - push.started > self.timeout_s:
                who = "the learners did not publish it" if push.publishing else (
                    f"generator(s) {[i for i, r in push.acks.items() if r not in ready]} did not acknowledge")
                raise TimeoutError(f"weight version {push.version}: {who} within {self.timeout_s:.0f}s")
        return done

    def _time_left(self, push: Push) -> float:
        """Seconds left of `push`'s `timeout_s`, counted from when it was asked."""
        return max(0.0, self.timeout_s - (time.perf_counter() - push.started))

    def dispatch(self) -> None:
        """Send the loads of every version asked so far, blocking until the learners have published it (not until
        the generators have loaded it)."""
        for push in list(self.pending):
            if push in self.pending and push.publishing:  # (not superseded by a rejoin)
                self._dispatch(push, self._time_left(push))

    def wait(self) -> None:
        """Block until every pending version is acknowledged (or raise, naming the learner or generator)."""
        for push in list(self.pending):
            if push in self.pending and push.publishing:
                self._dispatch(push, self._time_left(push))
            if push in self.pending:  # (not superseded by a rejoin)
                self._finish(push, self._time_left(push))

    def _finish(self, push: Push, timeout_s: float | None = None) -> None:
        while True:
            try:
                versions = get_all(push.acks, self.timeout_s if timeout_s is None else timeout_s,
                                   f"load weights v{push.version}", "generator")
                break
            except ActorDiedError as e:  # restarted by Ray: it gets the newest weights before it serves again
                self.on_generator_died(e.key)
                if push not in self.pending:  # superseded: the rejoin pushed a newer version to every generator
                    return
                push.acks.pop(e.key)
            except WeightSyncError:  # collective: a broadcast a dead member broke?
                if not self._revive_dead_receivers(push):
                    raise
                return
        for i, v in versions.items():
            self.generator_versions[i] = max(self.generator_versions[i], v)
        self.latencies.append(time.perf_counter() - push.started)
        self.pending.remove(push)

    def restore_generator(self, i: int) -> None:
        """Generator i was restarted by Ray and serves its initial weights: load the newest published version
        into it before it serves again (the recovery rule around it: `actors.remote.recover`)."""
        if self.transport == "collective":  # (even before the first push: the new process is in no group)
            self._rejoin(i)
            return
        self.generator_versions[i], self.sent_versions[i] = 0, 0
        if self.latest_version == 0:  # nothing ever published: its initial weights are the current ones
            self.generator_versions[i] = get_all({i: self.generators[i].serve_initial_weights.remote()},
                                                 self.timeout_s, "restart", "generator")[i]
            return
        publishing = [p for p in self.pending if p.publishing]
        if self.last_published is None and publishing:  # the last version was released when this one began:
            push = publishing[0]                           # wait for it; its loads include generator i
            self._dispatch(push, self.timeout_s)
            version, ack = push.version, push.acks[i]
        else:
            pub = self.last_published
            version = pub["version"]
            ack = self.generators[i].load_weights.remote(version, pub["buckets"], pub["manifest"], pub["checksums"])
        self.sent_versions[i] = version
        self.generator_versions[i] = get_all({i: ack}, self.timeout_s, f"load weights v{version}", "generator")[i]

    def _rejoin(self, i: int) -> None:
        """Collective, generator i restarted: let every broadcast already asked for end (rank 0 closed a group a
        dead member broke, so its other members fail at once instead of at their timeout), open a new group with
        every member, and push the learners' weights as a new version to every generator (one that failed
        part-way serves nothing until then)."""
        for push in self.pending:
            refs = [*(push.publishing or []), *push.acks.values()]
            ray.wait(refs, num_returns=len(refs), timeout=self.timeout_s)  # each returns or fails: either is fine
        self.pending = []
        self.generator_versions[i] = self.sent_versions[i] = 0
        self._open_channel()  # a member that is gone takes the group with it
        self.push()
        self.wait()

    def _revive_dead_receivers(self, push: Push) -> bool:
        """Collective, `push` failed: bring back every generator whose receive call failed because it died
        (`_rejoin`, which supersedes the push). False when none did: the failure is not a death's."""
        if self.transport != "collective":
            return False
        dead = dead_actors(push.acks, self.timeout_s)  # a live receiver whose broadcast broke: the rejoin's too
        for i in dead:
            self.on_generator_died(i)
        return bool(dead)

    def version_lag(self, learner_version: int) -> dict[int, int]:
        """Per generator: how many versions behind the learner it serves (the `weight_version_lag` metric)."""
        return {i: learner_version - v for i, v in self.generator_versions.items()}

