"""Typed errors raised by the library. Only the CLI turns them into messages and exit codes."""

from __future__ import annotations


class BleuberiError(Exception):
    """Base class: a failure the user can act on (bad input, bad config, missing model...)."""

    exit_code = 1


class InputError(BleuberiError):
    """A record that cannot be used, located by source, line and field."""

    def __init__(self, source: str, line: int | None, message: str, field: str | None = None) -> None:
        self.source = source
        self.line = line
        self.field = field
        self.message = message
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.source if self.line is None else f"{self.source}:{self.line}"
        what = f"field '{self.field}': " if self.field else ""
        return f"{where}: {what}{self.message}"


class ConfigError(BleuberiError):
    """A configuration value (flag, environment variable or config file key) that cannot be used."""


class UsageError(BleuberiError):
    """Options that contradict each other; the CLI exits with code 2 like any usage error."""

    exit_code = 2


class ModelError(BleuberiError):
    """A model or adapter that cannot be found or loaded."""


class Interrupted(BleuberiError):
    """Ctrl-C (or SIGTERM) stopped a command; the message says what was kept and how to continue."""

    exit_code = 130


class OutputClosed(BleuberiError):
    """The reader of our stdout went away (`| head`). Not a failure: the CLI exits quietly."""

    exit_code = 0


class WriteFailed(BleuberiError):
    """An output that could not be written (disk full, quota exceeded), named by its path."""

    def __init__(self, path: str, cause: str) -> None:
        self.path, self.cause = path, cause
        super().__init__(f"{path}: cannot write: {cause}")


def add_note(error: BaseException, note: str) -> None:
    """`error.add_note(note)`, also on Python 3.10 (add_note is 3.11's): the CLI prints the notes after the error."""
    error.__notes__ = [*getattr(error, "__notes__", []), note]
