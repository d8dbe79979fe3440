"""The .bin reader loads InsightFace pair sets (python 2 and 3) and never runs code from the pickle."""

from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path

import pytest

from femb.data.binfile import read_bin, write_bin
from femb.errors import FembError

IMAGES = [b"\xff\xd8jpeg-%d\xff\xd9" % i + bytes(range(256)) for i in range(6)]
ISSAME = [True, False, True]


def _py2_pickle(bins: list[bytes], issame: list[bool]) -> bytes:
    """The bytes python 2's `pickle.dump((bins, issame), f, protocol=2)` writes: images as py2 `str`."""
    out = [b"\x80\x02", b"]q\x00(" if bins else b"]q\x00"]
    for data in bins:
        if len(data) < 256:
            out.append(b"U" + bytes([len(data)]) + data)  # SHORT_BINSTRING
        else:
            out.append(b"T" + struct.pack("<i", len(data)) + data)  # BINSTRING
    if bins:
        out.append(b"e")  # APPENDS
    out.append(b"]q\x01(" + b"".join(b"\x88" if s else b"\x89" for s in issame) + b"e")
    out.append(b"\x86q\x02.")  # TUPLE2, BINPUT, STOP
    return b"".join(out)


class _RunsShell:
    """An object whose unpickling would call os.system (the classic malicious pickle)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (self.command,))


def test_write_then_read_round_trips_images_and_flags(tmp_path: Path) -> None:
    path = tmp_path / "lfw.bin"
    write_bin(path, IMAGES, ISSAME)
    assert read_bin(path) == (IMAGES, ISSAME)
    assert [p.name for p in tmp_path.iterdir()] == ["lfw.bin"]  # no temporary file left behind


def test_written_file_loads_with_insightface_plain_pickle_load(tmp_path: Path) -> None:
    path = tmp_path / "lfw.bin"
    write_bin(path, IMAGES, ISSAME)
    assert path.read_bytes()[:2] == b"\x80\x04"  # protocol 4: bytes stored natively, no globals
    with open(path, "rb") as f:
        bins, issame = pickle.load(f)  # what InsightFace's load_bin does first
    assert (bins, issame) == (IMAGES, ISSAME)


def test_reads_python2_protocol2_pickle_with_str_images(tmp_path: Path) -> None:
    path = tmp_path / "agedb_30.bin"
    path.write_bytes(_py2_pickle(IMAGES, ISSAME))
    with open(path, "rb") as f, pytest.raises(UnicodeDecodeError):
        pickle.load(f)  # proves the fixture really is a python-2 str pickle
    bins, issame = read_bin(path)
    assert bins == IMAGES
    assert all(type(b) is bytes for b in bins)
    assert issame == ISSAME


def test_accepts_bytearray_and_latin1_str_images_and_tuples(tmp_path: Path) -> None:
    path = tmp_path / "mixed.bin"
    bins = (bytearray(IMAGES[0]), IMAGES[1].decode("latin-1"))
    path.write_bytes(pickle.dumps((bins, (False,)), protocol=5))
    assert read_bin(path) == ([IMAGES[0], IMAGES[1]], [False])


def test_refuses_pickle_that_would_run_a_shell_command(tmp_path: Path) -> None:
    sentinel = tmp_path / "SENTINEL"
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(([_RunsShell(f"touch {sentinel}")], [True]), protocol=2))
    with pytest.raises(FembError) as err:
        read_bin(path)
    message = str(err.value)
    assert message.startswith(f"{path}: refuses to load")
    assert f"{os.system.__module__}.system" in message
    assert "\n" not in message
    assert not sentinel.exists()


def test_refuses_every_global_even_a_harmless_builtin(tmp_path: Path) -> None:
    path = tmp_path / "complex.bin"
    path.write_bytes(pickle.dumps((IMAGES[:2], [True], 1j), protocol=4))  # complex has no opcode of its own
    with pytest.raises(
        FembError, match=r"complex.bin: refuses to load: the pickle names the global builtins\.complex "
    ):
        read_bin(path)


def _py2_numpy_uint8(data: bytes) -> bytes:
    """Python 2's protocol-2 pickle of `cv2.imencode(...)[1]`, an (N, 1) uint8 numpy 1.x array."""
    return b"".join(
        [
            b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85U\x01b\x87R",
            b"(K\x01J" + struct.pack("<i", len(data)) + b"K\x01\x86",  # version 1, shape (N, 1)
            b"cnumpy\ndtype\nU\x02u1K\x00K\x01\x87R",
            b"(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb",  # dtype state
            b"\x89T" + struct.pack("<i", len(data)) + data + b"tb",  # not fortran, raw data as py2 str
        ]
    )


def test_reads_python2_pickle_of_cv2_imencode_arrays(tmp_path: Path) -> None:
    path = tmp_path / "cfp_fp.bin"
    images = b"".join(_py2_numpy_uint8(image) for image in IMAGES[:4])
    path.write_bytes(b"\x80\x02](" + images + b"e](\x88\x89e\x86.")
    assert read_bin(path) == (IMAGES[:4], [True, False])


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_reads_numpy_uint8_images_and_bool_flags_from_python3(tmp_path: Path, protocol: int) -> None:
    numpy = pytest.importorskip("numpy")
    path = tmp_path / "numpy.bin"
    bins = [numpy.frombuffer(image, numpy.uint8).reshape(-1, 1) for image in IMAGES]
    path.write_bytes(pickle.dumps((bins, numpy.array(ISSAME)), protocol=protocol))
    assert read_bin(path) == (IMAGES, ISSAME)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (
            lambda np: ([np.zeros(4, np.float32)] * 2, [True]),
            "refuses to load: the pickle names a numpy dtype 'f4'",
        ),
        (
            lambda np: ([np.zeros((4, 4, 3), np.uint8)] * 2, [True]),
            "image 0 is a uint8 array of shape (4, 4, 3)",
        ),
        (lambda np: (IMAGES[:2], np.array([1], np.uint8)), "issame is a uint8 array of shape (1,)"),
        (lambda np: (IMAGES[:2], [np.True_]), r"refuses to load: the pickle names the global numpy."),
    ],
    ids=["float-array", "pixel-array", "uint8-issame", "numpy-scalar"],
)
def test_refuses_numpy_content_other_than_byte_strings_and_bool_flags(
    tmp_path: Path, build, message: str
) -> None:
    numpy = pytest.importorskip("numpy")
    path = tmp_path / "numpy.bin"
    path.write_bytes(pickle.dumps(build(numpy), protocol=4))
    with pytest.raises(FembError) as err:
        read_bin(path)
    assert str(err.value).startswith(f"{path}: ")
    assert message in str(err.value)


def test_stand_ins_cannot_be_modified_by_the_pickle(tmp_path: Path) -> None:
    path = tmp_path / "build.bin"
    # BUILD {"__init__": ...} on the numpy.dtype stand-in, then use it: must fail before anything else.
    path.write_bytes(b"\x80\x02cnumpy\ndtype\n}X\x08\x00\x00\x00__init__K\x01sb]](\x88e\x86.")
    with pytest.raises(FembError, match="build.bin: not a .bin verification set: not a valid pickle"):
        read_bin(path)


def test_stand_ins_refuse_arguments_numpy_would_never_pickle(tmp_path: Path) -> None:
    path = tmp_path / "codec.bin"
    # _codecs.encode("...", "rot13"): the codecs stand-in only turns latin-1 text into bytes.
    path.write_bytes(b"\x80\x02]c_codecs\nencode\nX\x01\x00\x00\x00xX\x05\x00\x00\x00rot13\x86Ra]\x88a\x86.")
    with pytest.raises(
        FembError, match="refuses to load: the pickle names _codecs.encode of something other"
    ):
        read_bin(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "the file is empty"),
        (b"This is not a pickle\n", "not a valid pickle"),
        (pickle.dumps((IMAGES, ISSAME), protocol=4)[:-300], "truncated"),
        (pickle.dumps({"bins": IMAGES, "issame": ISSAME}), "expected a pair (bins, issame), found dict"),
        (pickle.dumps((IMAGES, ISSAME, None)), "expected a pair (bins, issame), found a 3-item tuple"),
        (pickle.dumps((b"".join(IMAGES), ISSAME)), "bins is bytes, expected a list of encoded images"),
        (pickle.dumps((IMAGES, "TFT")), "issame is str, expected a list of bools"),
        (pickle.dumps((IMAGES[:5] + [7], ISSAME)), "image 5 is int, expected encoded image bytes"),
        (pickle.dumps((IMAGES, [True, 1, False])), "issame[1] is int 1, expected a bool"),
        (pickle.dumps((IMAGES[:5], ISSAME)), "5 images is an odd number"),
        (pickle.dumps((IMAGES, ISSAME[:2])), "6 images make 3 pairs but issame has 2"),
        (pickle.dumps(([], [])), "the pair set is empty"),
    ],
    ids=[
        "empty-file",
        "not-a-pickle",
        "truncated",
        "dict",
        "three-tuple",
        "bins-not-list",
        "issame-not-list",
        "image-not-bytes",
        "flag-not-bool",
        "odd-images",
        "count-mismatch",
        "no-pairs",
    ],
)
def test_malformed_file_raises_one_line_error_naming_file(
    tmp_path: Path, content: bytes, message: str
) -> None:
    path = tmp_path / "bad.bin"
    path.write_bytes(content)
    with pytest.raises(FembError) as err:
        read_bin(path)
    text = str(err.value)
    assert text.startswith(f"{path}: ")
    assert message in text
    assert "\n" not in text


def test_missing_file_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(FembError, match="nope.bin: no such file"):
        read_bin(tmp_path / "nope.bin")


def test_write_refuses_unpaired_images_and_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(FembError, match="out.bin: 6 images make 3 pairs but issame has 1"):
        write_bin(tmp_path / "out.bin", IMAGES, [True])
    assert list(tmp_path.iterdir()) == []
