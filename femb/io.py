"""Output shared by every writer: a file or directory appears whole under its name, or not at all.

This module is the only code that writes through temporary names (docs/architecture.md "Atomic
output"). A temporary sits beside its target as `.<name>.<pid>-<token>.tmp`, so that a rename is
atomic (same file system) and an interrupted write leaves only names that `remove_temps` knows.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TEMP_NAME = re.compile(r"\.(?P<target>.+)\.\d+-[0-9a-f]{8}\.tmp")


def temp_path(path: Path | str) -> Path:
    """A fresh temporary name beside `path` (unique per process and call)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def temp_target(name: str) -> str | None:
    """The target name of a temporary name made by `temp_path`, or None for any other name."""
    match = TEMP_NAME.fullmatch(name)
    return match["target"] if match else None


def remove_temps(directory: Path | str, targets: Iterable[str] | None = None) -> list[Path]:
    """Delete the temporaries left in `directory` by interrupted writes (only those of `targets` if given)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    wanted = None if targets is None else set(targets)
    removed = []
    for entry in directory.iterdir():
        target = temp_target(entry.name)
        if target is None or (wanted is not None and target not in wanted):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _fsync(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


@contextmanager
def atomic_path(path: Path | str, sync: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the body succeeds it is (synced and) renamed over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        yield tmp
        if sync:
            _fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(path: Path | str) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; when the body succeeds it replaces `path` as a whole.

    An existing `path` is moved aside first and removed after the rename, so a reader sees either the
    old directory or the new one, never a mixture.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    tmp.mkdir()
    old: Path | None = None
    try:
        yield tmp
        if path.exists():
            old = temp_path(path)
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def write_bytes(path: Path | str, data: bytes) -> Path:
    """Write `data` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: Path | str, text: str) -> Path:
    """Write UTF-8 `text` to `path` atomically."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: Path | str, obj: Any, indent: int | None = 2) -> Path:
    """Write `obj` as JSON (with a final newline) to `path` atomically."""
    return write_text(path, json.dumps(obj, indent=indent) + "\n")
