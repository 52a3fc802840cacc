"""Load real prompt sets from JSONL, JSON or Parquet, or Hugging Face datasets: one record per prompt with a
`prompt` field.

The field may hold a string or a chat (a list of {"role", "content"} messages).

Bad input, and what happens (docs/reliability.md has the full table):
  - a missing, empty or unreadable file, an unsupported suffix, a JSON array that does not parse, a Parquet file
    without the asked-for column: PromptFileError naming the file (and line) at once;
  - a bad record — invalid JSON on a JSONL line, bytes that are not UTF-8, a missing field, an empty prompt, a
    prompt longer than `max_chars`, a missing reference when one is required: by default PromptFileError listing
    every bad record as `file:line: field: problem` (nothing has run yet, so nothing is lost and the whole file
    can be fixed in one go); with `skip_bad=True` each bad record is skipped, logged as a warning naming its line
    and counted (`PromptSet.skipped`, `PromptSet.problems`).
Line numbers are 1-based; Parquet rows are numbered from 0, as pyarrow and pandas number them.
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


class PromptSet(list):
    """The prompts of a file (a plain list of Prompt) plus what was skipped: `skipped` bad records, described in
    `problems` as `file:line: problem`. Empty `problems` when nothing was skipped."""

    def __init__(self, prompts=(), *, path: str = "", problems: list[str] | None = None):
        super().__init__(prompts)
        self.path = path
        self.problems = list(problems or [])

    @property
    def skipped(self) -> int:
        return len(self.problems)


def load_prompts(
    path: str | Path,
    *,
    field: str = "prompt",
    id_field: str | None = None,
    reference_field: str | None = None,
    max_chars: int = 32_000,
    skip_bad: bool = False,
    require_reference: bool = False,
) -> PromptSet:
    """Every usable prompt of the file, in file order. See the module docstring for what bad input does.

    `max_chars`: the longest prompt accepted (a chat counts all its messages). `require_reference`: a record
    without a non-empty `reference_field` is a bad record (SAPO needs the chosen answer for every prompt).
    """
    path = Path(path)
    if not path.exists():
        raise PromptFileError(f"{path}: prompt file not found")
    if path.is_dir():
        raise PromptFileError(f"{path}: is a directory, not a prompt file")
    if path.stat().st_size == 0:
        raise PromptFileError(f"{path}: empty prompt file (0 bytes)")
    if max_chars < 1:
        raise ValueError(f"max_chars must be >= 1, got {max_chars}")
    if require_reference and not reference_field:
        raise ValueError("require_reference needs a reference_field")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        records = _jsonl_records(path)
        unit = "line"
    elif suffix == ".json":
        records = _json_records(path)
        unit = "line"
    elif suffix == ".parquet":
        records = _parquet_records(path, [f for f in (field, id_field, reference_field) if f])
        unit = "row"
    else:
        raise PromptFileError(f"{path}: unsupported prompt file type {suffix!r} (use .jsonl, .json or .parquet)")

    where = (lambda n: f"{path}:{n}") if unit == "line" else (lambda n: f"{path}: row {n}")
    return _prompt_set(records, str(path), where, field, id_field, reference_field, max_chars, skip_bad,
                       require_reference)


def load_hf_prompts(
    path: str,
    *,
    split: str = "train",
    field: str = "prompt",
    id_field: str | None = None,
    reference_field: str | None = None,
    max_chars: int = 32_000,
    skip_bad: bool = False,
    require_reference: bool = False,
) -> PromptSet:
    """A Hugging Face dataset through the `datasets` library: a directory written by `save_to_disk`, data files
    (`.jsonl`, `.json`, `.parquet`, `.csv`, globs allowed) or a hub id (on a machine that reaches the hub, e.g.
    `HuggingFaceH4/ultrafeedback_binarized` with split `train_prefs`). The same record rules as `load_prompts`;
    rows are numbered from 0 within the split."""
    import datasets

    source = f"{path} [{split}]"
    try:
        if Path(path).is_dir() and any((Path(path) / f).exists() for f in ("dataset_dict.json", "state.json")):
            data = datasets.load_from_disk(path)
        else:
            builders = {".jsonl": "json", ".json": "json", ".ndjson": "json", ".parquet": "parquet", ".csv": "csv"}
            builder = builders.get(Path(path.replace("*", "x")).suffix.lower())
            data = datasets.load_dataset(builder, data_files=path) if builder else datasets.load_dataset(path)
    except Exception as e:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ConnectionError…)
        reason = " ".join(str(e).split())[:300]
        raise PromptFileError(f"{path}: cannot load it as a Hugging Face dataset ({type(e).__name__}: {reason})") from None
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise PromptFileError(f"{path}: no split {split!r} (task.split); splits are {sorted(data)}")
        data = data[split]
    missing = [c for c in (field, id_field, reference_field) if c and c not in data.column_names]
    if missing:
        raise PromptFileError(f"{source}: missing column(s) {missing}; columns are {data.column_names}")
    if data.num_rows == 0:
        raise PromptFileError(f"{source}: no records (the split has no rows)")
    records = enumerate(data.select_columns([c for c in (field, id_field, reference_field) if c]))
    return _prompt_set(records, source, lambda n: f"{source}: row {n}", field, id_field, reference_field, max_chars,
                       skip_bad, require_reference)


def _prompt_set(records, source: str, where, field, id_field, reference_field, max_chars: int, skip_bad: bool,
                require_reference: bool) -> PromptSet:
    """Every record made a Prompt, or its problem kept as `where(number): problem`; then the bad-record rules."""
    prompts: list[Prompt] = []
    problems: list[str] = []
    seen = 0
    for number, record in records:
        seen += 1
        try:
            prompts.append(_to_prompt(record, field, id_field, reference_field, max_chars, require_reference))
        except ValueError as e:
            problems.append(f"{where(number)}: {e}")
    if not seen:
        raise PromptFileError(f"{source}: no records (only blank lines, an empty array or no rows)")
    if len(problems) == 1 and not skip_bad:
        raise PromptFileError(f"1 bad record in {source}: {problems[0]}; fix it, or skip and count bad records with "
                              "skip_bad (task.skip_bad_records: true)")
    if problems and not skip_bad:
        shown = "\n  ".join(problems[:MAX_SHOWN])
        more = f"\n  … and {len(problems) - MAX_SHOWN} more" if len(problems) > MAX_SHOWN else ""
        raise PromptFileError(f"{len(problems)} bad record(s) in {source}:\n  {shown}{more}\n"
                              "fix them, or skip and count them with skip_bad (task.skip_bad_records: true)")
    if problems:
        for problem in problems[:MAX_SHOWN]:
            log.warning("skipped bad prompt record %s", problem)
        log.warning("skipped %d bad record(s) in %s (kept %d); first: %s", len(problems), source, len(prompts),
                    problems[0])
    if not prompts:
        raise PromptFileError(f"{source}: no usable prompts ({len(problems)} bad record(s), first: {problems[0]})")
    return PromptSet(prompts, path=source, problems=problems)


def load_task_prompts(task_cfg, require_reference: bool = False) -> PromptSet:
    """`load_prompts` (`name: file`) or `load_hf_prompts` (`name: hf`, with `task.split`) for a `TaskConfig`:
    field names, `max_prompt_chars`, `skip_bad_records`, and, with `require_reference` (a recipe that needs
    reference answers: SAPO's chosen responses), a reference per record, so a missing one stops the run before it
    starts instead of failing a generator request mid-run."""
    options = dict(field=task_cfg.prompt_field, reference_field=task_cfg.reference_field,
                   max_chars=task_cfg.max_prompt_chars, skip_bad=task_cfg.skip_bad_records,
                   require_reference=require_reference and bool(task_cfg.reference_field))
    if task_cfg.name == "hf":
        return load_hf_prompts(task_cfg.path, split=task_cfg.split, **options)
    return load_prompts(task_cfg.path, **options)


def _jsonl_records(path: Path):
    offset = 0
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            start, offset = offset, offset + len(raw)
            try:
                # utf-8-sig on the first line: a byte-order mark some editors write is not part of the JSON
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as e:
                yield number, ValueError(f"not UTF-8 (byte {e.start} of the line, offset {start + e.start} in the "
                                         f"file: {e.reason})")
                continue
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as e:
                yield number, ValueError(f"invalid JSON: {e.msg} (column {e.colno})")


def _json_records(path: Path):
    """A JSON array of records, each numbered by the line it starts on. A syntax error anywhere makes the rest
    of the array unreadable, so it is fatal (file:line:column), unlike a bad JSONL line."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise PromptFileError(f"{path}:{line}: not UTF-8 (offset {e.start} in the file: {e.reason})") from None
    decoder = json.JSONDecoder()

    def skip(i: int) -> int:
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        return i

    def fail(i: int, problem: str):
        line = text.count("\n", 0, i) + 1
        column = i - (text.rfind("\n", 0, i) + 1) + 1
        return PromptFileError(f"{path}:{line}: invalid JSON: {problem} (column {column})")

    i = skip(0)
    if i == len(text):
        raise PromptFileError(f"{path}: no records (the file is blank)")
    if text[i] != "[":
        raise fail(i, "expected a JSON array of records [{...}, ...] (or use .jsonl: one record per line)")
    i, line, counted = skip(i + 1), 1, 0
    if i < len(text) and text[i] == "]":
        return
    while True:
        line += text.count("\n", counted, i)
        counted = i
        try:
            record, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise PromptFileError(f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
        yield line, record
        i = skip(end)
        if i < len(text) and text[i] == ",":
            i = skip(i + 1)
        elif i < len(text) and text[i] == "]":
            if skip(i + 1) != len(text):
                raise fail(skip(i + 1), "extra data after the array")
            return
        else:
            raise fail(i, "expected ',' or ']' after a record")


def _parquet_records(path: Path, columns: list[str]):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except Exception as e:  # pyarrow raises several types for a file that is not Parquet
        raise PromptFileError(f"{path}: not a readable Parquet file ({e})") from None
    missing = [c for c in columns if c not in schema.names]
    if missing:
        raise PromptFileError(f"{path}: missing column(s) {missing}; columns are {schema.names}")
    try:
        table = pq.read_table(path, columns=columns)
    except Exception as e:  # a truncated or corrupt file can pass read_schema and fail here
        raise PromptFileError(f"{path}: cannot read the Parquet data ({e})") from None
    text = [f.name for f in table.schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]
    if not _valid_utf8(table, text):  # read those columns as bytes, so each bad row is named (not one crash)
        table = table.cast(pa.schema([pa.field(f.name, pa.binary()) if f.name in text else f for f in table.schema]))
    for number, row in enumerate(table.to_pylist()):
        yield number, {k: (_decode(v) if isinstance(v, bytes) else v) for k, v in row.items()}


def _valid_utf8(table, columns: list[str]) -> bool:
    """Parquet does not check that string columns hold UTF-8; a bad value would fail later, in as_py."""
    import pyarrow as pa

    try:
        for name in columns:
            table.column(name).validate(full=True)
    except pa.ArrowInvalid:
        return False
    return True


def _decode(value: bytes):
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as e:
        return ValueError(f"not UTF-8 (byte {e.start}: {e.reason})")


def _to_prompt(record: Any, field: str, id_field, reference_field, max_chars: int,
               require_reference: bool = False) -> Prompt:
    if isinstance(record, ValueError):
        raise record
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    if field not in record:
        raise ValueError(f"missing field {field!r} (fields: {sorted(record)})")
    value = record[field]
    if isinstance(value, ValueError):
        raise ValueError(f"field {field!r}: {value}")
    if value is None:
        raise ValueError(f"field {field!r}: null, expected a string or a list of messages")
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
        raise ValueError(f"field {field!r}: prompt of {size} characters exceeds max_chars={max_chars} "
                         "(task.max_prompt_chars)")
    reference = None
    if reference_field is not None:
        reference = record.get(reference_field)
        if isinstance(reference, ValueError):
            raise ValueError(f"field {reference_field!r}: {reference}")
        if reference is not None and not isinstance(reference, str):
            raise ValueError(f"field {reference_field!r}: expected a string")
        if require_reference and (reference is None or not reference.strip()):
            what = "missing" if reference_field not in record or reference is None else "empty"
            raise ValueError(f"field {reference_field!r}: {what} reference answer (required: SAPO's chosen response)")
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
