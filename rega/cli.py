"""The one entry point: ``python cli.py`` or ``rega``.

``fit | validate | test | predict`` go to LightningCLI (model, data and trainer composed from YAML with repeated
``--config``); the project's own commands are typed functions run through jsonargparse, so they take ``--config``
files and explain every argument under ``--help``.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

# command -> "module:function"; each function's signature and docstring define its arguments.
COMMANDS = {
    "corpus": "rega.data.corpus:corpus_command",
    "distill": "rega.distill.runner:distill_command",
    "evaluate": "rega.eval.runner:evaluate_command",
    "merge": "rega.modules.export:merge_command",
    "grid": "rega.experiments.grid:grid_command",
    "report": "rega.experiments.report:report_command",
}


def run_command(name: str, args: list[str]):
    from jsonargparse import CLI

    module, func = COMMANDS[name].split(":")
    return CLI(getattr(importlib.import_module(module), func), args=args, as_positional=False)


def configure_logging() -> None:
    # Our own loggers only: Lightning and transformers bring their handlers, and a root handler would repeat them.
    logger = logging.getLogger("rega")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def load_plugins() -> None:
    """Import the modules named in ``$REGA_PLUGINS`` (comma-separated), e.g. ones that register strategies."""
    for name in filter(None, (n.strip() for n in os.environ.get("REGA_PLUGINS", "").split(","))):
        importlib.import_module(name)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    configure_logging()
    load_plugins()
    from rega.data.prompts import ConfigError
    from rega.data.records import RecordError

    if not argv or argv[0] in ("-h", "--help"):
        print(
            "usage: rega {fit,validate,test,predict," + ",".join(COMMANDS) + "} [--config FILE ...] [--help]"
        )
        if not argv:
            sys.exit(2)
    try:
        if argv and argv[0] in COMMANDS:
            run_command(argv[0], argv[1:])
            return
        from rega.lightning_cli import run_lightning_cli

        # LightningCLI warns when given args that equal the command line; let it read sys.argv itself then.
        run_lightning_cli(None if argv == sys.argv[1:] else argv)
    except (ConfigError, RecordError, FileNotFoundError) as err:
        # Bad input is the user's to fix: one clear line, no traceback.
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
