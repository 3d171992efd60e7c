"""Small file helpers: atomic writes of files and folders, stale temporary files, content hashes.

Nothing the project writes is ever left half-written: a file (or a whole folder) is written under a temporary
name beside its target and renamed into place in one step. Temporary names carry the writer's host and process id
(``.NAME.~HOST~PID~XXXX.tmp``), so the next writer into the same folder removes what a killed one left behind,
without touching the files of a writer that is still running. Written files follow the umask, like ``open``.
Jobs that may run at once on one output (a cluster's array jobs) take turns with :func:`waiting_lock`.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

HOST = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "host"
TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.~(?P<host>[^~]*)~(?P<pid>\d+)~[^~]*\.tmp$")
STALE_AFTER_S = 24 * 3600  # temporary files of other hosts (shared filesystems) count as stale after a day


def current_umask() -> int:
    """The process umask, read without changing it where /proc allows (``os.umask`` sets it to read it)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temp_prefix(path: Path) -> str:
    return f".{path.name}.~{HOST}~{os.getpid()}~"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def is_stale_temp(entry: Path, now: float | None = None) -> bool:
    """A temporary file or folder whose writer is gone: a dead process of this host, or older than a day."""
    match = TEMP_NAME.match(entry.name)
    if match is None:
        return False
    if match["host"] == HOST and int(match["pid"]) != os.getpid():
        return not _pid_alive(int(match["pid"]))
    try:
        age = (now or time.time()) - entry.lstat().st_mtime
    except FileNotFoundError:
        return False
    return age > STALE_AFTER_S


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary files and folders that killed writers left in the folder of ``path`` (whatever they
    were writing: a step-named checkpoint is never written again)."""
    return remove_stale_temps_in(Path(path).parent)


def remove_stale_temps_in(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files and folders of dead writers in ``folder``."""
    removed: list[Path] = []
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for entry in Path(folder).iterdir():
            if is_stale_temp(entry):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        entry.unlink()
                removed.append(entry)
    return removed


@contextlib.contextmanager
def atomic_write(
    path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8"
) -> Iterator[IO[Any]]:
    """Write to a temporary file beside ``path`` and rename it into place only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path), suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp creates 0600: a plain open() would follow the umask
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # old kernel, or a filesystem without it
        return False
    raise OSError(code, os.strerror(code), str(b))


def check_removable(folder: Path, target: Path) -> None:
    """Refuse, before anything changes, to replace a folder whose files this user may not remove."""
    for root, _dirs, _files in os.walk(folder):
        if not os.access(root, os.W_OK | os.X_OK):
            raise PermissionError(
                f"{target}: cannot replace the previous output: this user may not remove the files in {root} "
                "(nothing was changed)"
            )


def replace_dir(new: Path, target: Path) -> None:
    """Put the folder ``new`` at ``target``: one rename, or one exchange when ``target`` exists. When the previous
    contents cannot be removed, they go back to ``target`` (and the new ones to ``new``) before the error."""
    if not target.exists() and not target.is_symlink():
        os.rename(new, target)
        return
    if not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a folder")
    check_removable(target, target)
    if _exchange(new, target):
        try:
            shutil.rmtree(new)  # now the old contents
        except OSError:
            _exchange(new, target)
            raise
        return
    # Without an atomic exchange: move the old folder aside under a temporary name, then the new one in.
    old = Path(tempfile.mkdtemp(dir=target.parent, prefix=temp_prefix(target), suffix=".tmp"))
    os.rename(target, old / "old")
    try:
        os.rename(new, target)
        shutil.rmtree(old / "old")
    except OSError:
        if (old / "old").exists():
            with contextlib.suppress(FileNotFoundError):
                os.rename(target, new)
            os.rename(old / "old", target)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """An empty temporary folder beside ``target`` that replaces ``target`` as a whole if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=temp_prefix(target), suffix=".tmp"))
    try:
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp creates 0700
        yield tmp
        replace_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def waiting_lock(path: str | os.PathLike, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) for the block, first waiting for whoever holds it.

    The kernel releases the lock when its holder dies, so a killed job never leaves a stale lock behind and the
    next one simply resumes. ``on_wait`` runs once when the lock is busy, before waiting (to say why nothing
    happens). On a filesystem without ``flock`` (Lustre mounted without it) the block runs unlocked, with a warning.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as err:  # ENOLCK / ENOSYS / EOPNOTSUPP: no locks here at all
            warnings.warn(
                f"{path}: no file locks on this filesystem ({err.strerror}); not waiting", stacklevel=3
            )
        yield


def check_output_dir(path: str | os.PathLike, owned: Iterable[str], what: str) -> Path:
    """Refuse an output folder that holds anything but ``owned`` names (it is replaced as a whole)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"output {path} is a file, not a folder")
    owned = set(owned)
    foreign = sorted(
        p.name
        for p in (path.iterdir() if path.is_dir() else [])
        if p.name not in owned and not TEMP_NAME.match(p.name)
    )
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise FileExistsError(
            f"output folder {path} holds files that are not {what} ({shown}); it would be replaced as a whole: "
            "choose a new or empty folder"
        )
    return path


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_write(path) as handle:
        json.dump(obj, handle, ensure_ascii=False, indent=2, sort_keys=False)
        handle.write("\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> int:
    count = 0
    with atomic_write(path) as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    with open(path, encoding="utf-8-sig") as handle:  # a byte-order mark is not part of the first row
        return [json.loads(line) for line in handle if line.strip()]


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def stable_hash(obj: Any) -> str:
    """A short hash of a JSON-serialisable object, stable across processes (cache keys)."""
    blob = json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]
