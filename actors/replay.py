"""Sharded replay buffer on Ray: `ReplayShardActor` (one `selfplay.buffer.ReplayShard` per actor) and the
`ReplayBuffer` client that routes rows by prompt id, samples across shards and snapshots/restores them all.

Rows travel as Arrow tables: Ray ships their buffers through the object store without a Python-object copy.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray

from actors.faults import HoldPoints
from actors.remote import ActorDiedError, ActorRestarted, get_all, recover, restarted
from selfplay.buffer import SAMPLING, SCHEMA, ReplayShard, ShardCounters, allocate, shard_of, to_table

MANIFEST = "manifest.json"


@ray.remote
class ReplayShardActor:
    """One FIFO shard. Ray runs its methods one at a time, so the shard needs no locking."""

    def __init__(self, capacity: int, seed: int = 0, index: int = 0, max_reuse: int | None = None):
        self.index = index
        self.shard = ReplayShard(capacity, seed, max_reuse)
        self.awaiting_restore = restarted()  # a restart holds no rows: refuse work until the client restores it
        self.holds = HoldPoints()  # chaos tests only: hold a call until the test kills this process

    def _check(self) -> None:
        if self.awaiting_restore:
            raise ActorRestarted(f"replay shard {self.index} was restarted and its rows are not restored yet")

    def add(self, rows: pa.Table) -> int:
        self._check()
        self.holds.enter("add")
        return self.shard.add(rows)

    def prepare(self, strategy: str, current_version: int | None, max_staleness: int | None) -> tuple[int, float]:
        """Drop stale rows, then report (size, sampling mass) for the client's split of a sample."""
        self._check()
        if current_version is not None:
            self.shard.drop_stale(current_version, max_staleness)
        return len(self.shard), self.shard.sampling_mass(strategy)

    def sample(self, n: int, strategy: str, replace: bool, current_version: int | None = None,
               max_staleness: int | None = None) -> pa.Table:
        self._check()
        return self.shard.sample(n, strategy, replace, current_version, max_staleness)

    def hold(self, point: str, marker: str, skip: int = 0) -> None:
        """Chaos tests: hold the next `add` (after `skip` more) until this process is killed (actors/faults.py)."""
        self.holds.arm(point, marker, skip)

    def stats(self) -> dict[str, int]:
        return {"shard": self.index, **self.shard.stats(), "awaiting_restore": self.awaiting_restore}

    def count_evicted(self, n: int) -> None:
        """Rows acknowledged before a restart that recovery could not bring back, because they had left the
        FIFO window: counted as added and evicted, so the totals still add up."""
        self.shard.counters.added += n
        self.shard.counters.evicted += n

    def rows(self) -> pa.Table:
        self._check()
        return self.shard.rows()

    def snapshot(self, path: str) -> str:
        self._check()  # never overwrite a good snapshot with a restarted, empty shard
        return str(self.shard.snapshot(path))

    def restore(self, path: str | None) -> dict[str, int]:
        """Rows and counters from a snapshot (None: none was taken yet, start empty); then serve again."""
        if path is not None:
            self.shard = ReplayShard.restore(path, capacity=self.shard.capacity, max_reuse=self.shard.max_reuse)
        self.awaiting_restore = False
        return self.stats()

    def load_rows(self, rows: pa.Table, counters: dict[str, int]) -> dict[str, int]:
        self.shard.load_rows(rows)
        self.shard.set_history(ShardCounters(**counters))
        return self.stats()


class ReplayBuffer:
    """Client over `num_shards` shard actors. Capacity is the total, split evenly over the shards.

    Every remote call waits at most `timeout_s` and names the shard when it fails.
    """

    def __init__(
        self,
        num_shards: int = 1,
        capacity: int = 2000,
        *,
        sampling: str = "uniform",
        replace: bool = False,
        max_staleness: int | None = None,
        max_reuse: int | None = None,
        seed: int = 0,
        num_cpus: float = 0.5,
        timeout_s: float = 120.0,
        max_restarts: int = 0,
        placement=None,
    ):
        """`placement`: the run's `actors.placement.Placement`; shard i runs in bundle i of its replay group."""
        if num_shards < 1:
            raise ValueError(f"num_shards must be >= 1, got {num_shards}")
        if capacity < num_shards:
            raise ValueError(f"capacity {capacity} is smaller than the number of shards {num_shards}")
        if sampling not in SAMPLING:
            raise ValueError(f"unknown sampling strategy {sampling!r}; use one of {SAMPLING}")
        self.num_shards, self.capacity = num_shards, capacity
        self.sampling, self.replace, self.max_staleness = sampling, replace, max_staleness
        self.timeout_s = timeout_s
        self._rng = np.random.default_rng(seed)
        self.per_shard = [capacity // num_shards + (i < capacity % num_shards) for i in range(num_shards)]
        # a shard that dies is restarted by Ray (up to max_restarts times in all) and recovered by `_recover`
        self.max_restarts, self.restarts, self.replayed_rows = max_restarts, 0, 0
        self._snapshot_files: dict[int, str] = {}
        self._since_snapshot: dict[int, list[pa.Table]] = {i: [] for i in range(num_shards)}
        self._trimmed = dict.fromkeys(range(num_shards), 0)
        self.shards = [
            ReplayShardActor.options(num_cpus=num_cpus, max_restarts=max_restarts,
                                     scheduling_strategy=placement and placement.strategy("replay", i)).remote(
                self.per_shard[i], seed + i, i, max_reuse)
            for i in range(num_shards)
        ]

    @classmethod
    def from_config(cls, cfg, **kwargs) -> ReplayBuffer:
        """From a `selfplay.config.Config` (replay section + resources.replay_shards/replay_cpus)."""
        return cls(
            cfg.resources.replay_shards,
            cfg.replay.capacity,
            sampling=cfg.replay.sampling,
            replace=cfg.replay.replace,
            max_staleness=cfg.replay.max_staleness,
            max_reuse=cfg.replay.max_reuse,
            seed=cfg.seed,
            num_cpus=cfg.resources.replay_cpus,
            max_restarts=cfg.resources.max_restarts,
            **kwargs,
        )

    # -- data path ------------------------------------------------------------------------------------------

    def add(self, rows) -> int:
        """Validate all rows (a bad batch is refused whole, no shard changes), then route by prompt_id."""
        table = to_table(rows)
        if table.num_rows == 0:
            return 0
        if self.num_shards == 1:
            parts = {0: table}
        else:
            owner = shard_of(table.column("prompt_id").to_pylist(), self.num_shards)
            parts = {int(s): table.take(pa.array(np.flatnonzero(owner == s))) for s in np.unique(owner)}
        added = self._call({s: ("add", part) for s, part in parts.items()}, "add")
        for s, part in parts.items():  # acknowledged: kept until the next snapshot, to replay into a restarted shard
            self._log_rows(s, part)
        return sum(added.values())

    def sample(
        self,
        n: int,
        current_version: int | None = None,
        *,
        strategy: str | None = None,
        replace: bool | None = None,
    ) -> pa.Table:
        """Up to n rows across shards, split in proportion to each shard's sampling mass (its size, or its
        total 1/(times_sampled+1) weight for least_sampled). With current_version, rows more than
        max_staleness versions old are dropped first and counted."""
        strategy = strategy or self.sampling
        replace = self.replace if replace is None else replace
        if strategy not in SAMPLING:
            raise ValueError(f"unknown sampling strategy {strategy!r}; use one of {SAMPLING}")
        if self.num_shards == 1:  # nothing to split: one round trip
            return self._call({0: ("sample", n, strategy, replace, current_version, self.max_staleness)}, "sample")[0]
        prepared = self._call({i: ("prepare", strategy, current_version, self.max_staleness)
                               for i in range(self.num_shards)}, "prepare")
        sizes = [prepared[i][0] for i in range(self.num_shards)]
        masses = [prepared[i][1] for i in range(self.num_shards)]
        counts = allocate(n, sizes, masses, replace, self._rng)
        tables = self._call({i: ("sample", int(c), strategy, replace) for i, c in enumerate(counts) if c}, "sample")
        return pa.concat_tables([tables[i] for i in sorted(tables)]) if tables else SCHEMA.empty_table()

    # -- observability ---------------------------------------------------------------------------------------

    def shard_stats(self) -> list[dict[str, int]]:
        stats = self._call({i: ("stats",) for i in range(self.num_shards)}, "stats")
        for i in [i for i, st in stats.items() if st["awaiting_restore"]]:  # restarted while idle
            self._recover(i)
            stats[i] = self._call({i: ("stats",)}, "stats")[i]
        return [stats[i] for i in range(self.num_shards)]

    def stats(self) -> dict[str, int]:
        """Totals over shards: size, capacity, added, evicted, dropped_stale, sampled, retired (+ shards)."""
        per = self.shard_stats()
        total = {k: sum(s[k] for s in per) for k in ("size", "capacity", "added", "evicted", "dropped_stale", "sampled",
                                                       "retired")}
        return {**total, "shards": self.num_shards}

    def __len__(self) -> int:
        return self.stats()["size"]

    def rows(self) -> pa.Table:
        """Every row of every shard (shard by shard, each oldest first)."""
        tables = self._call({i: ("rows",) for i in range(self.num_shards)}, "rows")
        return pa.concat_tables([tables[i] for i in range(self.num_shards)])

    # -- persistence -----------------------------------------------------------------------------------------

    def snapshot(self, directory: str | Path) -> Path:
        """One Parquet file per shard plus a manifest, written last, so a half-written snapshot is never read.

        On a multi-node cluster the directory must be on storage every node can reach.
        """
        directory = Path(directory).resolve()
        directory.mkdir(parents=True, exist_ok=True)
        files = [f"shard-{i:03d}-of-{self.num_shards:03d}.parquet" for i in range(self.num_shards)]
        self._call({i: ("snapshot", str(directory / files[i])) for i in range(self.num_shards)}, "snapshot")
        manifest = {"num_shards": self.num_shards, "capacity": self.capacity, "files": files,
                    "stats": self.stats(), "created_at": time.time()}
        tmp = directory / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=2))
        tmp.replace(directory / MANIFEST)
        self._snapshot_files = {i: str(directory / f) for i, f in enumerate(files)}
        self._since_snapshot, self._trimmed = {i: [] for i in range(self.num_shards)}, dict.fromkeys(self._trimmed, 0)
        return directory

    def restore(self, directory: str | Path) -> dict[str, int]:
        """Load a snapshot into these shards. Same shard count: each shard gets its own rows and counters back
        exactly. Different count: rows are merged in creation order and re-routed by prompt_id; the counters'
        totals are kept (evictions beyond the new capacity are counted)."""
        directory = Path(directory).resolve()
        manifest_path = directory / MANIFEST
        if not manifest_path.exists():
            raise FileNotFoundError(f"{directory}: no {MANIFEST}; not a complete replay snapshot")
        manifest = json.loads(manifest_path.read_text())
        files = [directory / f for f in manifest["files"]]
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise FileNotFoundError(f"replay snapshot {directory} is missing {missing}")
        if manifest["num_shards"] == self.num_shards:
            self._call({i: ("restore", str(files[i])) for i in range(self.num_shards)}, "restore")
            self._snapshot_files = {i: str(f) for i, f in enumerate(files)}
        else:
            self._reshard(files)
            self.snapshot(directory.parent / f"{directory.name}-resharded")  # a restarted shard restores from it
        self._since_snapshot, self._trimmed = {i: [] for i in range(self.num_shards)}, dict.fromkeys(self._trimmed, 0)
        return self.stats()

    def _reshard(self, files: list[Path]) -> None:
        old = [ReplayShard.restore(f) for f in files]
        table = pa.concat_tables([s.rows() for s in old])
        order = np.argsort(table.column("created_at").to_numpy(), kind="stable")
        table = table.take(pa.array(order))
        owner = shard_of(table.column("prompt_id").to_pylist(), self.num_shards)
        totals = {k: sum(getattr(s.counters, k) for s in old)
                  for k in ("added", "evicted", "dropped_stale", "sampled", "retired")}
        calls = {}
        for i in range(self.num_shards):
            part = table.take(pa.array(np.flatnonzero(owner == i)))
            # shard 0 carries the history (rows evicted, dropped and sampled before the snapshot) so totals match
            counters = {"added": part.num_rows, "evicted": 0, "dropped_stale": 0, "sampled": 0, "retired": 0}
            if i == 0:
                counters = {k: v - (table.num_rows - part.num_rows if k == "added" else 0) for k, v in totals.items()}
            calls[i] = ("load_rows", part, counters)
        self._call(calls, "restore")

    def shutdown(self) -> None:
        for s in self.shards:
            ray.kill(s)
        self.shards = []

    # -- remote calls with deadlines, and recovery of restarted shards ------------------------------------------

    def _call(self, calls: dict[int, tuple], what: str) -> dict:
        """{shard: (method, *args)} → {shard: result}. Each wait is bounded and names the shard. A shard that died
        is recovered (`_recover`) and its call issued again; other shards' calls are not repeated."""
        refs = {i: getattr(self.shards[i], c[0]).remote(*c[1:]) for i, c in calls.items()}
        out = {}
        for i, ref in refs.items():
            deadline = time.monotonic() + self.timeout_s
            while True:
                try:
                    out[i] = get_all({i: ref}, self.timeout_s, what, "replay shard")[i]
                    break
                except ActorDiedError:
                    if time.monotonic() > deadline:
                        raise
                    self._recover(i)
                    ref = getattr(self.shards[i], calls[i][0]).remote(*calls[i][1:])
        return out

    def _recover(self, i: int) -> None:
        """Shard i died: once Ray has restarted it, restore its last snapshot and every row acknowledged since
        (`actors.remote.recover`, the rule shared with generators and judges), and count it."""
        if self.restarts >= self.max_restarts:
            raise ActorDiedError(f"replay shard {i} was restarted more than max_restarts={self.max_restarts} times",
                                 i, "replay shard")

        def call(method: str, *args):  # no recovery inside a recovery: a death here is recovered once more
            return get_all({i: getattr(self.shards[i], method).remote(*args)}, self.timeout_s, method, "replay shard")

        def restore() -> None:
            call("restore", self._snapshot_files.get(i))
            for part in self._since_snapshot[i]:
                call("add", part)
            if self._trimmed[i]:  # acknowledged rows no longer in the log were past the FIFO window: evicted
                call("count_evicted", self._trimmed[i])

        if recover(self.shards[i], "replay shard", i, restore, self.timeout_s):
            self.restarts += 1
            self.replayed_rows += sum(p.num_rows for p in self._since_snapshot[i])
        else:
            time.sleep(0.1)  # the old process, not yet gone: the call is issued again and tells

    def _log_rows(self, i: int, part: pa.Table) -> None:
        """Keep the rows shard i acknowledged since the last snapshot, at most its capacity of them: older ones
        would have been evicted anyway."""
        log = self._since_snapshot[i]
        log.append(part)
        while len(log) > 1 and sum(p.num_rows for p in log[1:]) >= self.per_shard[i]:
            self._trimmed[i] += log.pop(0).num_rows
