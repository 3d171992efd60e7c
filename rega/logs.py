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


# Third-party messages a user of this project cannot act on, silenced by name at the entry points (everything else
# still shows): (logger or warning category, the message's start, why it is noise here).
THIRD_PARTY_WARNINGS = (
    # peft's get_peft_model reads the deprecated property; transformers 5 warns on every LoRA model built.
    (FutureWarning, "`is_gradient_checkpointing` is deprecated"),
    # Lightning 2.6's own pytree helper builds a LeafSpec, which torch 2.13 deprecates: once per step.
    (Warning, "`isinstance(treespec, LeafSpec)` is deprecated"),
    # REGAModule plans each batch as it moves (rega.modules.batch_plan) whichever data module feeds it: by design.
    (Warning, "You have overridden `transfer_batch_to_device` in `LightningModule` but have passed in a"),
)
THIRD_PARTY_LOG_LINES = (
    # An advertisement for a cloud service, printed by every Trainer without that logger.
    ("lightning.pytorch.utilities.rank_zero", "💡 Tip: For seamless cloud logging"),
)


class _DropLines(logging.Filter):
    def __init__(self, starts: tuple[str, ...]):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


def silence_third_party_noise() -> None:
    """Hide the known third-party messages of :data:`THIRD_PARTY_WARNINGS` and :data:`THIRD_PARTY_LOG_LINES`."""
    import re
    import warnings

    for category, start in THIRD_PARTY_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(start), category=category)
    for name in {name for name, _ in THIRD_PARTY_LOG_LINES}:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropLines) for f in logger.filters):
            logger.addFilter(_DropLines(tuple(start for n, start in THIRD_PARTY_LOG_LINES if n == name)))
