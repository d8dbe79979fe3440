"""InsightFace .bin pair sets (docs/architecture.md ".bin pair sets"): a pickle read without running any code.

A .bin holds `2*P` encoded images (the two images of pair `i` are `bins[2*i]` and `bins[2*i+1]`)
and `P` booleans, as written by InsightFace's packing scripts (`lfw2pack.py` and its siblings):
python 2, pickle protocol 2, images as python-2 `str`, or, where a script stored the output of
`cv2.imencode` (the CFP packer does), as numpy uint8 arrays. Plain `pickle.load` would run whatever
the file names, so the reader's `find_class` never imports anything: every global is refused except
the handful a numpy uint8/bool array or a python-3 protocol-2 `bytes` pickles to, and those resolve
to inert stand-ins defined here that check their arguments and only collect bytes. A pickle can
therefore build lists, tuples, dicts, bytes, str, bool, int, float, None and byte arrays, and nothing
can run.
"""

from __future__ import annotations

import io
import math
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path

from femb.errors import FembError, short_repr, short_text
from femb.io import atomic_path

# Protocol 4 stores bytes natively (BINBYTES), so InsightFace's own `pickle.load(f)` reads our
# files on python 3 without `encoding=`; protocol 2 from python 3 would wrap every image in a
# `_codecs.encode` global.
PICKLE_PROTOCOL = 4

_ALLOWED = "only lists, tuples, bytes, str, bool, int, float and numpy uint8/bool arrays are allowed"


class _Refused(Exception):
    """What the pickle asked for that the reader will not build (the unpickler never imports it)."""


class _NdarrayMarker:
    """Stands for `numpy.ndarray`, which numpy pickles only as the first argument of `_reconstruct`."""

    __slots__ = ()


_NDARRAY = _NdarrayMarker()
_DTYPES = {"u1": "uint8", "b1": "bool"}


def _text(value: object) -> str | None:
    if isinstance(value, bytes):  # python-2 str under encoding="bytes"
        value = value.decode("latin-1")
    return value if isinstance(value, str) else None


class _Dtype:
    """Stands for a `numpy.dtype` of uint8 or bool; `numpy.dtype(name, align, copy)` is how numpy pickles it."""

    __slots__ = ("name",)

    def __init__(self, name: object, align: object = False, copy: object = False) -> None:
        text = _text(name)
        if text not in _DTYPES:
            raise _Refused(f"a numpy dtype {short_repr(text or name)}")
        self.name = text

    def __setstate__(self, state: object) -> None:
        if not isinstance(state, tuple):
            raise _Refused("a numpy dtype with a malformed state")


class _Array:
    """Stands for a numpy uint8/bool array: its shape and raw bytes, filled by `__setstate__` or `_frombuffer`."""

    __slots__ = ("shape", "dtype", "data")

    def __init__(self) -> None:
        self.shape: tuple[int, ...] | None = None
        self.dtype: _Dtype | None = None
        self.data = b""

    def fill(self, shape: object, dtype: object, data: object) -> _Array:
        if self.shape is not None:
            raise _Refused("a numpy array set twice")
        if not isinstance(dtype, _Dtype):
            raise _Refused("a numpy array without a uint8/bool dtype")
        if not (
            isinstance(shape, tuple) and all(type(d) is int and d >= 0 for d in shape) and len(shape) <= 8
        ):
            raise _Refused(f"a numpy array of shape {short_repr(shape)}")
        if not isinstance(data, (bytes, bytearray)) or len(data) != math.prod(shape):
            raise _Refused(f"a numpy array of shape {shape} whose data is not {math.prod(shape)} bytes")
        self.shape, self.dtype, self.data = shape, dtype, bytes(data)
        return self

    def __setstate__(self, state: object) -> None:
        # ndarray.__reduce__ state: (version, shape, dtype, is_fortran, rawdata); version is absent in old numpy.
        if isinstance(state, tuple) and len(state) == 5:
            state = state[1:]
        if not (isinstance(state, tuple) and len(state) == 4 and isinstance(state[2], bool)):
            raise _Refused("a numpy array with a malformed state")
        shape, dtype, _, data = state
        self.fill(shape, dtype, data)


def _reconstruct(cls: object, shape: object, typecode: object) -> _Array:
    """Stands for `numpy.core.multiarray._reconstruct(numpy.ndarray, (0,), b"b")`, numpy's pickled array."""
    if cls is not _NDARRAY or shape != (0,) or _text(typecode) != "b":
        raise _Refused("numpy's _reconstruct with unexpected arguments")
    return _Array()


def _frombuffer(buffer: object, dtype: object, shape: object, order: object) -> _Array:
    """Stands for `numpy.core.numeric._frombuffer`, numpy's array at pickle protocol 5."""
    if _text(order) not in ("C", "F"):
        raise _Refused("numpy's _frombuffer with unexpected arguments")
    return _Array().fill(shape, dtype, buffer)


def _encode(text: object, encoding: object = "utf-8") -> bytes:
    """Stands for `_codecs.encode(str, "latin1")`: python 3 pickles `bytes` this way below protocol 3."""
    if not isinstance(text, str) or _text(encoding) not in ("latin1", "latin-1"):
        raise _Refused("_codecs.encode of something other than latin-1 text")
    return text.encode("latin-1")


def _stand_in(func: Callable[..., object]) -> object:
    """`func` as an immutable callable: a pickle's BUILD cannot set attributes on it (no __dict__, no slots)."""
    return type(
        f"_{func.__name__.strip('_')}_stand_in", (), {"__slots__": (), "__call__": staticmethod(func)}
    )()


_STAND_INS: dict[tuple[str, str], object] = {
    ("numpy.core.multiarray", "_reconstruct"): _stand_in(_reconstruct),  # numpy 1.x
    ("numpy._core.multiarray", "_reconstruct"): _stand_in(_reconstruct),  # numpy 2.x
    ("numpy.core.numeric", "_frombuffer"): _stand_in(_frombuffer),
    ("numpy._core.numeric", "_frombuffer"): _stand_in(_frombuffer),
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _stand_in(_Dtype),
    ("_codecs", "encode"): _stand_in(_encode),
}


class _SafeUnpickler(pickle.Unpickler):
    """An unpickler that imports nothing: a few numpy/codecs names map to the inert stand-ins above.

    Only stand-in callables, the ndarray marker and their `_Dtype`/`_Array` results are reachable, and the
    only state a pickle can give them goes through their checking `__setstate__`.
    """

    def find_class(self, module: str, name: str) -> object:
        try:
            return _STAND_INS[module, name]
        except KeyError:
            raise _Refused(f"the global {short_text(f'{module}.{name}')}") from None


def _safe_load(path: Path, data: bytes) -> object:
    """Unpickle `data` (python 2 str loaded as bytes) with no imports; one-line FembError naming `path`."""
    unpickler = _SafeUnpickler(io.BytesIO(data), encoding="bytes")
    try:
        return unpickler.load()
    except _Refused as err:
        raise FembError(f"{path}: refuses to load: the pickle names {err} ({_ALLOWED})") from None
    except EOFError:
        raise FembError(f"{path}: not a .bin verification set: the pickle is truncated") from None
    except (
        pickle.UnpicklingError,
        ValueError,
        TypeError,
        KeyError,
        IndexError,
        AttributeError,
        OverflowError,
    ) as err:
        # What the pickle machinery raises on corrupt streams (bad opcode, length, memo, call or state).
        reason = short_text(str(err), 120)
        raise FembError(f"{path}: not a .bin verification set: not a valid pickle ({reason})") from None
    except MemoryError:
        raise FembError(
            f"{path}: not a .bin verification set: the pickle declares an impossible size"
        ) from None


def _as_bytes(path: Path, index: int, item: object) -> bytes:
    if isinstance(item, bytes):
        return item
    if isinstance(item, bytearray):
        return bytes(item)
    if isinstance(item, _Array) and item.dtype is not None and item.shape is not None:
        # cv2.imencode returns an (N, 1) uint8 array: any shape with one axis longer than 1 is a byte string.
        if item.dtype.name == "u1" and sum(d > 1 for d in item.shape) <= 1:
            return item.data
        raise FembError(
            f"{path}: image {index} is a {_DTYPES[item.dtype.name]} array of shape {item.shape}, "
            "expected encoded image bytes"
        )
    if isinstance(item, str):
        try:
            return item.encode("latin-1")  # a python-2 str decoded as latin-1 maps back byte for byte
        except UnicodeEncodeError:
            raise FembError(
                f"{path}: image {index} is text with characters outside latin-1, not encoded image bytes"
            ) from None
    raise FembError(f"{path}: image {index} is {_kind(item)}, expected encoded image bytes")


def _kind(obj: object) -> str:
    return "an unfilled numpy array" if isinstance(obj, _Array) else type(obj).__name__


def read_bin(path: Path) -> tuple[list[bytes], list[bool]]:
    """Read an InsightFace .bin pair set `(bins, issame)` safely (no globals, python-2 str as bytes)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FembError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise FembError(f"{path}: is a directory, expected a .bin file") from None
    if not data:
        raise FembError(f"{path}: not a .bin verification set: the file is empty")
    obj = _safe_load(path, data)

    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        shape = f"a {len(obj)}-item {type(obj).__name__}" if isinstance(obj, (tuple, list)) else _kind(obj)
        raise FembError(f"{path}: not a .bin verification set: expected a pair (bins, issame), found {shape}")
    raw_bins, raw_issame = obj
    if not isinstance(raw_bins, (list, tuple)):
        raise FembError(f"{path}: bins is {_kind(raw_bins)}, expected a list of encoded images")
    if isinstance(raw_issame, _Array) and raw_issame.dtype is not None and raw_issame.shape is not None:
        if raw_issame.dtype.name != "b1" or len(raw_issame.shape) != 1:
            raise FembError(
                f"{path}: issame is a {_DTYPES[raw_issame.dtype.name]} array of shape {raw_issame.shape}, "
                "expected a list of bools"
            )
        raw_issame = [byte != 0 for byte in raw_issame.data]
    if not isinstance(raw_issame, (list, tuple)):
        raise FembError(f"{path}: issame is {_kind(raw_issame)}, expected a list of bools")
    bins = [_as_bytes(path, i, item) for i, item in enumerate(raw_bins)]
    for i, flag in enumerate(raw_issame):
        if not isinstance(flag, bool):
            raise FembError(f"{path}: issame[{i}] is {_kind(flag)} {short_repr(flag)}, expected a bool")
    issame = list(raw_issame)
    _check_counts(path, len(bins), len(issame))
    return bins, issame


def _check_counts(path: Path, num_images: int, num_pairs: int) -> None:
    if num_images == 0 and num_pairs == 0:
        raise FembError(f"{path}: the pair set is empty (no images, no pairs)")
    if num_images % 2:
        raise FembError(f"{path}: {num_images} images is an odd number; pairs need 2 images each")
    if num_pairs != num_images // 2:
        raise FembError(
            f"{path}: {num_images} images make {num_images // 2} pairs but issame has {num_pairs}"
        )


def write_bin(path: Path, images: Sequence[bytes], issame: Sequence[bool]) -> None:
    """Write a .bin pair set InsightFace's `load_bin` reads (pickle protocol 4), atomically (`femb.io`)."""
    path = Path(path)
    bins = [bytes(image) for image in images]
    flags = [bool(flag) for flag in issame]
    _check_counts(path, len(bins), len(flags))
    with atomic_path(path, sync=False) as tmp, open(tmp, "xb") as f:
        pickle.dump((bins, flags), f, protocol=PICKLE_PROTOCOL)
