"""Five-point landmark files: which five points (`femb.data.align.POINTS`) lie where in each loose photo.

Two layouts are read (docs/architecture.md "Image sources"):

- lines `name x1 y1 x2 y2 x3 y3 x4 y4 x5 y5 [score]`, separated by spaces or tabs: the IJB release's
  `<name>_name_5pts_score.txt`, and what RetinaFace/SCRFD scripts usually print;
- a CSV with a header row whose first column is the image name, the next ten the coordinates and an
  optional eleventh the detector score.

A photo is looked up by its path relative to the dataset root (`id/img.jpg`), or else by its bare file
name when the file lists bare names (the IJB files do); two photos of one bare name then share a row,
so such a file suits sources whose file names are unique.
"""

from __future__ import annotations

import csv
import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from femb.errors import FembError


@dataclass
class Landmarks:
    """The five points (and detector score) of each photo a landmark file lists."""

    path: Path
    points: dict[str, np.ndarray]  # name -> (5, 2) float64, in the photo's pixels
    scores: dict[str, float]
    sha256: str
    _by_file_name: dict[str, str] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for name in self.points:
            if "/" not in name:  # a bare file name stands for any photo of that name, when only one has it
                self._by_file_name[name] = name

    def __len__(self) -> int:
        return len(self.points)

    def lookup(self, name: str) -> np.ndarray | None:
        """The points of the photo at relative path `name`, or of its bare file name; None if absent."""
        found = self.points.get(name)
        if found is None and (bare := self._by_file_name.get(PurePosixPath(name).name)) is not None:
            found = self.points[bare]
        return found


def _row(path: Path, line: int, fields: list[str]) -> tuple[str, np.ndarray, float | None]:
    if len(fields) not in (11, 12):
        raise FembError(
            f"{path}:{line}: expected `name x1 y1 ... x5 y5 [score]` (11 or 12 fields), got {len(fields)}"
        )
    name = fields[0].strip().replace("\\", "/")
    try:
        values = [float(v) for v in fields[1:]]
    except ValueError:
        raise FembError(f"{path}:{line}: the coordinates and score must be numbers") from None
    if not all(np.isfinite(values)):
        raise FembError(f"{path}:{line}: a coordinate or score of {name} is not finite")
    points = np.asarray(values[:10], dtype=np.float64).reshape(5, 2)
    return name, points, (values[10] if len(values) == 11 else None)


def read_landmarks(path: Path | str) -> Landmarks:
    """Read a landmark file in either layout; any malformed line is a FembError naming the file and line."""
    path = Path(path)
    try:
        data = path.read_bytes()
        text = data.decode("utf-8-sig")
    except OSError as err:
        raise FembError(f"{path}: cannot read the landmarks file ({err.strerror or err})") from None
    except UnicodeDecodeError:
        raise FembError(f"{path}: the landmarks file is not UTF-8 text") from None
    lines = text.splitlines()
    first = next((s for s in lines if s.strip()), "")
    rows: list[tuple[int, list[str]]]
    if "," in first:  # CSV: the first row is the header
        reader = csv.reader(io.StringIO(text))
        rows = [(n, r) for n, r in enumerate(reader, start=1) if any(c.strip() for c in r)][1:]
    else:
        rows = [(n, s.split()) for n, s in enumerate(lines, start=1) if s.strip() and not s.startswith("#")]
    points: dict[str, np.ndarray] = {}
    scores: dict[str, float] = {}
    for line, fields in rows:
        name, five, score = _row(path, line, fields)
        if name in points:
            raise FembError(f"{path}:{line}: a second row for {name}")
        points[name] = five
        if score is not None:
            scores[name] = score
    if not points:
        raise FembError(f"{path}: the landmarks file lists no image")
    return Landmarks(path, points, scores, hashlib.sha256(data).hexdigest())
