"""The replay shard without Ray: a FIFO window of Arrow rows with sampling counters and Parquet snapshots.

Rows follow docs/architecture.md, "Replay rows" (`SCHEMA`). The shard keeps its rows as one Arrow table (appends and evictions are
zero-copy chunk operations) and `times_sampled` as a NumPy counter beside it, because Arrow arrays are
immutable and the counter changes on every sample.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

SCHEMA = pa.schema(
    [
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("chosen", pa.string(), nullable=False),
        pa.field("rejected", pa.string(), nullable=False),
        pa.field("score_chosen", pa.float32(), nullable=False),
        pa.field("score_rejected", pa.float32(), nullable=False),
        pa.field("p_chosen", pa.float32(), nullable=False),
        pa.field("p_rejected", pa.float32(), nullable=False),
        pa.field("policy_version", pa.int64(), nullable=False),
        pa.field("algorithm", pa.string(), nullable=False),
        pa.field("created_at", pa.timestamp("us"), nullable=False),
        pa.field("times_sampled", pa.int32(), nullable=False),
        # SRPO: the previous responses the chosen/rejected revisions were conditioned on
        pa.field("chosen_prev", pa.string(), nullable=True),
        pa.field("rejected_prev", pa.string(), nullable=True),
    ]
)
DEFAULTS = ("created_at", "times_sampled", "chosen_prev", "rejected_prev")  # columns a writer may omit
SAMPLING = ("uniform", "fifo_recent", "fifo_oldest", "least_sampled")
META_KEY = b"selfplay.replay"


class ReplaySchemaError(ValueError):
    """Rows that do not match the replay schema; the message names the column."""


def to_table(rows: pa.Table | pa.RecordBatch | Iterable[Mapping[str, Any]]) -> pa.Table:
    """Validate rows against SCHEMA and return them as a table of exactly that schema.

    Missing optional columns are filled (created_at = now, times_sampled = 0, *_prev = null); a missing
    required column, an unknown column, a value of the wrong type or a null where none is allowed raises
    ReplaySchemaError naming the column.
    """
    if isinstance(rows, pa.RecordBatch):
        rows = pa.Table.from_batches([rows])
    if not isinstance(rows, pa.Table):
        rows = _table_from_dicts(list(rows))
    unknown = [c for c in rows.column_names if c not in SCHEMA.names]
    if unknown:
        raise ReplaySchemaError(f"unknown column(s) {unknown}; the replay schema has {SCHEMA.names}")
    n = rows.num_rows
    columns = []
    for f in SCHEMA:
        if f.name in rows.column_names:
            col = rows.column(f.name)
            try:
                col = col.cast(f.type, safe=True) if col.type != f.type else col
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise ReplaySchemaError(f"column {f.name!r}: expected {f.type}, got {col.type} ({e})") from None
        elif f.name in DEFAULTS:
            col = _default_column(f, n)
        else:
            raise ReplaySchemaError(f"missing column {f.name!r}")
        if not f.nullable and col.null_count:
            raise ReplaySchemaError(f"column {f.name!r}: {col.null_count} null value(s) where none are allowed")
        columns.append(col)
    table = pa.Table.from_arrays(columns, schema=SCHEMA)
    if n and pc.min(table.column("times_sampled")).as_py() < 0:
        raise ReplaySchemaError("column 'times_sampled': negative counts")
    return table


def _table_from_dicts(rows: list[Mapping[str, Any]]) -> pa.Table:
    if not rows:
        return SCHEMA.empty_table()
    names = list(dict.fromkeys(k for r in rows for k in r))
    data = {}
    for name in names:
        values = [r.get(name) for r in rows]
        field_type = SCHEMA.field(name).type if name in SCHEMA.names else None
        try:
            data[name] = pa.array(values, type=field_type)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError) as e:
            raise ReplaySchemaError(f"column {name!r}: {e}") from None
    return pa.table(data)


def _default_column(f: pa.Field, n: int) -> pa.Array:
    if f.name == "created_at":
        now = np.datetime64(time.time_ns() // 1000, "us")
        return pa.array(np.full(n, now), type=f.type)
    if f.name == "times_sampled":
        return pa.array(np.zeros(n, dtype=np.int32))
    return pa.nulls(n, type=f.type)


@dataclass
class ShardCounters:
    added: int = 0  # rows accepted
    evicted: int = 0  # rows pushed out by FIFO capacity
    dropped_stale: int = 0  # rows removed because their policy_version was too old
    sampled: int = 0  # rows handed out by sample()
    retired: int = 0  # rows removed after being sampled max_reuse times


class ReplayShard:
    """One FIFO window of replay rows. Not thread-safe: a Ray actor serializes calls to it."""

    def __init__(self, capacity: int, seed: int = 0, max_reuse: int | None = None):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if max_reuse is not None and max_reuse < 1:
            raise ValueError(f"max_reuse must be >= 1 (or None: no limit), got {max_reuse}")
        self.capacity, self.max_reuse = capacity, max_reuse
        self.counters = ShardCounters()
        self._table = SCHEMA.empty_table()
        self._times = np.zeros(0, dtype=np.int32)
        self._rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return self._table.num_rows

    def add(self, rows) -> int:
        """Append rows (validated first: a bad batch changes nothing); evict the oldest beyond capacity."""
        table = to_table(rows)
        if table.num_rows == 0:
            return 0
        self._table = pa.concat_tables([self._table, table])
        self._times = np.concatenate([self._times, table.column("times_sampled").to_numpy()])
        self.counters.added += table.num_rows
        overflow = len(self) - self.capacity
        if overflow > 0:
            self._keep(np.arange(overflow, len(self)))
            self.counters.evicted += overflow
        if self._table.column(0).num_chunks > 64:  # many small appends: re-pack so take() stays fast
            self._table = self._table.combine_chunks()
        return table.num_rows

    def drop_stale(self, current_version: int, max_staleness: int | None) -> int:
        """Remove rows more than max_staleness versions behind current_version; returns how many."""
        if max_staleness is None or len(self) == 0:
            return 0
        versions = self._table.column("policy_version").to_numpy()
        fresh = versions >= current_version - max_staleness
        dropped = int((~fresh).sum())
        if dropped:
            self._keep(np.flatnonzero(fresh))
            self.counters.dropped_stale += dropped
        return dropped

    def sample(
        self,
        n: int,
        strategy: str = "uniform",
        replace: bool = False,
        current_version: int | None = None,
        max_staleness: int | None = None,
    ) -> pa.Table:
        """Up to n rows (exactly n with replacement, when any rows remain); their times_sampled is incremented
        and returned with the new value. Stale rows are dropped first when a current version is given."""
        if strategy not in SAMPLING:
            raise ValueError(f"unknown sampling strategy {strategy!r}; use one of {SAMPLING}")
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if current_version is not None:
            self.drop_stale(current_version, max_staleness)
        size = len(self)
        if size == 0 or n == 0:
            return SCHEMA.empty_table()
        if strategy == "fifo_recent":
            idx = np.arange(max(0, size - n), size)
        elif strategy == "fifo_oldest":  # with max_reuse=1, a queue: every row trained once, in the order it came
            idx = np.arange(min(n, size))
        else:
            weights = None
            if strategy == "least_sampled":
                weights = 1.0 / (self._times.astype(np.float64) + 1.0)
                weights /= weights.sum()
            idx = self._rng.choice(size, size=n if replace else min(n, size), replace=replace, p=weights)
        idx = np.sort(idx)  # position order (oldest first): lets _take walk the chunks once
        np.add.at(self._times, idx, 1)
        self.counters.sampled += len(idx)
        out = self._take(idx)
        out = out.set_column(SCHEMA.get_field_index("times_sampled"), SCHEMA.field("times_sampled"),
                             pa.array(self._times[idx]))
        if self.max_reuse is not None:  # used up: leave the buffer, so later samples only see fresh rows
            spent = self._times >= self.max_reuse
            if spent.any():
                self._keep(np.flatnonzero(~spent))
                self.counters.retired += int(spent.sum())
        return out

    def rows(self) -> pa.Table:
        """All rows in FIFO order (oldest first) with current sampling counts."""
        return self._table.set_column(
            SCHEMA.get_field_index("times_sampled"), SCHEMA.field("times_sampled"), pa.array(self._times)
        )

    def stats(self) -> dict[str, int]:
        return {"size": len(self), "capacity": self.capacity, **asdict(self.counters)}

    def sampling_mass(self, strategy: str) -> float:
        """Total sampling weight of this shard's rows: what a multi-shard sample splits by."""
        if strategy == "least_sampled":
            return float((1.0 / (self._times.astype(np.float64) + 1.0)).sum())
        return float(len(self))

    def snapshot(self, path: str | Path) -> Path:
        """Write rows + counters to one Parquet file (atomically: a crash leaves the previous snapshot)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"capacity": self.capacity, "counters": asdict(self.counters), "rng": self._rng.bit_generator.state}
        table = self.rows().replace_schema_metadata({META_KEY: json.dumps(meta).encode()})
        tmp = path.with_suffix(path.suffix + ".tmp")
        pq.write_table(table, tmp)
        tmp.replace(path)
        return path

    @classmethod
    def restore(cls, path: str | Path, seed: int = 0, capacity: int | None = None,
                max_reuse: int | None = None) -> ReplayShard:
        """A shard with exactly the rows and counters of a snapshot (capacity may be overridden)."""
        table = pq.read_table(path)
        meta = json.loads((table.schema.metadata or {}).get(META_KEY, b"{}"))
        shard = cls(capacity or meta.get("capacity") or max(table.num_rows, 1), seed, max_reuse)
        shard.load_rows(table.replace_schema_metadata(None))
        shard.set_history(ShardCounters(**meta.get("counters", {})))
        if "rng" in meta:  # the sampler continues exactly where the snapshot left it
            shard._rng.bit_generator.state = meta["rng"]
        return shard

    def set_history(self, counters: ShardCounters) -> None:
        """Adopt counters from before a restore, keeping evictions that the restore itself caused."""
        evicted_now = self.counters.evicted
        self.counters = counters
        self.counters.evicted += evicted_now

    def load_rows(self, table: pa.Table) -> None:
        """Replace the contents with rows (keeping their times_sampled), e.g. when restoring or resharding."""
        table = to_table(table)
        overflow = max(0, table.num_rows - self.capacity)
        table = table.slice(overflow)
        self._table = table.combine_chunks()
        self._times = table.column("times_sampled").to_numpy().astype(np.int32, copy=True)
        self.counters = ShardCounters(added=table.num_rows, evicted=overflow)

    def _take(self, idx: np.ndarray) -> pa.Table:
        """Rows at sorted positions idx, chunk by chunk. Arrow's take on a many-chunk table costs about as much
        as copying the whole table (10 ms for 256 of 1M rows here); per-chunk takes cost microseconds."""
        batches = self._table.to_batches()
        if len(batches) <= 1:
            return self._table.take(pa.array(idx))
        offsets = np.cumsum([0] + [b.num_rows for b in batches])
        which = np.searchsorted(offsets, idx, side="right") - 1
        bounds = np.searchsorted(which, np.arange(len(batches) + 1))
        parts = [
            batches[c].take(pa.array(idx[bounds[c] : bounds[c + 1]] - offsets[c]))
            for c in range(len(batches))
            if bounds[c + 1] > bounds[c]
        ]
        if not parts:
            return self._table.schema.empty_table()
        # one chunk per column: a result with a chunk per source batch pickles ~20x slower on its way to Ray
        return pa.Table.from_batches(parts, schema=self._table.schema).combine_chunks()

    def _keep(self, idx: np.ndarray) -> None:
        if len(idx) and idx[0] + len(idx) - 1 == idx[-1]:  # contiguous: a zero-copy slice
            self._table = self._table.slice(int(idx[0]), len(idx))
        else:
            self._table = self._take(idx)
        self._times = self._times[idx]


def shard_of(prompt_ids: Iterable[str], num_shards: int) -> np.ndarray:
    """Shard index per row: crc32(prompt_id) % num_shards — stable across processes (unlike hash())."""
    import zlib

    return np.fromiter((zlib.crc32(p.encode("utf-8")) for p in prompt_ids), dtype=np.int64) % num_shards


def allocate(n: int, sizes, masses, replace: bool, rng: np.random.Generator) -> np.ndarray:
    """Split a sample of n rows over shards in proportion to their sampling mass (a multinomial draw).

    Without replacement no shard is asked for more rows than it has; the excess is redrawn over the shards
    with room left.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    masses = np.asarray(masses, dtype=np.float64)
    if not replace:
        n = min(n, int(sizes.sum()))
    if n <= 0 or masses.sum() <= 0:
        return np.zeros(len(sizes), dtype=np.int64)
    counts = rng.multinomial(n, masses / masses.sum())
    while not replace and (counts > sizes).any():
        excess = int((counts - sizes).clip(min=0).sum())
        counts = np.minimum(counts, sizes)
        room = sizes - counts
        counts += rng.multinomial(excess, room / room.sum())
    return counts
