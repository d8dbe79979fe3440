"""The one exception type for user errors (the CLI prints it as one line, no traceback) and its rewording."""

from __future__ import annotations

import re
import reprlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager


class FembError(Exception):
    """Bad input from the user (a file, key or parameter), as opposed to a bug in femb."""


_SHORT = reprlib.Repr()  # keyword arguments need python 3.12
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother = 3, 40, 40
_SHORT.maxtuple = _SHORT.maxlist = _SHORT.maxdict = _SHORT.maxset = _SHORT.maxfrozenset = 4


def short_repr(value: object, limit: int = 80) -> str:
    """`repr(value)` cut to about `limit` characters and 3 levels of nesting: safe to quote from hostile input.

    A plain repr of a deeply nested list raises RecursionError and one of a huge list is megabytes long;
    an error message quotes what it was given through this instead.
    """
    text = _SHORT.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def short_text(text: str, limit: int = 80) -> str:
    """`text` on one line, cut to `limit` characters: for quoting names and messages built from hostile input."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def describe_os_error(err: OSError) -> str:
    """One line for an OSError on a path the user gave: `file: reason` (missing, denied, read-only, disk full)."""
    where = f"{err.filename}: " if err.filename else ""
    return f"{where}{err.strerror or err}"


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
