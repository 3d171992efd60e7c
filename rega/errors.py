"""The failures a user can cause and fix. ``rega`` reports each as one ``error: ...`` line and exits with 2;
anything else is a bug and exits with 1 (its traceback with ``--debug`` or ``REGA_DEBUG=1``).

Every message names the cause and the source: the file and line, the config field, the model folder, the URL.
"""

from __future__ import annotations


class UserError(Exception):
    """Base of every error whose message alone tells the user what to fix; ``problems`` holds one line per
    problem when there are several (the command line prints each on its own line)."""

    def __init__(self, *problems: str):
        super().__init__("; ".join(problems))
        self.problems = tuple(problems)


class ConfigError(UserError, ValueError):
    """A configuration that cannot work, reported before any data is read or any model is loaded."""


class RecordError(UserError, ValueError):
    """A bad record: the message names the file, the line (or row) and the field."""

    def __init__(self, where: str, field_name: str | None, problem: str):
        self.where, self.field, self.problem = where, field_name, problem
        place = f"{where}: field '{field_name}'" if field_name else where
        super().__init__(f"{place}: {problem}")


class EmptyDataError(ConfigError):
    """A run that would train on, evaluate or judge nothing: the message names the sources that came up empty."""


class JudgeError(UserError, RuntimeError):
    """A judge failure that no retry can fix (missing key, wrong URL, rejected key) or too many missing scores."""


# Built-in exceptions that, raised by our own checks or by file access, describe the problem well enough.
USER_OS_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)
