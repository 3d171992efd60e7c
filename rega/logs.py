"""The project's log lines on stderr, set up once by whichever entry point runs (``rega`` or ``python -m ...``)."""

from __future__ import annotations

import logging
import sys


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (a handler bound to the stderr of its creation would write
    into a closed stream once a caller, such as a test, swaps stderr)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def configure_logging() -> None:
    # Our own loggers only: Lightning and transformers bring their handlers, and a root handler would repeat them.
    logger = logging.getLogger("rega")
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
