"""User-facing errors.

Anything raised as a `CnnflowError` is a mistake in the user's input (a path, a key, a
value, a file's content). The CLI prints it as one line and exits non-zero; it is never
shown as a traceback. Bugs in cnnflow itself stay ordinary exceptions.
"""

from __future__ import annotations

from typing import Any


class CnnflowError(Exception):
    """A user mistake: the message names the file, key or value and what was expected."""

    exit_code = 2


class ConfigError(CnnflowError):
    """A params.yaml key or an override is unknown, of the wrong type or out of range.

    `key` is the dotted key the message starts with (`optim.lr`; "" when not known), so
    the loader can prefix where that value came from: the file or `--set`.
    """

    def __init__(self, message: str, *, key: str = "") -> None:
        super().__init__(message)
        self.key = key


class DataError(CnnflowError):
    """An input data set is missing, malformed or cannot be split as asked."""


class ShardError(CnnflowError):
    """A shard directory does not match its manifest or cannot be read."""


def check_config(ok: bool, key: str, expected: str, value: Any) -> None:
    """Raise ConfigError `key: expected <expected>, got <value>` unless `ok`."""
    if not ok:
        raise ConfigError(f"{key}: expected {expected}, got {value!r}", key=key)


class CheckpointMismatchError(CnnflowError):
    """A checkpoint belongs to another model, data set, training setting or strategy."""
