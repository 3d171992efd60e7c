"""The on-disk protocol that makes distillation restartable and exactly-once.

Layout of ``output_dir``::

    distill_settings.json                  model, prompt and sampling that produced everything here
    shards/run003-rank01-of04.jsonl        one shard per (run, rank): finished lines, one per instruction
    shards/run004-rank00-of02.jsonl.partial  a shard being written (or left by a killed run)
    distilled.jsonl, summary.json          the merged output and its counts (written last, atomically)

* A rank appends one complete line per finished instruction, a whole batch at a time, then flushes and fsyncs:
  everything before the last newline of a shard is finished work, anything after it is a torn line.
* At start, rank 0 seals what a killed run left: truncates each ``*.partial`` after its last newline and renames
  it to final. Then every rank reads all shards; an id found there is done and is never generated again.
* Each run writes new shard files (its run number is one more than any on disk), so restarts with another
  number of ranks never append to a file another rank owns.
* Only one run may use an output folder at a time (an exclusive lock held by rank 0).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from rega.errors import ConfigError
from rega.io import write_json

SETTINGS_FILE = "distill_settings.json"
SHARD_DIR = "shards"
PARTIAL = ".partial"
_SHARD_NAME = re.compile(r"^run(\d+)-rank(\d+)-of(\d+)\.jsonl(\.partial)?$")


def shard_dir(output_dir: Path) -> Path:
    return Path(output_dir) / SHARD_DIR


def shard_files(output_dir: Path) -> list[Path]:
    folder = shard_dir(output_dir)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _SHARD_NAME.match(p.name))


def next_run_number(output_dir: Path) -> int:
    runs = [int(_SHARD_NAME.match(p.name).group(1)) for p in shard_files(output_dir)]
    return max(runs, default=0) + 1


def partial_path(output_dir: Path, run: int, rank: int, world_size: int) -> Path:
    return shard_dir(output_dir) / f"run{run:03d}-rank{rank:02d}-of{world_size:02d}.jsonl{PARTIAL}"


def _complete_bytes(path: Path) -> bytes:
    """Everything up to and including the last newline: the lines that were written whole."""
    data = path.read_bytes()
    return data[: data.rfind(b"\n") + 1]


def read_shard(path: Path) -> list[dict]:
    """The finished lines of a shard; a torn last line (no newline yet) is ignored."""
    rows = []
    for lineno, raw in enumerate(_complete_bytes(path).splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            rows.append(json.loads(raw))
        except json.JSONDecodeError as err:
            # Lines are written whole and in order, so this is damage from outside, not a kill: stop loudly.
            raise ConfigError(
                f"{path}:{lineno}: corrupt shard line ({err.msg}); remove the line or the file"
            ) from None
    return rows


def read_all_shards(output_dir: Path) -> Iterator[tuple[Path, dict]]:
    for path in shard_files(output_dir):
        for row in read_shard(path):
            yield path, row


def lock_or_refuse(handle, message: str) -> None:
    """Take an exclusive lock on an open file (released by the kernel when the process dies), or refuse with
    ``message`` when a live process holds it."""
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ConfigError(message) from None


def seal_leftovers(output_dir: Path) -> list[str]:
    """Make the ``*.partial`` shards of killed runs final: cut the torn tail, rename. Returns what was done."""
    notes = []
    for path in shard_files(output_dir):
        if not path.name.endswith(PARTIAL):
            continue
        with open(path, "rb+") as handle:
            lock_or_refuse(
                handle,
                f"{path} is still being written by a process of an earlier run; stop it before restarting",
            )
            keep = len(_complete_bytes(path))
            size = os.fstat(handle.fileno()).st_size
            if keep < size:
                handle.truncate(keep)
                notes.append(f"{path.name}: dropped a torn last line ({size - keep} bytes)")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(path, path.with_name(path.name[: -len(PARTIAL)]))
        notes.append(f"{path.name}: sealed")
    return notes


class ShardWriter:
    """Append-only writer of one rank's shard: whole lines, flushed and fsynced per batch."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._handle: IO[bytes] = open(path, "ab")  # noqa: SIM115 (closed in finish/close)
        # Held until this process ends, so a restart can tell a live writer from a dead one.
        fcntl.flock(self._handle, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def append(self, rows: list[dict]) -> None:
        blob = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")
        self._handle.write(blob)
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def finish(self) -> Path:
        """Close and rename ``*.partial`` to its final name: this rank's share of the run is complete."""
        self._handle.close()
        final = self.path.with_name(self.path.name[: -len(PARTIAL)])
        os.replace(self.path, final)
        return final

    def close(self) -> None:
        self._handle.close()


@contextlib.contextmanager
def output_lock(output_dir: Path) -> Iterator[None]:
    """Exclusive use of ``output_dir`` for one run (released by the kernel if the process dies)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    with open(output_dir / ".distill.lock", "w") as handle:
        lock_or_refuse(
            handle, f"another distillation is running on {output_dir}; wait for it or use another output_dir"
        )
        yield


def _diff(old, new, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += _diff(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [f"{prefix[:-1]}: {old!r:.80} -> {new!r:.80}"]


def check_settings(output_dir: Path, settings: dict) -> bool:
    """Refuse an output folder made with other settings; True when the settings file still has to be written."""
    path = Path(output_dir) / SETTINGS_FILE
    if not path.exists():
        if shard_files(output_dir):
            raise ConfigError(
                f"{output_dir} holds distilled shards but no {SETTINGS_FILE}: their origin is unknown; use a new output_dir"
            )
        return True
    stored = json.loads(path.read_text(encoding="utf-8"))
    changes = _diff(stored, settings)
    if changes:
        raise ConfigError(
            f"{output_dir} was distilled with other settings, refusing to mix outputs ("
            + "; ".join(changes)
            + "). Use a new output_dir, or delete this one to start over."
        )
    return False


def write_settings(output_dir: Path, settings: dict) -> None:
    write_json(Path(output_dir) / SETTINGS_FILE, settings)
