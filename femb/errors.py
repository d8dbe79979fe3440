"""The one exception type for user errors (the CLI prints it as one line, no traceback) and its rewording."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager


class FembError(Exception):
    """Bad input from the user (a file, key or parameter), as opposed to a bug in femb."""


@contextmanager
def argument_names(names: Mapping[str, str], anywhere: bool = False) -> Iterator[None]:
    """Reword a FembError that names a library argument so that it names the caller's flag or key instead.

    A library names its own arguments ("shard_size_mb must be positive"); the CLI and the stages say
    which of their flags or params keys it was ("--shard-size-mb must be positive"). By default only a
    message that starts with the argument is reworded; with `anywhere`, every whole-word mention is.
    """
    try:
        yield
    except FembError as err:
        message = str(err)
        for argument, name in names.items():
            if anywhere:
                message = re.sub(rf"(?<![\w.-]){re.escape(argument)}(?![\w-])", name, message)
            elif message.startswith(f"{argument} "):
                message = name + message[len(argument) :]
                break
        if message == str(err):
            raise
        raise FembError(message) from None
