"""Progress of long stages: items done / total, rate and time left.

On a terminal a tqdm bar; otherwise (a grid's log file, a SLURM job) one log line every ``every_s`` seconds and
one at the end, so a log shows that a stage is alive and when it will finish. Only rank 0 reports under DDP.
"""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("rega.progress")


def format_duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def rate_and_time_left(done: int, total: int, elapsed: float, unit: str = "item") -> str:
    """``, 3.1 item/s, 2m35s left`` (the mean rate since the start), or nothing before the first item."""
    if not done or elapsed <= 0:
        return ""
    rate = done / elapsed
    left = f", {format_duration((total - done) / rate)} left" if total > done else ""
    return f", {rate:.2f} {unit}/s{left}"


def progress_line(desc: str, done: int, total: int, elapsed: float, unit: str = "item") -> str:
    """``desc: 120/600 (20%), 3.1 item/s, 2m35s left``."""
    share = f" ({100 * done / total:.0f}%)" if total else ""
    return f"{desc}: {done}/{total}{share}{rate_and_time_left(done, total, elapsed, unit)}"


class Progress:
    """``with Progress(total, "domain generation") as bar: ... bar.update(n)``.

    Args:
        total: items expected.
        desc: what is being done.
        unit: the item's name in the rate.
        every_s: seconds between log lines when not on a terminal.
        bar: force a tqdm bar (True) or log lines (False); ``None`` picks a bar when stderr is a terminal.
        enabled: report at all (default: on rank 0 only).
    """

    def __init__(
        self,
        total: int,
        desc: str,
        unit: str = "item",
        every_s: float = 30.0,
        bar: bool | None = None,
        enabled: bool | None = None,
    ):
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        if enabled is None:
            from rega.distributed import dist_info  # imports torch: not needed by progress_line's users

            enabled = dist_info()[0] == 0
        self.enabled = enabled
        self.done, self.started = 0, time.perf_counter()
        self._logged = self.started
        use_bar = sys.stderr.isatty() if bar is None else bar
        self._bar = None
        if self.enabled and use_bar and total:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr)

    def update(self, n: int = 1) -> None:
        self.done += n
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.perf_counter()
        if now - self._logged >= self.every_s and self.done < self.total:
            self._logged = now
            log.info(progress_line(self.desc, self.done, self.total, now - self.started, self.unit))

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.total:
            elapsed = time.perf_counter() - self.started
            log.info(
                progress_line(self.desc, self.done, self.total, elapsed, self.unit) + f" in {elapsed:.0f}s"
            )

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
