"""Load real prompt sets from JSONL or Parquet: one record per prompt with a `prompt` field.

The field may hold a string or a chat (a list of {"role", "content"} messages). Every bad record is reported
with file, line (or row) and field; with `skip_bad=True` bad records are skipped and counted instead.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from selfplay.tasks.base import Prompt, make_prompt_id

log = logging.getLogger("selfplay")
MAX_SHOWN = 10


class PromptFileError(ValueError):
    """A prompt file that cannot be used as it is; the message lists each problem with its line."""


def load_prompts(
    path: str | Path,
    *,
    field: str = "prompt",
    id_field: str | None = None,
    reference_field: str | None = None,
    max_chars: int = 32_000,
    skip_bad: bool = False,
) -> list[Prompt]:
    path = Path(path)
    if not path.exists():
        raise PromptFileError(f"{path}: prompt file not found")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        records = _jsonl_records(path)
        unit = "line"
    elif suffix == ".parquet":
        records = _parquet_records(path, [f for f in (field, id_field, reference_field) if f])
        unit = "row"
    else:
        raise PromptFileError(f"{path}: unsupported prompt file type {suffix!r} (use .jsonl or .parquet)")

    prompts: list[Prompt] = []
    problems: list[str] = []
    for number, record in records:
        where = f"{path}:{number}" if unit == "line" else f"{path}: row {number}"
        try:
            prompts.append(_to_prompt(record, field, id_field, reference_field, max_chars))
        except ValueError as e:
            problems.append(f"{where}: {e}")
    if problems and not skip_bad:
        shown = "\n  ".join(problems[:MAX_SHOWN])
        more = f"\n  … and {len(problems) - MAX_SHOWN} more" if len(problems) > MAX_SHOWN else ""
        raise PromptFileError(f"{len(problems)} bad record(s) in {path}:\n  {shown}{more}")
    if problems:
        log.warning("skipped %d bad record(s) in %s; first: %s", len(problems), path, problems[0])
    if not prompts:
        raise PromptFileError(f"{path}: no usable prompts")
    return prompts


def _jsonl_records(path: Path):
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield number, ValueError(f"not UTF-8 (byte {e.start}: {e.reason})")
                continue
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as e:
                yield number, ValueError(f"invalid JSON: {e.msg} (column {e.colno})")


def _parquet_records(path: Path, columns: list[str]):
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except Exception as e:  # pyarrow raises several types for a file that is not Parquet
        raise PromptFileError(f"{path}: not a readable Parquet file ({e})") from None
    missing = [c for c in columns if c not in schema.names]
    if missing:
        raise PromptFileError(f"{path}: missing column(s) {missing}; columns are {schema.names}")
    table = pq.read_table(path, columns=columns)
    for number, row in enumerate(table.to_pylist()):
        yield number, {k: (_decode(v) if isinstance(v, bytes) else v) for k, v in row.items()}


def _decode(value: bytes):
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as e:
        return ValueError(f"not UTF-8 (byte {e.start}: {e.reason})")


def _to_prompt(record: Any, field: str, id_field, reference_field, max_chars: int) -> Prompt:
    if isinstance(record, ValueError):
        raise record
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    if field not in record:
        raise ValueError(f"missing field {field!r} (fields: {sorted(record)})")
    value = record[field]
    if isinstance(value, ValueError):
        raise ValueError(f"field {field!r}: {value}")
    messages = None
    if isinstance(value, list):
        messages = _messages(value, field)
        text = messages[-1]["content"]
        size = sum(len(m["content"]) for m in messages)
    elif isinstance(value, str):
        text, size = value, len(value)
    else:
        raise ValueError(f"field {field!r}: expected a string or a list of messages, got {type(value).__name__}")
    if not text.strip():
        raise ValueError(f"field {field!r}: empty prompt")
    if size > max_chars:
        raise ValueError(f"field {field!r}: prompt of {size} characters exceeds max_chars={max_chars}")
    reference = None
    if reference_field is not None:
        reference = record.get(reference_field)
        if reference is not None and not isinstance(reference, str):
            raise ValueError(f"field {reference_field!r}: expected a string")
    pid = record.get(id_field) if id_field else None
    key = json.dumps(messages) if messages else text
    return Prompt(
        prompt_id=str(pid) if pid is not None else make_prompt_id(key),
        text=text,
        reference=reference,
        messages=tuple(messages) if messages else None,
    )


def _messages(value: list, field: str) -> list[dict[str, str]]:
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"field {field!r}[{i}]: expected {{'role': str, 'content': str}}")
        out.append({"role": m["role"], "content": m["content"]})
    if not out:
        raise ValueError(f"field {field!r}: empty message list")
    if out[-1]["role"] != "user":
        raise ValueError(f"field {field!r}: the last message must be from the user, got {out[-1]['role']!r}")
    return out
