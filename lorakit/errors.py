"""Errors the CLI maps to exit codes: LorakitError -> 1, UsageError -> 2."""

from __future__ import annotations

import os


class LorakitError(Exception):
    """A runtime or data problem. The message names the file and the problem on one line."""

    def __init__(self, message: str, path: str | os.PathLike | None = None):
        self.path = None if path is None else os.fspath(path)
        self.problem = message
        super().__init__(f"{self.path}: {message}" if self.path else message)


class UsageError(LorakitError):
    """The command line asks for something that cannot work (exit code 2)."""
