"""The training stream over Parquet shards (docs/architecture.md "The data path"): seeded, sharded, equal batches.

Each epoch the row groups of all shards ("units") are shuffled with a generator seeded by (seed, epoch), the
same on every rank, and laid end to end into one stream of rows. Rank r takes rows [r*N, (r+1)*N) of that
stream, N = batches_per_rank * batch_size, and splits its range among its workers in whole batches. So every
rank yields exactly batches_per_rank = total_rows // (world_size * batch_size) batches (DDP needs equal counts),
no row is read twice in an epoch, and fewer than world_size * batch_size rows sit out, a different few each
epoch. A rank whose range cuts a row group reads that group and keeps its part: no wrap-around, no borrowing.
Within a worker a shuffle buffer (reservoir, as WebDataset's `shuffle`) mixes rows across row groups, which
matters because InsightFace records are sorted by identity. Batches are uint8 (`femb.data.decode.decode_batch`,
already mirrored where flipped); the LightningModule normalises them on the device.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice, repeat
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torch.utils.data.dataloader import _BaseDataLoaderIter

from femb.data.decode import IMAGE_SIZE, ImageDecodeError, decode_batch, image_batch
from femb.data.layout import (
    SHARD_COLUMNS,
    SHARD_GLOB,
    SHARD_NAME,
    manifest_path,
    read_manifest,
    shard_files,
    shard_name,
)
from femb.errors import FembError

DEFAULT_SHUFFLE_BUFFER = 8192  # rows per worker: ~60 MB of encoded 112x112 JPEGs, several row groups deep
_EXPECTED_TYPES = {
    "key": (pa.int64(),),
    "label": (pa.int64(),),
    "image": (pa.binary(), pa.large_binary()),
}
# Distinct first words keep the unit-order and per-worker generators apart (SeedSequence zero-pads entropy).
_ORDER_STREAM, _ROW_STREAM = 1, 2


class ShardError(FembError):
    """A bad shard, row or image; keeps its one-line message when a DataLoader worker re-raises it."""

    def __init__(self, message: str) -> None:
        # torch re-raises a worker's exception as type(exc)("Caught ... Original Traceback ...\n<type>: <msg>").
        if message.startswith(f"Caught {type(self).__name__}") and "\n" in message:
            message = message.rstrip().rsplit("\n", 1)[-1].split(": ", 1)[-1]
        super().__init__(message)


@dataclass(frozen=True)
class Unit:
    """One row group of one shard: the unit that the epoch shuffle moves around."""

    shard: int  # index into ShardStream.files
    row_group: int
    rows: int


def _check_schema(path: Path, schema: pa.Schema) -> None:
    for name in SHARD_COLUMNS:
        index = schema.get_field_index(name)
        if index < 0:
            raise ShardError(
                f"{path}: column '{name}' is missing (found {', '.join(schema.names) or 'none'}); "
                "expected key int64, label int64, image binary (written by `femb convert`)"
            )
        kind = schema.field(index).type
        if kind not in _EXPECTED_TYPES[name]:
            expected = " or ".join(str(t) for t in _EXPECTED_TYPES[name])
            raise ShardError(f"{path}: column '{name}' is {kind}, expected {expected}")


def _check_shard_set(shards_dir: Path, files: list[Path]) -> None:
    """Refuse a mix of shard sets (stale shards of an earlier convert would silently join the data)."""
    totals: dict[int, set[int]] = {}
    for path in files:
        match = SHARD_NAME.fullmatch(path.name)
        if match:
            totals.setdefault(int(match.group(2)), set()).add(int(match.group(1)))
    if len(totals) > 1:
        sets = ", ".join(f"-of-{total:05d}" for total in sorted(totals))
        raise ShardError(f"{shards_dir}: holds shards of different sets ({sets}); remove the stale ones")
    for total, indices in totals.items():
        missing = sorted(set(range(total)) - indices)
        if missing:
            raise ShardError(
                f"{shards_dir}: shard {shard_name(missing[0], total)} is missing "
                f"({total - len(indices)} of {total} absent)"
            )


def scan_shards(shards_dir: Path | str) -> tuple[list[Path], list[Unit]]:
    """List the train shards of a directory and their row groups from Parquet metadata, checking the schema."""
    shards_dir = Path(shards_dir)
    if not shards_dir.is_dir():
        raise ShardError(
            f"{shards_dir}: shard directory does not exist (run `femb convert SRC {shards_dir}`)"
        )
    files = shard_files(shards_dir)
    if not files:
        raise ShardError(f"{shards_dir}: no {SHARD_GLOB} shards in this directory (run `femb convert`)")
    _check_shard_set(shards_dir, files)
    units = []
    for shard, path in enumerate(files):
        try:
            metadata = pq.read_metadata(path)
            schema = metadata.schema.to_arrow_schema()
        except (OSError, pa.ArrowException) as exc:
            raise ShardError(f"{path}: not a readable Parquet file ({exc})") from exc
        _check_schema(path, schema)
        for row_group in range(metadata.num_row_groups):
            rows = metadata.row_group(row_group).num_rows
            if rows > 0:
                units.append(Unit(shard, row_group, rows))
    return files, units


def read_num_classes(shards_dir: Path | str) -> int:
    """The number of identities: the manifest's num_classes, checked against the labels' Parquet statistics."""
    shards_dir = Path(shards_dir)
    files, _ = scan_shards(shards_dir)
    low, high = None, None
    for path in files:
        metadata = pq.read_metadata(path)
        column = metadata.schema.to_arrow_schema().get_field_index("label")
        for row_group in range(metadata.num_row_groups):
            stats = metadata.row_group(row_group).column(column).statistics
            if stats is None or not stats.has_min_max:
                continue
            low = stats.min if low is None else min(low, stats.min)
            high = stats.max if high is None else max(high, stats.max)
    if low is not None and low < 0:
        raise ShardError(f"{shards_dir}: labels must be >= 0, found {low}")
    manifest = read_manifest(shards_dir)
    if manifest is not None:
        path = manifest_path(shards_dir)
        if "num_classes" not in manifest:
            raise ShardError(f"{path}: no num_classes")
        num_classes = manifest["num_classes"]
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ShardError(f"{path}: num_classes must be a positive integer, got {num_classes!r}")
        if high is not None and high >= num_classes:
            raise ShardError(f"{shards_dir}: label {high} is out of range for num_classes {num_classes}")
        return num_classes
    if high is None:
        raise ShardError(f"{shards_dir}: no manifest and no label statistics to count classes from")
    return high + 1


def _check_int(name: str, value: int, low: int, high: int | None = None) -> None:
    if (
        not isinstance(value, (int, np.integer))
        or isinstance(value, bool)
        or value < low
        or (high is not None and value > high)
    ):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise FembError(f"{name} must be an integer {bound}, got {value!r}")


def _share(batches: int, worker: int, num_workers: int) -> int:
    """How many of the first `batches` batches come from `worker` when batch b comes from worker b % W."""
    return max(0, -(-(batches - worker) // num_workers))


class ShardStream(IterableDataset):
    """Batches of (images uint8 B x 3 x S x S, labels int64 B[, keys int64 B]) for one rank, seeded per epoch."""

    def __init__(
        self,
        shards_dir: Path | str,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
        flip: bool = True,
        image_size: int = IMAGE_SIZE,
        return_keys: bool = False,
    ) -> None:
        _check_int("batch_size", batch_size, 1)
        _check_int("seed", seed, 0)
        _check_int("world_size", world_size, 1)
        _check_int("rank", rank, 0, world_size - 1)
        _check_int("shuffle_buffer", shuffle_buffer, 0)
        _check_int("image_size", image_size, 1)
        self.shards_dir = Path(shards_dir)
        self.files, self.units = scan_shards(self.shards_dir)
        self.num_rows = sum(unit.rows for unit in self.units)
        if self.num_rows < world_size * batch_size:
            raise ShardError(
                f"{self.shards_dir}: {self.num_rows} rows are fewer than world_size * batch_size "
                f"= {world_size} * {batch_size}; lower batch_size"
            )
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle_buffer = shuffle_buffer
        self.flip = flip
        self.image_size = image_size
        self.return_keys = return_keys
        self.batches_per_rank = self.num_rows // (world_size * batch_size)
        # Workers read the epoch from shared memory when their iterator starts, so set_epoch reaches
        # persistent workers too (each keeps its own pickled or forked copy of everything else).
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()
        self._next_epoch = 0
        # (epoch, batches): the iterator of that epoch starts this many batches in (exact resume).
        self._resume = torch.tensor([-1, 0], dtype=torch.int64).share_memory_()

    def __len__(self) -> int:
        return self.batches_per_rank

    @property
    def epoch(self) -> int:
        """The epoch that the current (or next, if none is running) iterator shuffles by."""
        return int(self._epoch[0])

    def set_epoch(self, epoch: int) -> None:
        """Shuffle the next iteration as epoch `epoch` (as DistributedSampler.set_epoch); later ones count on."""
        _check_int("epoch", epoch, 0)
        self._next_epoch = epoch
        self._epoch[0] = epoch

    def resume(self, epoch: int, batches_done: int) -> None:
        """Make the next iterator epoch `epoch`, starting after its first `batches_done` batches.

        The skipped batches are never decoded, but their rows and random flips are drawn as before, so
        the batches that follow are exactly those an uninterrupted run would have seen.
        """
        _check_int("batches_done", batches_done, 0, self.batches_per_rank)
        self.set_epoch(epoch)
        self._resume[0], self._resume[1] = epoch, batches_done

    def batches_skipped(self, epoch: int) -> int:
        """How many batches of `epoch` a resumed iterator leaves out (0 unless resume() named that epoch)."""
        return int(self._resume[1]) if int(self._resume[0]) == epoch else 0

    def worker_skip(self, epoch: int, worker: int, num_workers: int) -> int:
        """Of the skipped batches, those of worker `worker`: the DataLoader takes batch b from worker b % W."""
        return _share(self.batches_skipped(epoch), worker, num_workers)

    def start_epoch(self) -> int:
        """Take the next epoch number for a new iterator (ShardLoader calls this from __iter__)."""
        epoch = self._next_epoch
        self._epoch[0] = epoch
        self._next_epoch = epoch + 1
        return epoch

    def worker_batches(self, worker: int, num_workers: int) -> int:
        """Batches that worker `worker` of `num_workers` yields: the rank's count split as evenly as possible."""
        base, extra = divmod(self.batches_per_rank, num_workers)
        return base + (worker < extra)

    def unit_order(self, epoch: int) -> np.ndarray:
        """The epoch's order of units, identical on every rank and worker."""
        rng = np.random.default_rng([_ORDER_STREAM, self.seed, epoch])
        return rng.permutation(len(self.units))

    def worker_slices(self, epoch: int, worker: int, num_workers: int) -> list[tuple[int, int, int]]:
        """(unit, first row, end row) pieces that make up this worker's rows of the epoch, in stream order."""
        base, extra = divmod(self.batches_per_rank, num_workers)
        batches_before = worker * base + min(worker, extra)
        start = (self.rank * self.batches_per_rank + batches_before) * self.batch_size
        stop = start + self.worker_batches(worker, num_workers) * self.batch_size
        order = self.unit_order(epoch)
        ends = np.cumsum([self.units[u].rows for u in order])
        slices = []
        position = int(np.searchsorted(ends, start, side="right"))
        while start < stop:
            unit = int(order[position])
            unit_start = int(ends[position]) - self.units[unit].rows
            end = min(stop, int(ends[position]))
            slices.append((unit, start - unit_start, end - unit_start))
            start = end
            position += 1
        return slices

    def _rows(self, slices: list[tuple[int, int, int]]) -> Iterator[list[tuple[int, int, bytes, int]]]:
        """Rows (key, label, image bytes, shard) of each slice, one list per row group read."""
        readers: dict[int, pq.ParquetFile] = {}
        try:
            for unit_index, lo, hi in slices:
                unit = self.units[unit_index]
                path = self.files[unit.shard]
                if unit.shard not in readers:
                    readers[unit.shard] = pq.ParquetFile(path)
                try:
                    table = readers[unit.shard].read_row_group(unit.row_group, columns=list(SHARD_COLUMNS))
                except (OSError, pa.ArrowException) as exc:
                    raise ShardError(f"{path}: row group {unit.row_group} cannot be read ({exc})") from exc
                if table.num_rows != unit.rows:
                    raise ShardError(f"{path}: row group {unit.row_group} changed while training; re-scan")
                table = table.slice(lo, hi - lo)
                for name in SHARD_COLUMNS:
                    if table.column(name).null_count:
                        raise ShardError(f"{path}: row group {unit.row_group} has null values in '{name}'")
                keys = table.column("key").to_numpy().tolist()
                labels = table.column("label").to_numpy().tolist()
                images = table.column("image").to_pylist()
                yield list(zip(keys, labels, images, repeat(unit.shard)))
        finally:
            for reader in readers.values():
                reader.close()

    def _shuffled(
        self, slices: list[tuple[int, int, int]], rng: np.random.Generator
    ) -> Iterator[tuple[int, int, bytes, int]]:
        """The worker's rows through a reservoir of shuffle_buffer rows; each row comes out exactly once."""
        capacity = min(self.shuffle_buffer, sum(hi - lo for _, lo, hi in slices))
        reservoir: list[tuple[int, int, bytes, int]] = []
        for rows in self._rows(slices):
            if capacity <= 1:
                yield from rows
                continue
            fill = min(len(rows), capacity - len(reservoir))
            reservoir.extend(rows[:fill])
            rows = rows[fill:]
            for row, slot in zip(rows, rng.integers(0, capacity, size=len(rows)).tolist()):
                yield reservoir[slot]
                reservoir[slot] = row
        for slot in rng.permutation(len(reservoir)).tolist():
            yield reservoir[slot]

    def _batch(self, rows: list[tuple[int, int, bytes, int]], rng: np.random.Generator) -> tuple:
        flip = rng.random(len(rows)) < 0.5 if self.flip else None
        keys, labels, encoded, shards = zip(*rows)
        # In a worker, decode straight into shared memory: the queue would otherwise copy the batch there.
        out = image_batch(len(rows), self.image_size, shared=get_worker_info() is not None)
        try:
            images = decode_batch(encoded, self.image_size, flip, out)
        except ImageDecodeError as exc:
            raise ShardError(f"{self.files[shards[exc.index]]}: key {keys[exc.index]}: {exc.reason}") from exc
        labels = torch.tensor(labels, dtype=torch.int64)
        if self.return_keys:
            return images, labels, torch.tensor(keys, dtype=torch.int64)
        return images, labels

    def __iter__(self) -> Iterator[tuple]:
        info = get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        return self._batches(self.epoch, worker, num_workers)  # the epoch is fixed now, not at first next()

    def _batches(self, epoch: int, worker: int, num_workers: int) -> Iterator[tuple]:
        slices = self.worker_slices(epoch, worker, num_workers)
        rng = np.random.default_rng([_ROW_STREAM, self.seed, epoch, self.rank, worker])
        skip = self.worker_skip(epoch, worker, num_workers)
        rows = self._shuffled(slices, rng)
        while len(batch := list(islice(rows, self.batch_size))) == self.batch_size:
            if skip > 0:
                skip -= 1
                if self.flip:
                    rng.random(len(batch))  # the flips this batch would have drawn
            else:
                yield self._batch(batch, rng)


class ShardLoader(DataLoader):
    """A DataLoader over a ShardStream whose every new iterator is the next epoch (new unit and row order).

    Lightning's `set_epoch` only reaches a map-style sampler, never an IterableDataset, and it creates one
    iterator per epoch, so counting iterators keeps Lightning's epochs and ours in step. Call
    `loader.dataset.set_epoch(e)` to pin the number (e.g. when resuming or rebuilding the loader).
    """

    dataset: ShardStream

    def __iter__(self) -> Iterator[tuple]:
        epoch = self.dataset.start_epoch()
        batches = super().__iter__()
        skipped = self.dataset.batches_skipped(epoch)
        if self.num_workers <= 1 or skipped % self.num_workers == 0:
            return batches
        return self._in_epoch_order(batches, skipped)

    def _in_epoch_order(self, batches: _BaseDataLoaderIter, skipped: int) -> Iterator[tuple]:
        """Yield a resumed epoch's batches in the uninterrupted order: batch b comes from worker b % W.

        A new DataLoader iterator always asks worker 0 first; after skipping a number of batches that
        is not a multiple of W, the next batch belongs to another worker, so hold at most W-1 batches back.
        """
        workers = self.num_workers
        left = [self.dataset.worker_batches(w, workers) - _share(skipped, w, workers) for w in range(workers)]
        emitted = [0] * workers

        def arrival_order() -> Iterator[int]:
            while any(emitted[w] < left[w] for w in range(workers)):
                for w in range(workers):
                    if emitted[w] < left[w]:
                        emitted[w] += 1
                        yield w

        arrivals = arrival_order()
        held: list[deque] = [deque() for _ in range(workers)]
        for b in range(skipped, self.dataset.batches_per_rank):
            wanted = b % workers
            while not held[wanted]:
                held[next(arrivals)].append(next(batches))
            yield held[wanted].popleft()


def _init_worker(worker_id: int) -> None:
    torch.set_num_threads(1)  # each worker is one decode core; intra-op threads would only oversubscribe


def make_train_loader(
    shards_dir: Path | str,
    batch_size: int,
    num_workers: int,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
    flip: bool = True,
    *,
    pin_memory: bool = False,
    prefetch_factor: int = 2,
    image_size: int = IMAGE_SIZE,
    return_keys: bool = False,
    multiprocessing_context: str | None = None,
) -> DataLoader:
    """The training DataLoader of one rank: batches_per_rank batches of (images, labels[, keys]) per epoch."""
    _check_int("num_workers", num_workers, 0)
    _check_int("prefetch_factor", prefetch_factor, 1)
    stream = ShardStream(
        shards_dir,
        batch_size,
        seed=seed,
        rank=rank,
        world_size=world_size,
        shuffle_buffer=shuffle_buffer,
        flip=flip,
        image_size=image_size,
        return_keys=return_keys,
    )
    workers = {}
    if num_workers > 0:
        workers = {
            "persistent_workers": True,
            "prefetch_factor": prefetch_factor,
            "worker_init_fn": _init_worker,
            "multiprocessing_context": multiprocessing_context,
        }
    return ShardLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory, **workers)
