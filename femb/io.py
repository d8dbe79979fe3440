"""Output shared by every writer: a file or directory appears whole under its name, or not at all.

This module is the only code that writes through temporary names (docs/architecture.md "Atomic
output"). A temporary sits beside its target as `.<name>.<pid>-<token>.tmp`, so that a rename is
atomic (same file system) and an interrupted write leaves only names that `remove_temps` knows.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any

TEMP_NAME = re.compile(r"\.(?P<target>.+)\.\d+-[0-9a-f]{8}\.tmp")

# What to do about a write that failed for want of room; other errors keep the system's own words.
_ADVICE = {
    errno.ENOSPC: "the disk is full: free space or write elsewhere",
    errno.EDQUOT: "the disk quota is used up: free space or write elsewhere",
    errno.EFBIG: "larger than the file system or the file size limit, ulimit -f, allows",
}


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


def named_os_error(err: OSError, path: Path | str, temp: Path | str | None = None) -> OSError:
    """`err` naming `path` when it names no file or only the temporary `temp`, else `err` itself.

    A buffered write on a full disk fails without a file name (and a temporary's name means nothing to
    the user), so the caller names the output it was writing; ENOSPC, EDQUOT and EFBIG get advice.
    """
    name = None if err.filename is None else str(err.filename)
    if temp is not None and name is not None and (name == str(temp) or name.startswith(f"{temp}{os.sep}")):
        name = str(path) + name[len(str(temp)) :]  # a file inside a temporary directory: its final name
    elif name is not None:
        return err
    reason = err.strerror or str(err) or type(err).__name__
    advice = _ADVICE.get(err.errno)  # type: ignore[arg-type]
    return OSError(err.errno, f"{reason} ({advice})" if advice else reason, name or str(path))


def _disk_error(err: BaseException) -> OSError | None:
    """`err` if it is an OSError, else a full-disk or read-only OSError it was raised from (torch.save wraps
    the OSError of a full disk in a RuntimeError), else None."""
    if isinstance(err, OSError):
        return err
    seen: set[int] = set()
    cause = err.__cause__ or err.__context__
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.errno in (*_ADVICE, errno.EROFS):
            return cause
        cause = cause.__cause__ or cause.__context__
    return None


def _file_system_error(directory: Path) -> OSError | None:
    """ENOSPC or EROFS when the file system of `directory` is full or read-only (what a failed write met)."""
    try:
        stat = os.statvfs(directory)
    except (OSError, AttributeError):
        return None
    if stat.f_flag & os.ST_RDONLY:
        return OSError(errno.EROFS, os.strerror(errno.EROFS))
    if stat.f_bavail == 0:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return None


def _reraise_named(err: BaseException, path: Path, tmp: Path) -> None:
    """Raise what a failed write of `path` (through `tmp`) should: its disk error naming `path`, else `err`.

    The disk error is `err` itself, an OSError it was raised from, or, for a RuntimeError (torch.save
    to a path reports a failed write as "file write failed"), a full or read-only file system found
    under `path` after the failure.
    """
    disk = _disk_error(err)
    if disk is None and isinstance(err, RuntimeError):  # torch's "file write failed"; never a user error
        disk = _file_system_error(path.parent)
    if disk is None:
        raise err
    named = named_os_error(disk, path, tmp)
    if named is err:
        raise err
    raise named from err


def write_to(file: IO[Any], data: Any, path: Path | str) -> None:
    """`file.write(data)` for the writer of `path`: an OSError that names no file is raised naming `path`."""
    try:
        file.write(data)
    except OSError as err:
        named = named_os_error(err, path)
        if named is err:
            raise
        raise named from err


def _fsync(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


@contextmanager
def atomic_path(path: Path | str, sync: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the body succeeds it is (synced and) renamed over `path`.

    On any failure the temporary is removed, and an OSError that names no file or only the temporary
    (a full disk, a read-only file system), or that another error was raised from, is raised naming `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        yield tmp
        if sync:
            _fsync(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        _reraise_named(err, path, tmp)
    finally:
        _unlink_quietly(tmp)


def _unlink_quietly(path: Path) -> None:
    """Remove `path` if it is there; a failure to remove must not hide the error that led here."""
    with suppress(OSError):
        path.unlink(missing_ok=True)


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
    except BaseException as err:
        if old is not None and not path.exists():  # the new one did not land: put the old one back
            os.replace(old, path)
            old = None
        _reraise_named(err, path, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def file_sha256(path: Path | str) -> str:
    """The sha256 of a file's bytes, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


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
