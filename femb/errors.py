"""The one exception type for user errors (the CLI prints it as one line, no traceback) and its rewording."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager


class FembError(Exception):
    """Bad input from the user (a file, key or parameter), as opposed to a bug in femb."""


@contextmanager
def argument_names(names: Mapping[str, str]) -> Iterator[None]:
    """Reword a FembError that starts with a library argument's name to name the caller's flag or key instead.

    A library names its own arguments ("shard_size_mb must be positive"); the CLI and the stages say
    which of their flags or params keys it was ("--shard-size-mb must be positive").
    """
    try:
        yield
    except FembError as err:
        message = str(err)
        for argument, name in names.items():
            if message.startswith(f"{argument} "):
                raise FembError(name + message[len(argument) :]) from None
        raise
