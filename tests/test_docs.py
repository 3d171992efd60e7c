"""The documentation (README.md and docs/*.md) names what exists: every relative link points to a file or folder of
the repository (and a heading, where it names one), and every `python cli.py` line in a ```bash block uses a
command, config files and options that the real parsers know. The parsers are built in process, nothing is parsed
or run, no model is loaded."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import inspect
import re
import shlex
import typing
import warnings
from collections.abc import Mapping
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# The pages; docs/results/ holds run records, not pages.
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.M | re.S)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*([^)\s]+)(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", re.M)
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
PLACEHOLDER = ("...", "$", "<", "…")
PATH_PREFIXES = ("configs/", "scripts/", "benchmarks/")  # tokens that name a repository file in a command
FIT_SCRIPTS = ("scripts/slurm_fit.sh", "scripts/torchrun_fit.sh")  # pass their arguments to `cli.py fit`


def rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def prose(text: str) -> str:
    """The text outside fenced blocks and inline code, line numbers kept."""
    text = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    return INLINE_CODE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]{2,}|[`*]", "", heading)  # emphasis and code marks, not the underscores of names
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


@functools.cache
def anchors(path: Path) -> frozenset[str]:
    return frozenset(slug(h) for h in HEADING.findall(prose(path.read_text(encoding="utf-8"))))


def links() -> list[tuple[str, str]]:
    """(file:line, target) of every relative link, images included."""
    found = []
    for doc in DOCS:
        for number, line in enumerate(prose(doc.read_text(encoding="utf-8")).splitlines(), 1):
            for target in LINK.findall(line):
                if not re.match(r"(https?:|mailto:|#)", target):
                    found.append((f"{rel(doc)}:{number}", target))
    return found


def bash_commands() -> list[tuple[str, list[str]]]:
    """(file:line, tokens) of every command line of the ```bash blocks, continuation lines joined, comments cut."""
    found = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for block in FENCE.finditer(text):
            if block.group(1).strip() != "bash":
                continue
            first = text.count("\n", 0, block.start(2)) + 1
            pending, start = "", None
            for offset, line in enumerate(block.group(2).splitlines()):
                start = first + offset if start is None else start
                if line.rstrip().endswith("\\"):
                    pending += line.rstrip()[:-1] + " "
                    continue
                tokens = shell_words(pending + line)
                if tokens:
                    found.append((f"{rel(doc)}:{start}", tokens))
                pending, start = "", None
    return found


def shell_words(line: str) -> list[str]:
    """The words of a shell line, comments cut and `$(`, `)`, `;`, `|`, `&` split off as words of their own."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


def cli_args(tokens: list[str]) -> list[str] | None:
    """The arguments given to the entry point, when the line runs it (`python cli.py`, `rega`, a fit script)."""
    while tokens and ENV_ASSIGNMENT.match(tokens[0]):
        tokens = tokens[1:]
    if len(tokens) >= 2 and Path(tokens[0]).name.startswith("python") and tokens[1] == "cli.py":
        return tokens[2:]
    if tokens and tokens[0] == "rega":
        return tokens[1:]
    for i, token in enumerate(tokens):
        if token in FIT_SCRIPTS:
            return ["fit", *tokens[i + 1 :]]
    return None


def is_placeholder(value: str) -> bool:
    return any(mark in value for mark in PLACEHOLDER)


# ----------------------------------------------------------------------------------------------------- parsers


@functools.cache
def command_parser(command: str) -> argparse.ArgumentParser:
    """The parser `python cli.py COMMAND` parses with, captured before it parses anything."""
    from jsonargparse import capture_parser

    from rega.cli import COMMANDS, run_command

    if command in COMMANDS:
        return capture_parser(lambda: run_command(command, []))
    from rega.lightning_cli import run_lightning_cli

    with warnings.catch_warnings():  # run_lightning_cli installs warning filters for a real run
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")  # pytest's own sys.argv
        root = capture_parser(lambda: run_lightning_cli([command]))
    subcommands = next(a for a in root._actions if isinstance(a, argparse._SubParsersAction))
    return subcommands.choices[command]


def class_parameters(cls: type) -> set[str]:
    """The constructor parameters of a class and of its imported subclasses (a subclass may be configured)."""
    names, todo, seen = set(), [cls], set()
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        with contextlib.suppress(TypeError, ValueError):  # a constructor without a signature
            names |= set(inspect.signature(current.__init__).parameters) - {"self", "args", "kwargs"}
        todo.extend(current.__subclasses__())
    return names


def accepts(typehint, keys: list[str]) -> bool:
    """Whether a value of this type hint takes the nested key `keys` (e.g. `load_in_4bit` of a ModelConfig)."""
    if not keys:
        return True
    if typehint is None or typehint is typing.Any:
        return True
    origin = typing.get_origin(typehint)
    if origin is typing.Union or type(typehint).__name__ == "UnionType":
        return any(accepts(member, keys) for member in typing.get_args(typehint) if member is not type(None))
    if origin is not None:  # dict[str, X] takes free keys; list[X], tuple[...] take none
        return isinstance(origin, type) and issubclass(origin, Mapping)
    if not isinstance(typehint, type):
        return True  # a type hint this test does not read: the first segment was known
    if issubclass(typehint, Mapping):
        return True
    if dataclasses.is_dataclass(typehint):
        try:
            hints = typing.get_type_hints(typehint)
        except Exception:
            hints = {f.name: typing.Any for f in dataclasses.fields(typehint)}
        fields = {f.name for f in dataclasses.fields(typehint)}
        return keys[0] in fields and accepts(hints.get(keys[0], typing.Any), keys[1:])
    if typehint.__module__ == "builtins":
        return False  # str, int, bool, ...: no nested keys
    return keys[0] in ("class_path", "init_args", "dict_kwargs") or keys[0] in class_parameters(typehint)


def knows(parser: argparse.ArgumentParser, option: str) -> bool:
    """Whether `parser` takes `option`: an option string of its own, or a nested key of one (`--model.model.dtype`)."""
    actions = parser._option_string_actions
    if option in actions:
        return True
    parts = option[2:].split(".")
    for n in range(len(parts) - 1, 0, -1):
        prefix = "--" + ".".join(parts[:n])
        action = actions.get(prefix)
        if action is None:
            continue
        if any(o.startswith(prefix + ".") and not o.endswith((".help", "+")) for o in actions):
            return False  # a group whose keys are options of their own: `option` is not one of them
        return accepts(getattr(action, "_typehint", typing.Any), parts[n:])
    return False


# ------------------------------------------------------------------------------------------------------- tests

LINKS = links()
BASH_LINES = bash_commands()
CLI_LINES = [(where, args) for where, tokens in BASH_LINES if (args := cli_args(tokens)) is not None]


def test_the_docs_are_there_and_the_readme_links_every_page():
    linked = {
        (REPO / target.split("#")[0]).resolve() for where, target in LINKS if where.startswith("README.md:")
    }
    pages = [doc for doc in DOCS if doc.parent.name == "docs"]
    assert pages, "docs/*.md is empty"
    assert [rel(p) for p in pages if p.resolve() not in linked] == []


@pytest.mark.parametrize(("where", "target"), LINKS, ids=[f"{w} {t}" for w, t in LINKS])
def test_relative_link_points_into_the_repository(where, target):
    doc = REPO / where.rsplit(":", 1)[0]
    path_part, _, anchor = target.partition("#")
    assert not path_part.startswith("/"), f"{where}: absolute link {target}"
    path = (doc.parent / path_part).resolve() if path_part else doc
    assert path.is_relative_to(REPO), f"{where}: {target} leaves the repository"
    assert path.exists(), f"{where}: {target} does not exist"
    if anchor and path.suffix == ".md":
        assert anchor in anchors(path), f"{where}: {rel(path)} has no heading #{anchor}"


def test_no_path_of_this_machine():
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for local in {str(REPO), str(Path.home())} - {"/"}:
            assert local not in text, f"{rel(doc)} names {local}"


def test_the_docs_show_cli_commands():
    assert len(CLI_LINES) >= 10, CLI_LINES  # the parsing above found the command lines


@pytest.mark.parametrize(("where", "tokens"), BASH_LINES, ids=[w for w, _ in BASH_LINES])
def test_command_names_existing_files(where, tokens):
    for i, token in enumerate(tokens):
        value = token.split("=", 1)[1] if token.startswith("--config=") else token
        named = token.startswith("--config=") or (i > 0 and tokens[i - 1] == "--config")
        if (named or value.startswith(PATH_PREFIXES)) and not is_placeholder(value):
            assert (REPO / value).exists(), f"{where}: {value} does not exist"


@pytest.mark.parametrize(("where", "args"), CLI_LINES, ids=[w for w, _ in CLI_LINES])
def test_cli_command_and_options_exist(where, args):
    from rega.cli import COMMANDS, FIT_CONFIG_COMMANDS, LIGHTNING_COMMANDS

    if args in ([], ["--help"], ["-h"]):
        return
    command = args[0]
    assert command in (*LIGHTNING_COMMANDS, *COMMANDS), f"{where}: no command {command!r}"
    # a command that reads a fit's configuration passes the options it does not know to the fit's parser
    parsers = [command_parser(c) for c in (command, *(["fit"] if command in FIT_CONFIG_COMMANDS else []))]
    unknown = [
        option
        for option in (arg.split("=", 1)[0] for arg in args[1:] if arg.startswith("--"))
        if option != "--debug" and not any(knows(p, option) for p in parsers)  # --debug: the entry point's
    ]
    assert unknown == [], f"{where}: `{command}` has no option {', '.join(unknown)}"
