"""The one entry point: ``python cli.py`` or ``rega``.

``fit | validate`` go to LightningCLI (model, data and trainer composed from YAML with repeated ``--config``); the
project's own commands are typed functions run through jsonargparse, so they take ``--config`` files and explain
every argument under ``--help``.

Every failure ends in one ``error: ...`` line on stderr: exit 2 for what the user can fix (:mod:`rega.errors`,
missing files), 1 for anything else. ``--debug`` (or ``REGA_DEBUG=1``) shows the traceback instead.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import sys

from rega.logs import configure_logging, silence_third_party_noise

# command -> "module:function"; each function's signature and docstring define its arguments.
COMMANDS = {
    "corpus": "rega.data.corpus:corpus_command",
    "distill": "rega.distill.runner:distill_command",
    "evaluate": "rega.eval.runner:evaluate_command",
    "merge": "rega.modules.export:merge_command",
    "rewrite": "rega.experiments.rewrite:rewrite_command",
    "prompts": "rega.distill.role_prompts:prompts_command",
    "chat": "rega.use.chat:chat_command",
    "predict": "rega.use.predict:predict_command",
    "grid": "rega.experiments.grid:grid_command",
    "report": "rega.experiments.report:report_command",
    "records": "rega.experiments.records:records_command",
    "plan": "rega.plan.command:plan_command",
}
LIGHTNING_COMMANDS = ("fit", "validate")
# LightningCLI offers test too, but REGAModule has no test step: refuse it in one line. (Lightning's predict is
# not reachable: 'predict' is the project's own command.)
NOT_AVAILABLE = {"test": "score a trained adapter with 'rega evaluate --adapter DIR'"}
USAGE = (
    "usage: rega {" + ",".join([*LIGHTNING_COMMANDS, *COMMANDS]) + "} [--config FILE ...] [--debug] [--help]"
)
SUMMARIES = {
    "fit": "train LoRA adapters with a strategy's corpus (LightningCLI)",
    "validate": "validation loss of a model on the configured dev sets (LightningCLI)",
    "corpus": "build a strategy's training corpus and write it with its manifest",
    "distill": "self-distillation: the base model answers general instructions (D_g)",
    "evaluate": "evaluate the base model or a saved adapter: domain tasks, general ability, LLM judge",
    "merge": "merge a LoRA adapter into its base model",
    "rewrite": "SDFT: the base model rewrites the domain responses (the sdft strategy's data)",
    "prompts": "write each domain's role prompt with a model from k of its training items",
    "chat": "talk to the base model or an adapter: history, role or system prompt, streamed answers",
    "predict": "answer a JSONL/CSV of records with the base model or an adapter (restartable)",
    "grid": "run a grid of strategies: fit, then evaluate, each in its own process",
    "report": "compare the finished runs of a grid: tables and plots",
    "records": "copy a grid's finished runs into a results folder as the project commits them",
    "plan": "memory per GPU, FLOPs and time of a fit from its configs (meta device: no GPU, no weights)",
}


# Commands that read a fit's configuration: given the fit's own arguments (``--config`` files and overrides such as
# ``--data.batch_size 2``), as `fit` takes them, besides their own options.
FIT_CONFIG_COMMANDS = {"plan"}


def run_command(name: str, args: list[str]):
    from jsonargparse import CLI

    module, func = COMMANDS[name].split(":")
    function = getattr(importlib.import_module(module), func)
    if name in FIT_CONFIG_COMMANDS:
        args = fit_args_apart(args, set(inspect.signature(function).parameters) - {"fit_args"})
    return CLI(function, args=args, as_positional=False)


def fit_args_apart(args: list[str], own: set[str]) -> list[str]:
    """The command's own options (``--NAME VALUE`` or ``--NAME=VALUE`` for NAME in ``own``; help) as given, and
    every other argument, the fit's, as one ``--fit_args`` JSON list."""
    mine, fit, rest = [], [], iter(args)
    for arg in rest:
        name = arg[2:].partition("=")[0] if arg.startswith("--") else None
        if arg in ("-h", "--help") or name == "print_config":
            mine.append(arg)
        elif name in own:
            mine += [arg] if "=" in arg else [arg, next(rest, "")]
        else:
            fit.append(arg)
    return [*mine, "--fit_args", json.dumps(fit)]


def load_plugins() -> None:
    """Import the modules named in ``$REGA_PLUGINS`` (comma-separated), e.g. ones that register strategies."""
    for name in filter(None, (n.strip() for n in os.environ.get("REGA_PLUGINS", "").split(","))):
        try:
            importlib.import_module(name)
        except ImportError as err:
            from rega.errors import ConfigError

            # `python cli.py` finds modules beside cli.py, the `rega` script only those on sys.path.
            where = (
                f" (put its folder on PYTHONPATH, e.g. PYTHONPATH=. when {name.split('.')[0]}.py is here)"
                if err.name == name.split(".")[0]
                else ""
            )
            raise ConfigError(f"REGA_PLUGINS names {name!r}, which cannot be imported: {err}{where}") from err


def error_lines(err: BaseException) -> tuple[int, list[str]]:
    """(exit code, one line per problem) for an exception: 2 for user errors, 1 for bugs."""
    from rega.errors import USER_OS_ERRORS, UserError

    def one_line(text) -> str:  # whatever the message holds
        return " ".join(str(text).split()) or type(err).__name__

    if isinstance(err, UserError) and len(err.problems) > 1:
        return 2, [one_line(problem) for problem in err.problems]
    if isinstance(err, (UserError, *USER_OS_ERRORS)):
        return 2, [one_line(err)]
    hint = "(rerun with --debug or REGA_DEBUG=1 for the traceback)"
    return 1, [f"unexpected {type(err).__name__}: {one_line(err)} {hint}"]


def dispatch(argv: list[str]) -> None:
    command = argv[0]
    if command in NOT_AVAILABLE:
        from rega.errors import ConfigError

        raise ConfigError(f"'{command}' is not available; {NOT_AVAILABLE[command]}")
    load_plugins()
    if command in COMMANDS:
        run_command(command, argv[1:])
        return
    if command not in LIGHTNING_COMMANDS and not command.startswith("-"):
        from rega.errors import ConfigError

        raise ConfigError(f"unknown command {command!r}; {USAGE[len('usage: ') :]}")
    from rega.lightning_cli import run_lightning_cli

    # LightningCLI warns when given args that equal the command line; let it read sys.argv itself then.
    run_lightning_cli(None if argv == sys.argv[1:] else argv)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("REGA_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    configure_logging()
    silence_third_party_noise()
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        if not argv:
            sys.exit(2)
        print("\n".join(f"  {name:<10}{text}" for name, text in SUMMARIES.items()))
        print("'rega COMMAND --help' lists a command's options; --debug shows tracebacks.")
        return
    try:
        dispatch(argv)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as err:
        if debug:
            raise
        code, lines = error_lines(err)
        print("\n".join(f"error: {line}" for line in lines), file=sys.stderr)
        sys.exit(code)


if __name__ == "__main__":
    main()
