"""Read instruction-response records from JSONL, JSON, CSV, Parquet or Hugging Face ``datasets``.

Every format goes through the same validation (:func:`rega.data.records.record_from_dict`), so a bad row gets one
error naming file, line (or row) and field. With ``skip_invalid`` bad rows are counted and reported, never silently
dropped. ``fields`` maps schema names to other column names, e.g. ``{instruction: question, output: final_decision}``.
Multi-turn rows (``messages`` or ``conversations``) are read as described in :mod:`rega.data.records`.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rega.config import DataSource
from rega.data.records import (
    CONVERSATION_FIELDS,
    Record,
    RecordError,
    check_unique_ids,
    record_from_dict,
)
from rega.errors import ConfigError
from rega.paths import resolve_path

log = logging.getLogger(__name__)

SCHEMA_FIELDS = (
    "id",
    "instruction",
    "input",
    "output",
    "domain",
    "task",
    "lang",
    "choices",
    "answer",
    "category",
    "meta",
    "messages",
    "conversations",
)


@dataclass
class LoadReport:
    records: list[Record]
    skipped: list[str] = field(default_factory=list)  # one "file:line: field 'x': problem" per skipped row
    empty: list[str] = field(default_factory=list)  # one "source: why" per source that yielded no record


UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


def _not_utf8(path: Path, data: bytes, err: UnicodeDecodeError, line: int) -> RecordError:
    hint = (
        " (the file starts with a UTF-16 byte-order mark: save it as UTF-8)" if data[:2] in UTF16_BOMS else ""
    )
    return RecordError(f"{path}:{line}", None, f"undecodable bytes (not UTF-8) at byte {err.start}{hint}")


def _json_problem(err: json.JSONDecodeError) -> str:
    # json's messages may end in "at" ("Unterminated string starting at"): the column follows once, not twice.
    return f"malformed JSON at column {err.colno}: {err.msg.removesuffix(' at')}"


def _iter_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with open(path, "rb") as handle:
        head = handle.read(2)
        handle.seek(0)
        for lineno, raw in enumerate(handle, start=1):
            where = f"{path}:{lineno}"
            try:
                # A UTF-8 byte-order mark (Windows editors) is accepted, as for JSON and CSV files.
                text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as err:
                yield where, _not_utf8(path, head, err, lineno)
                continue
            if not text.strip():
                continue
            try:
                yield where, json.loads(text)
            except json.JSONDecodeError as err:
                yield where, RecordError(where, None, _json_problem(err))


def _read_text(path: Path) -> str:
    """A whole file as text (a UTF-8 byte-order mark, as Excel writes, is accepted); bad bytes name their line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise _not_utf8(path, data, err, data.count(b"\n", 0, err.start) + 1) from None


def _iter_json(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as err:
        raise RecordError(f"{path}:{err.lineno}", None, _json_problem(err)) from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise RecordError(str(path), None, 'expected a JSON list of objects (or {"data": [...]})')
    for index, row in enumerate(data):
        yield f"{path}:item {index}", row


class _CountedLines:
    """The lines of a text, counting which ones each CSV record used (a quoted cell may span several)."""

    def __init__(self, text: str):
        self._lines = iter(io.StringIO(text, newline=""))
        self.consumed: list[tuple[int, bool]] = []  # (line number, blank) since the last record
        self._count = 0

    def __iter__(self):
        return self

    def __next__(self) -> str:
        line = next(self._lines)
        self._count += 1
        self.consumed.append((self._count, not line.strip()))
        return line

    def first_line(self) -> int:
        """The first non-blank line the last record was read from (csv skips blank lines before a record)."""
        return next((n for n, blank in self.consumed if not blank), self._count)


def _iter_csv(path: Path) -> Iterator[tuple[str, Any]]:
    lines = _CountedLines(_read_text(path))
    reader = csv.DictReader(lines)
    if reader.fieldnames is None:  # reads the header now, so its lines are not counted as the first record's
        return
    while True:
        lines.consumed.clear()
        try:
            row = next(reader)
        except StopIteration:
            return
        # A record is reported at the line it starts on, not the last line of a multi-line cell.
        yield f"{path}:{lines.first_line()}", _parse_list_cells(row)


def _parse_list_cells(row: dict[str, Any]) -> dict[str, Any]:
    """CSV has no lists: a ``choices``, ``messages`` or ``conversations`` cell holds JSON; empty cells mean absent."""
    out = {k: v for k, v in row.items() if v not in ("", None)}
    for name in ("choices", *CONVERSATION_FIELDS):
        if isinstance(out.get(name), str):
            with contextlib.suppress(json.JSONDecodeError):  # validation reports it as a wrongly typed field
                out[name] = json.loads(out[name])
    return out


def _iter_table(table: Any, label: str) -> Iterator[tuple[str, Any]]:
    for index, row in enumerate(table):
        yield f"{label}:row {index}", row


def _iter_rows(source: DataSource) -> Iterator[tuple[str, Any]]:
    if source.path.startswith("hf:"):
        import datasets

        ds = datasets.load_dataset(source.path[3:], source.name, split=source.split)
        return _iter_table(ds, source.path)
    path = resolve_path(source.path)
    if not path.exists():
        raise FileNotFoundError(f"data source {source.path!r} not found (resolved to {path})")
    if path.is_dir():
        import datasets

        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[source.split]
        return _iter_table(ds, str(path))
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _iter_jsonl(path)
    if suffix == ".json":
        return _iter_json(path)
    if suffix == ".csv":
        return _iter_csv(path)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return _iter_table(pq.read_table(path).to_pylist(), str(path))
    raise ConfigError(
        f"{path}: unsupported file type {suffix!r} (use .jsonl, .json, .csv, .parquet or a datasets folder)"
    )


def _apply_fields(row: Any, fields: dict[str, str]) -> Any:
    if not fields or not isinstance(row, dict):
        return row
    mapped = dict(row)
    for schema_name, column in fields.items():
        mapped[schema_name] = row.get(column)
    return mapped


def load_records(
    source: DataSource,
    *,
    skip_invalid: bool = False,
    allowed_domains: frozenset[str] | None = None,
) -> LoadReport:
    """Load and validate one source. Raises :class:`RecordError` on the first bad row unless ``skip_invalid``."""
    for name in source.fields:
        if name not in SCHEMA_FIELDS:
            raise ConfigError(f"source {source.path!r}: 'fields' maps unknown schema field {name!r}")
    resolved = resolve_path(source.path)
    stem = resolved.parent.name if resolved.name in ("train.jsonl", "dev.jsonl") else resolved.stem
    report = LoadReport(records=[])
    first_seen: dict[str, str] = {}
    for index, (where, row) in enumerate(_iter_rows(source)):
        try:
            if isinstance(row, RecordError):
                raise row
            record = record_from_dict(
                _apply_fields(row, source.fields),
                where,
                domain=source.domain,
                task=source.task,
                lang=source.lang,
                default_id=f"{source.task or stem}-{index}",
                require_output=source.require_output,
                allowed_domains=allowed_domains,
            )
            if record.id in first_seen:
                raise RecordError(
                    where, "id", f"duplicate id {record.id!r} (first seen at {first_seen[record.id]})"
                )
        except RecordError as err:
            if not skip_invalid:
                raise
            report.skipped.append(str(err))
            continue
        first_seen[record.id] = where
        report.records.append(record)
        if source.limit is not None and len(report.records) >= source.limit:
            break
    _warn_dropped_systems(source, report.records)
    if report.skipped:
        log.warning(
            "%s: skipped %d invalid rows, first: %s", source.path, len(report.skipped), report.skipped[0]
        )
    if not report.records:
        report.empty.append(_why_empty(source, report.skipped))
        log.warning("empty source: %s", report.empty[-1])
    return report


def _warn_dropped_systems(source: DataSource, records: list[Record]) -> None:
    # The strategy's prompt (p_c or p_i) is what training and inference put in the system slot, so a
    # conversation's own system message is not rendered; it stays in the record (and the corpus rows).
    own = [r for r in records if r.system is not None]
    if own:
        log.warning(
            "%s: %d conversations carry their own system message; it is dropped, the strategy's prompt takes "
            "the system slot (first: %s)", source.path, len(own), own[0].origin,
        )  # fmt: skip


def _why_empty(source: DataSource, skipped: list[str]) -> str:
    if skipped:
        return f"{source.path}: all {len(skipped)} rows invalid and skipped (first: {skipped[0]})"
    if source.limit == 0:
        return f"{source.path}: limit is 0"
    return f"{source.path}: holds no records"


def load_many(
    sources: list[DataSource], *, skip_invalid: bool = False, allowed_domains: frozenset[str] | None = None
) -> LoadReport:
    """Load several sources; ids must be unique across all of them."""
    merged = LoadReport(records=[])
    for source in sources:
        part = load_records(source, skip_invalid=skip_invalid, allowed_domains=allowed_domains)
        merged.records.extend(part.records)
        merged.skipped.extend(part.skipped)
        merged.empty.extend(part.empty)
    check_unique_ids(merged.records)
    return merged
