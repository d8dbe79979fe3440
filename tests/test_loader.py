"""The streaming training loader: uint8 decode fidelity, epoch coverage, equal batches per rank, seeding, errors."""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import lightning as L
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from femb.data.decode import decode_batch, decode_rgb, normalize
from femb.data.layout import shard_name, write_manifest
from femb.data.loader import ShardStream, make_train_loader, read_num_classes
from femb.errors import FembError

SIZE = 112
SCHEMA = pa.schema([("key", pa.int64()), ("label", pa.int64()), ("image", pa.binary())])


def _image(key: int) -> np.ndarray:
    """A left-right asymmetric picture with full 0..255 range, different for every key."""
    rng = np.random.default_rng(key)
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    base = np.stack([x * 255 / (SIZE - 1), y * 255 / (SIZE - 1), (x + y) * 255 / (2 * SIZE - 2)], axis=-1)
    base[:, : 10 + key % 40] = rng.uniform(0, 255, 3)  # a block on the left only: never mirror-symmetric
    base += rng.normal(0, 8, base.shape)
    return np.clip(base, 0, 255).astype(np.uint8)


def _encode(pixels: np.ndarray, fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def write_shards(
    out: Path,
    shard_rows: list[int],
    row_group_size: int = 16,
    num_classes: int = 7,
    encode=_encode,
    schema: pa.Schema = SCHEMA,
) -> dict[int, bytes]:
    """Shards in `femb convert`'s layout; keys start at 1 as InsightFace records do. Returns key -> bytes."""
    out.mkdir(parents=True, exist_ok=True)
    images: dict[int, bytes] = {}
    key = 1
    for index, rows in enumerate(shard_rows):
        keys = list(range(key, key + rows))
        key += rows
        for k in keys:
            images[k] = encode(_image(k))
        table = pa.table(
            {
                "key": pa.array(keys, pa.int64()),
                "label": pa.array([k % num_classes for k in keys], pa.int64()),
                "image": pa.array([images[k] for k in keys], pa.binary()),
            }
        ).cast(schema)
        name = shard_name(index, len(shard_rows))
        pq.write_table(table, out / name, row_group_size=row_group_size, compression="none")
    write_manifest(out, {"num_classes": num_classes, "num_images": key - 1, "shards": []})
    return images


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, bytes]]:
    """Two shards of uneven size: row groups of 16, 16, 5 and 16 x 5, 11 rows (128 rows in all)."""
    out = tmp_path_factory.mktemp("shards")
    return out, write_shards(out, [37, 91])


def _epoch(loader) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    keys, images, labels = [], [], []
    for batch_images, batch_labels, batch_keys in loader:
        keys += batch_keys.tolist()
        images.append(batch_images)
        labels.append(batch_labels)
    return keys, torch.cat(images), torch.cat(labels)


def _pil_decode(data: bytes) -> torch.Tensor:
    """RGB uint8 3 x H x W as PIL decodes it."""
    return torch.from_numpy(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).transpose(2, 0, 1).copy())


def _arcface_normalised(images: torch.Tensor) -> torch.Tensor:
    """arcface_torch's ToTensor + Normalize(0.5, 0.5) in float32: (x/255 - 0.5)/0.5."""
    return (images.float() / 255 - 0.5) / 0.5


def test_batches_are_uint8_nchw_rgb_with_int64_labels(shards):
    out, _ = shards
    loader = make_train_loader(out, batch_size=8, num_workers=0)
    batches = list(loader)
    assert len(batches) == len(loader) == 128 // 8
    images, labels = batches[0]
    assert images.dtype == torch.uint8 and images.shape == (8, 3, SIZE, SIZE)
    assert labels.dtype == torch.int64 and labels.shape == (8,)
    everything = torch.cat([b[0] for b in batches])
    assert everything.min() < 5 and everything.max() > 250  # the pictures span the full range


def test_normalized_batches_equal_the_arcface_float_pipeline_exactly(shards):
    out, _ = shards
    for images, _ in make_train_loader(out, batch_size=16, num_workers=0):
        normalised = normalize(images)
        assert normalised.dtype == torch.float32 and normalised.is_contiguous()
        assert torch.equal(normalised, _arcface_normalised(images))
        assert torch.equal(normalize(images, torch.bfloat16), normalised.to(torch.bfloat16))


def test_decoded_pixels_match_pil_decode_and_labels_match_keys(shards):
    out, images = shards
    keys, decoded, labels = _epoch(make_train_loader(out, 16, 0, flip=False, return_keys=True))
    worst = max(
        (decoded[i].int() - _pil_decode(images[k]).int()).abs().max().item() for i, k in enumerate(keys)
    )
    assert worst <= 2  # at most two 8-bit levels apart (IDCT rounding may differ)
    assert labels.tolist() == [k % 7 for k in keys]


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_mirrored_decode_is_the_mirror_of_the_plain_decode(fmt):
    data = _encode(_image(3), fmt)
    plain = decode_rgb(data)
    assert np.array_equal(decode_rgb(data, mirror=True), plain[:, ::-1])
    flip = np.array([True, False, True])
    batch = decode_batch([data] * 3, flip=flip)
    assert torch.equal(batch[0], torch.from_numpy(plain[:, ::-1].transpose(2, 0, 1).copy()))
    assert torch.equal(batch[1], torch.from_numpy(plain.transpose(2, 0, 1).copy()))


def test_flip_gives_the_exact_mirror_of_the_unflipped_decode(shards):
    out, _ = shards
    keys, plain, _ = _epoch(make_train_loader(out, 16, 0, flip=False, return_keys=True))
    by_key = dict(zip(keys, plain))
    keys, flipped, _ = _epoch(make_train_loader(out, 16, 0, flip=True, return_keys=True))
    mirrored = 0
    for key, image in zip(keys, flipped):
        if torch.equal(image, by_key[key].flip(-1)):
            mirrored += 1
        else:
            assert torch.equal(image, by_key[key]), f"key {key} is neither the decode nor its mirror"
    assert 0 < mirrored < len(keys)


def test_png_rows_decode_losslessly_through_the_pil_fallback(tmp_path):
    write_shards(tmp_path, [20], encode=lambda pixels: _encode(pixels, "PNG"))
    keys, decoded, _ = _epoch(make_train_loader(tmp_path, 4, 0, flip=False, return_keys=True))
    for key, image in zip(keys, decoded):
        assert torch.equal(image, torch.from_numpy(_image(key)).permute(2, 0, 1))


def test_one_epoch_visits_every_row_at_most_once(tmp_path):
    images = write_shards(tmp_path, [37, 91, 9])  # 137 rows: 17 batches of 8, one row sits out
    keys, _, _ = _epoch(make_train_loader(tmp_path, 8, 0, return_keys=True, shuffle_buffer=20))
    assert len(keys) == 17 * 8 == len(set(keys))
    assert set(keys) <= set(images) and len(images) - len(keys) < 8


@pytest.mark.parametrize(("world_size", "batch_size"), [(2, 8), (3, 5)])
def test_ranks_get_equal_batch_counts_and_disjoint_rows_from_uneven_units(shards, world_size, batch_size):
    out, images = shards
    per_rank = [
        _epoch(make_train_loader(out, batch_size, 0, rank=r, world_size=world_size, return_keys=True))[0]
        for r in range(world_size)
    ]
    expected = len(images) // (world_size * batch_size) * batch_size
    assert [len(keys) for keys in per_rank] == [expected] * world_size
    union = [k for keys in per_rank for k in keys]
    assert len(union) == len(set(union))  # no row on two ranks, none twice on one
    assert len(images) - len(union) < world_size * batch_size


def test_rank_and_worker_pieces_tile_the_epoch_stream_in_whole_batches(tmp_path):
    """For many unit layouts, the rows of all (rank, worker) pairs are the stream's first rows, each once."""
    rng = np.random.default_rng(0)
    for trial in range(25):
        out = tmp_path / str(trial)
        out.mkdir()
        sizes = rng.integers(1, 60, size=rng.integers(1, 4)).tolist()
        key = 0
        for index, rows in enumerate(sizes):
            table = pa.table(
                {"key": range(key, key + rows), "label": [0] * rows, "image": [b""] * rows}, SCHEMA
            )
            pq.write_table(
                table,
                out / f"train-{index:05d}-of-{len(sizes):05d}.parquet",
                row_group_size=int(rng.integers(1, 20)),
            )
            key += rows
        world_size, batch_size = int(rng.integers(1, 4)), int(rng.integers(1, 9))
        if key < world_size * batch_size:
            continue
        streams = [
            ShardStream(out, batch_size, seed=trial, rank=r, world_size=world_size) for r in range(world_size)
        ]
        files = streams[0].files
        unit_keys = [
            pq.ParquetFile(files[u.shard]).read_row_group(u.row_group).column("key").to_pylist()
            for u in streams[0].units
        ]
        stream_keys = [k for u in streams[0].unit_order(epoch=3) for k in unit_keys[u]]
        covered = []
        for stream in streams:
            workers = int(rng.integers(1, 5))
            counts = [stream.worker_batches(w, workers) for w in range(workers)]
            assert sum(counts) == len(stream) == key // (world_size * batch_size)
            assert max(counts) - min(counts) <= 1
            for w in range(workers):
                pieces = [unit_keys[u][lo:hi] for u, lo, hi in stream.worker_slices(3, w, workers)]
                assert sum(map(len, pieces)) == counts[w] * batch_size
                covered += [k for piece in pieces for k in piece]
        assert covered == stream_keys[: len(covered)]
        assert len(covered) == world_size * len(streams[0]) * batch_size


def test_two_workers_yield_the_same_rows_as_one_process(shards):
    out, _ = shards
    in_process, _, labels0 = _epoch(make_train_loader(out, 8, 0, return_keys=True))
    loader = make_train_loader(out, 8, 2, return_keys=True)
    workers, _, labels2 = _epoch(loader)
    assert len(loader) == 16
    assert Counter(in_process) == Counter(workers)
    assert sorted(labels0.tolist()) == sorted(labels2.tolist())
    # Pixels decoded into a worker's shared memory arrive intact.
    keys0, plain0, _ = _epoch(make_train_loader(out, 8, 0, flip=False, return_keys=True))
    keys2, plain2, _ = _epoch(make_train_loader(out, 8, 2, flip=False, return_keys=True))
    by_key = dict(zip(keys0, plain0))
    assert all(torch.equal(image, by_key[key]) for key, image in zip(keys2, plain2))


def test_each_new_iterator_reshuffles_and_seed_epoch_reproduce_an_order(shards):
    out, _ = shards
    loader = make_train_loader(out, 8, 0, seed=5, return_keys=True)
    first, second = _epoch(loader)[0], _epoch(loader)[0]
    assert first != second and sorted(first) != first
    again = make_train_loader(out, 8, 0, seed=5, return_keys=True)
    again.dataset.set_epoch(1)
    assert _epoch(again)[0] == second
    again.dataset.set_epoch(0)
    assert _epoch(again)[0] == first
    other_seed = make_train_loader(out, 8, 0, seed=6, return_keys=True)
    assert _epoch(other_seed)[0] != first


def test_persistent_workers_see_new_epochs_and_set_epoch(shards):
    out, _ = shards
    loader = make_train_loader(out, 8, 2, seed=1, return_keys=True)
    assert loader.persistent_workers
    first, second = _epoch(loader)[0], _epoch(loader)[0]
    assert first != second
    loader.dataset.set_epoch(0)
    assert _epoch(loader)[0] == first
    fresh = make_train_loader(out, 8, 2, seed=1, return_keys=True)
    fresh.dataset.set_epoch(1)
    assert _epoch(fresh)[0] == second


@pytest.mark.slow
def test_spawned_workers_share_the_epoch_with_the_main_process(shards):
    """Under spawn (and forkserver, Python 3.14's default) workers get a pickled dataset, not a fork."""
    out, _ = shards
    loader = make_train_loader(out, 8, 2, seed=1, return_keys=True, multiprocessing_context="spawn")
    first, second = _epoch(loader)[0], _epoch(loader)[0]
    assert first != second
    loader.dataset.set_epoch(0)
    assert _epoch(loader)[0] == first == _epoch(make_train_loader(out, 8, 2, seed=1, return_keys=True))[0]


def test_read_num_classes_takes_the_manifest_and_checks_labels(shards, tmp_path):
    out, _ = shards
    assert read_num_classes(out) == 7
    write_shards(tmp_path, [20], num_classes=7)
    write_manifest(tmp_path, {"num_classes": 5})
    with pytest.raises(FembError, match="label 6 is out of range for num_classes 5"):
        read_num_classes(tmp_path)


def test_missing_directory_is_a_one_line_error(tmp_path):
    with pytest.raises(FembError, match="nowhere: shard directory does not exist"):
        make_train_loader(tmp_path / "nowhere", 8, 0)


def test_directory_without_shards_is_an_error(tmp_path):
    (tmp_path / "pairs.parquet").write_bytes(b"")
    with pytest.raises(FembError, match=r"no train-\*\.parquet shards"):
        make_train_loader(tmp_path, 8, 0)


def test_wrong_column_type_names_the_file_and_column(tmp_path):
    schema = pa.schema([("key", pa.int64()), ("label", pa.int32()), ("image", pa.binary())])
    write_shards(tmp_path, [20], schema=schema)
    with pytest.raises(
        FembError, match=r"train-00000-of-00001\.parquet: column 'label' is int32, expected int64"
    ):
        make_train_loader(tmp_path, 8, 0)


def test_missing_column_names_the_file_and_column(tmp_path):
    pq.write_table(pa.table({"key": [1], "image": [b"x"]}), tmp_path / "train-00000-of-00001.parquet")
    with pytest.raises(FembError, match=r"train-00000-of-00001\.parquet: column 'label' is missing"):
        make_train_loader(tmp_path, 1, 0)


def test_stale_shards_of_another_set_are_refused(tmp_path):
    write_shards(tmp_path, [20, 20])
    write_shards(tmp_path / "old", [20])
    (tmp_path / "old" / "train-00000-of-00001.parquet").rename(tmp_path / "train-00000-of-00001.parquet")
    with pytest.raises(FembError, match=r"different sets \(-of-00001, -of-00002\)"):
        make_train_loader(tmp_path, 8, 0)


def test_fewer_rows_than_one_batch_per_rank_is_an_error(shards):
    out, _ = shards
    with pytest.raises(FembError, match=r"128 rows are fewer than world_size \* batch_size = 2 \* 100"):
        make_train_loader(out, 100, 0, world_size=2)


def test_bad_rank_is_an_error(shards):
    out, _ = shards
    with pytest.raises(FembError, match=r"rank must be an integer in \[0, 1\], got 2"):
        make_train_loader(out, 8, 0, rank=2, world_size=2)


def _wrong_size_shards(out: Path, height: int = 96, width: int = 112) -> None:
    write_shards(out, [16])
    table = pq.read_table(out / "train-00000-of-00001.parquet")
    images = table.column("image").to_pylist()
    images[5] = _encode(np.zeros((height, width, 3), np.uint8))
    table = table.set_column(2, "image", pa.array(images, pa.binary()))
    pq.write_table(table, out / "train-00000-of-00001.parquet", row_group_size=16)


@pytest.mark.parametrize(("height", "width"), [(96, 112), (128, 128)])
def test_image_of_wrong_size_names_the_shard_and_key(tmp_path, height, width):
    _wrong_size_shards(tmp_path, height, width)
    message = rf"train-00000-of-00001\.parquet: key 6: image is {width}x{height}, expected 112x112"
    with pytest.raises(FembError, match=message):
        list(make_train_loader(tmp_path, 16, 0))


def test_error_in_a_worker_process_stays_one_line(tmp_path):
    _wrong_size_shards(tmp_path)
    with pytest.raises(FembError) as caught:
        list(make_train_loader(tmp_path, 16, 1))
    assert str(caught.value).endswith(
        "train-00000-of-00001.parquet: key 6: image is 112x96, expected 112x112"
    )
    assert "\n" not in str(caught.value)


def test_corrupt_image_names_the_shard_and_key(tmp_path):
    write_shards(tmp_path, [16], encode=lambda pixels: _encode(pixels)[:300])
    with pytest.raises(FembError, match=r"train-00000-of-00001\.parquet: key \d+: cannot decode image"):
        list(make_train_loader(tmp_path, 16, 0))


class _KeyRecorder(L.LightningModule):
    """A one-weight model that records which keys each training epoch saw, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[list[int]] = []

    def on_train_epoch_start(self) -> None:
        self.seen.append([])

    def training_step(self, batch, batch_idx):
        images, labels, keys = batch
        self.seen[-1] += keys.tolist()
        return (self.weight * images.float().mean()).sum() + self.weight.sum() * 0

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


@pytest.mark.slow
@pytest.mark.parametrize("num_workers", [0, 2])
def test_lightning_epochs_get_fresh_orders_matching_set_epoch(shards, num_workers):
    out, _ = shards
    model = _KeyRecorder()
    trainer = L.Trainer(
        max_epochs=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    # Lightning's set_epoch reaches only samplers: the loader itself must start a new epoch per iterator.
    trainer.fit(model, make_train_loader(out, 8, num_workers, seed=3, return_keys=True))
    assert [len(keys) for keys in model.seen] == [128] * 3
    assert len({tuple(keys) for keys in model.seen}) == 3
    for epoch, keys in enumerate(model.seen):
        reference = make_train_loader(out, 8, num_workers, seed=3, return_keys=True)
        reference.dataset.set_epoch(epoch)
        assert _epoch(reference)[0] == keys


def test_normalisation_is_bit_exact_for_every_pixel_value():
    values = torch.arange(256, dtype=torch.uint8)
    images = values[None, None, :, None].expand(2, 3, 256, 2).contiguous(memory_format=torch.channels_last)
    out = normalize(images)
    expected = (values.float() / 255 - 0.5) / 0.5
    assert out.is_contiguous() and torch.equal(out[1, 2, :, 1], expected)
    assert torch.equal(
        normalize(images, torch.float16), expected.half()[None, None, :, None].expand(2, 3, 256, 2)
    )


@pytest.mark.parametrize("workers", [0, 2, 3])
def test_resume_yields_exactly_the_rest_of_the_uninterrupted_epoch(shards, workers):
    out, _ = shards
    full_loader = make_train_loader(out, 8, workers, seed=3, return_keys=True)
    full_loader.dataset.set_epoch(2)
    keys, images, _ = _epoch(full_loader)
    for done in (0, 1, 5, 7, 16):
        loader = make_train_loader(out, 8, workers, seed=3, return_keys=True)
        loader.dataset.resume(epoch=2, batches_done=done)
        if done == len(loader):
            assert list(loader) == []
            continue
        rest_keys, rest_images, _ = _epoch(loader)
        assert rest_keys == keys[done * 8 :]
        torch.testing.assert_close(rest_images, images[done * 8 :], rtol=0, atol=0)  # same flips too
        assert _epoch(loader)[0] != rest_keys  # the epoch after is whole again and reshuffled


def test_resume_refuses_more_batches_than_the_epoch_holds(shards):
    out, _ = shards
    loader = make_train_loader(out, 8, 0)
    with pytest.raises(FembError, match="batches_done"):
        loader.dataset.resume(epoch=0, batches_done=17)


def test_only_exact_shard_names_are_read_as_training_data(tmp_path):
    write_shards(tmp_path, [40])
    pq.write_table(
        pa.table({"left": [b"x"], "right": [b"y"], "is_same": [True]}), tmp_path / "train-hard.parquet"
    )
    stream = ShardStream(tmp_path, batch_size=8)
    assert [p.name for p in stream.files] == ["train-00000-of-00001.parquet"]


def test_decompression_bomb_is_a_decode_error_not_a_crash():
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    # A valid PNG header claiming 20000 x 20000 pixels: PIL refuses it as a decompression bomb.
    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    png = (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )
    with pytest.raises(ValueError, match="cannot decode"):
        decode_rgb(png)
