"""`femb evaluate`: pair sets from .bin and .parquet, flip-summed embeddings, metrics JSON, ROC plots, errors."""

from __future__ import annotations

import csv
import io
import json
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torch import nn

from femb.data.binfile import write_bin
from femb.errors import FembError
from femb.evaluation.evaluate import run_evaluate
from femb.evaluation.pairsets import (
    clear_pair_set_cache,
    embed_pair_set,
    load_pair_set,
    verify_pair_set,
)
from femb.evaluation.plots import downsample_roc
from femb.weights import load_backbone, save_backbone
from tests.helpers import calibrated_tiny_mbf

NUM_PAIRS = 20


def face(seed: int, size: int = 112) -> np.ndarray:
    """A smooth random RGB image (size, size, 3) uint8: one synthetic 'identity' per seed."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (size // 8 + 1, size // 8 + 1, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC))


def encode(array: np.ndarray, fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def pair_images(num_pairs: int = NUM_PAIRS) -> tuple[list[bytes], list[bool]]:
    """Interleaved left/right JPEGs: same pairs are one identity plus noise, different pairs two identities."""
    rng = np.random.default_rng(1)
    images, same = [], []
    for i in range(num_pairs):
        is_same = i % 2 == 0
        left = face(100 + i)
        if is_same:
            noise = rng.integers(-150, 151, left.shape)
            right = np.clip(left.astype(int) + noise, 0, 255).astype(np.uint8)
        else:
            right = face(500 + i)
        images += [encode(left), encode(right)]
        same.append(is_same)
    return images, same


def write_pair_parquet(path: Path, images: list[bytes], same: list[bool]) -> Path:
    """The pair file of `femb convert`: left, right binary and is_same bool, in the .bin's order."""
    table = pa.table(
        {
            "left": pa.array(images[0::2], pa.binary()),
            "right": pa.array(images[1::2], pa.binary()),
            "is_same": pa.array(same, pa.bool_()),
        }
    )
    pq.write_table(table, path)
    return path


def write_raw_bin(path: Path, bins: list[bytes], issame: list[bool]) -> Path:
    """A .bin written with plain pickle, so it can hold what `write_bin` refuses (odd counts, mismatches)."""
    with open(path, "wb") as f:
        pickle.dump((bins, issame), f, protocol=4)
    return path


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return calibrated_tiny_mbf()


@pytest.fixture(scope="module")
def weights(model, tmp_path_factory) -> Path:
    return save_backbone(model, tmp_path_factory.mktemp("weights") / "backbone.pth", "mbf")


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> dict[str, Path]:
    """The same 20 pairs as bin/lfw.bin and parquet/lfw.parquet."""
    root = tmp_path_factory.mktemp("sets")
    (root / "bin").mkdir()
    (root / "parquet").mkdir()
    images, same = pair_images()
    write_bin(root / "bin" / "lfw.bin", images, same)
    write_pair_parquet(root / "parquet" / "lfw.parquet", images, same)
    return {"bin": root / "bin" / "lfw.bin", "parquet": root / "parquet" / "lfw.parquet"}


@pytest.fixture(scope="module")
def embedded(model, sets) -> tuple:
    """The decoded .bin set and its plain and mirrored embeddings."""
    pair_set = load_pair_set(sets["bin"], cache=False)
    return (pair_set, *embed_pair_set(model, pair_set, batch_size=16))


@pytest.fixture(scope="module")
def evaluated(weights, sets, tmp_path_factory) -> dict:
    """run_evaluate of lfw.bin plus a 12-pair cfp_fp.bin, with plots: returned and written metrics, paths."""
    root = tmp_path_factory.mktemp("evaluate")
    other = root / "cfp_fp.bin"
    write_bin(other, *pair_images(12))
    output = root / "metrics" / "eval.json"
    returned = run_evaluate(weights, [sets["bin"], other], output, batch_size=16, plots_dir=root / "plots")
    return {"returned": returned, "output": output, "plots": root / "plots"}


def reference_embeddings(model: nn.Module, arrays: list[np.ndarray]) -> np.ndarray:
    """The model on (x/255 - 0.5)/0.5 of RGB arrays, computed without femb's pair-set code."""
    x = (np.stack(arrays).astype(np.float64) / 255.0 - 0.5) / 0.5
    with torch.no_grad():
        return model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).float()).numpy()


def assert_one_line_error(excinfo: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


# ---------------------------------------------------------------- reading and embedding


def test_bin_and_parquet_decode_to_the_same_pixels_in_pair_order(sets):
    from_bin = load_pair_set(sets["bin"], cache=False)
    from_parquet = load_pair_set(sets["parquet"], cache=False)
    images, same = pair_images()
    assert from_bin.name == from_parquet.name == "lfw"
    assert from_bin.images.shape == (2 * NUM_PAIRS, 3, 112, 112) and from_bin.images.dtype == torch.uint8
    assert torch.equal(from_bin.images, from_parquet.images)
    assert from_bin.is_same.tolist() == from_parquet.is_same.tolist() == same
    # Image 3 is the right image of pair 1, decoded as RGB (CHW) exactly as PIL decodes the JPEG.
    expected = np.asarray(Image.open(io.BytesIO(images[3])).convert("RGB"))
    np.testing.assert_allclose(from_bin.images[3].permute(1, 2, 0).numpy(), expected, atol=1)


def test_decoded_pair_set_is_cached_until_the_file_changes(sets, tmp_path):
    clear_pair_set_cache()
    path = tmp_path / "lfw.bin"
    images, same = pair_images(10)
    write_bin(path, images, same)
    first = load_pair_set(path)
    assert load_pair_set(path) is first
    write_bin(path, images[2:] + images[:2], same[1:] + same[:1])
    second = load_pair_set(path)
    assert second is not first
    assert torch.equal(second.images[0], first.images[2])
    clear_pair_set_cache()


def test_embeddings_follow_insightface_preprocessing_and_mirror(model, embedded):
    pair_set, emb, emb_flip = embedded
    pixels = [img.permute(1, 2, 0).numpy() for img in pair_set.images]
    assert emb.shape == emb_flip.shape == (2 * NUM_PAIRS, 512) and emb.dtype == np.float32
    np.testing.assert_allclose(emb, reference_embeddings(model, pixels), rtol=1e-4, atol=1e-4)
    mirrored = [p[:, ::-1] for p in pixels]
    np.testing.assert_allclose(emb_flip, reference_embeddings(model, mirrored), rtol=1e-4, atol=1e-4)


def test_flip_sum_makes_a_face_and_its_mirror_identical(model, tmp_path):
    array = face(3)
    pngs = [encode(array, "PNG"), encode(array[:, ::-1].copy(), "PNG")]  # lossless, decoded by PIL
    path = write_raw_bin(tmp_path / "mirror.bin", pngs, [True])
    emb, emb_flip = embed_pair_set(model, load_pair_set(path, cache=False))
    summed = emb + emb_flip
    np.testing.assert_allclose(summed[0], summed[1], rtol=1e-4, atol=1e-4)
    assert not np.allclose(emb[0], emb[1], rtol=1e-2, atol=1e-2)  # without the flip they differ


def test_embedding_ignores_batch_size_and_restores_training_mode(tmp_path):
    net = calibrated_tiny_mbf().train()
    path = tmp_path / "small.bin"
    write_bin(path, *pair_images(3))
    pair_set = load_pair_set(path, cache=False)
    small = embed_pair_set(net, pair_set, batch_size=4)
    assert net.training
    large = embed_pair_set(net, pair_set, batch_size=64)
    np.testing.assert_allclose(small[0], large[0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(small[1], large[1], rtol=1e-4, atol=1e-4)


def test_verify_scores_the_flip_sums_and_reports_xnorm(embedded, evaluated):
    from femb.evaluation.verification import evaluate_pairs

    pair_set, emb, emb_flip = embedded
    metrics = evaluated["returned"]["lfw"]
    summed = emb + emb_flip
    expected = evaluate_pairs(summed[0::2], summed[1::2], pair_set.is_same)
    assert metrics["accuracy"] == expected["accuracy"] and metrics["auc"] == expected["auc"]
    norms = np.linalg.norm(np.concatenate([emb, emb_flip]).astype(np.float64), axis=1)
    assert metrics["xnorm"] == pytest.approx(norms.mean(), rel=1e-6)
    assert metrics["num_pairs"] == NUM_PAIRS and len(metrics["fold_accuracies"]) == 10


def test_verify_pair_set_keeps_the_roc_arrays_for_plots(model, embedded):
    result = verify_pair_set(model, embedded[0], batch_size=64)
    assert set(result["roc"]) == {"fpr", "tpr", "thresholds"}
    assert result["roc"]["fpr"][0] == 0.0 and result["roc"]["tpr"][-1] == 1.0


# ---------------------------------------------------------------- run_evaluate


def test_bin_and_parquet_sets_give_identical_metrics(weights, sets, evaluated, tmp_path):
    from_parquet = run_evaluate(weights, [sets["parquet"]], tmp_path / "parquet.json", batch_size=16)
    assert from_parquet["lfw"] == evaluated["returned"]["lfw"]


def test_metrics_json_holds_each_set_and_the_mean_accuracy(evaluated):
    output = evaluated["output"]
    written = json.loads(output.read_text())
    assert written == evaluated["returned"]
    assert set(written) == {"lfw", "cfp_fp", "mean_accuracy"}
    for name, pairs in (("lfw", NUM_PAIRS), ("cfp_fp", 12)):
        metrics = written[name]
        assert {"accuracy", "accuracy_std", "tar_at_far", "auc", "eer", "xnorm", "num_pairs"} <= set(metrics)
        assert set(metrics["tar_at_far"]) == {"1e-04", "1e-03", "1e-02"}
        assert metrics["num_pairs"] == pairs and "roc" not in metrics
    mean = (written["lfw"]["accuracy"] + written["cfp_fp"]["accuracy"]) / 2
    assert written["mean_accuracy"] == pytest.approx(mean)
    assert [p.name for p in output.parent.iterdir()] == ["eval.json"]  # no temporary file left behind


def test_plots_are_pngs_and_roc_evr_quality_csvs_per_set(evaluated):
    plots = evaluated["plots"]
    assert sorted(p.name for p in plots.iterdir()) == [
        "evr.png",
        "evr_cfp_fp.csv",
        "evr_lfw.csv",
        "quality_cfp_fp.csv",
        "quality_lfw.csv",
        "roc.png",
        "roc_cfp_fp.csv",
        "roc_lfw.csv",
    ]
    with Image.open(plots / "roc.png") as png:
        assert png.format == "PNG" and png.width > 100
    with open(plots / "roc_lfw.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    fpr = np.array([float(r["fpr"]) for r in rows])
    tpr = np.array([float(r["tpr"]) for r in rows])
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)


def test_roc_downsampling_keeps_extremes_and_original_points():
    rng = np.random.default_rng(0)
    fpr = np.r_[0.0, np.sort(rng.random(20_000)), 1.0]
    tpr = np.r_[0.0, np.sort(rng.random(20_000)), 1.0]
    small_fpr, small_tpr = downsample_roc(fpr, tpr, max_points=1000)
    assert len(small_fpr) <= 1000
    assert (small_fpr[0], small_tpr[0], small_fpr[-1], small_tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    original = set(zip(fpr.tolist(), tpr.tolist()))
    assert all(point in original for point in zip(small_fpr.tolist(), small_tpr.tolist()))
    assert small_fpr[1] == fpr[1]  # the lowest non-zero FAR survives: the left end of a log axis


@pytest.mark.slow
def test_onnx_weights_evaluate_like_the_torch_weights(model, sets, embedded, evaluated, tmp_path):
    from femb.export import export_onnx

    onnx_path = tmp_path / "model.onnx"
    export_onnx(model, onnx_path, backbone="mbf")
    from_torch = evaluated["returned"]["lfw"]
    from_onnx = run_evaluate(onnx_path, [sets["bin"]], tmp_path / "onnx.json", batch_size=16)["lfw"]
    assert from_onnx["accuracy"] == pytest.approx(from_torch["accuracy"], abs=1 / NUM_PAIRS)
    assert from_onnx["auc"] == pytest.approx(from_torch["auc"], abs=1e-3)
    assert from_onnx["xnorm"] == pytest.approx(from_torch["xnorm"], rel=1e-4)
    pair_set, emb, emb_flip = embedded
    onnx_emb, onnx_emb_flip = embed_pair_set(load_backbone(onnx_path), pair_set)
    np.testing.assert_allclose(onnx_emb, emb, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(onnx_emb_flip, emb_flip, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- errors


def test_odd_number_of_images_is_refused_naming_the_file(tmp_path):
    images, same = pair_images(4)
    path = write_raw_bin(tmp_path / "odd.bin", images[:-1], same)
    with pytest.raises(FembError) as excinfo:
        load_pair_set(path, cache=False)
    assert_one_line_error(excinfo, str(path), "odd")


def test_issame_length_mismatch_is_refused(tmp_path):
    images, same = pair_images(4)
    path = write_raw_bin(tmp_path / "short.bin", images, same[:-1])
    with pytest.raises(FembError) as excinfo:
        load_pair_set(path, cache=False)
    assert_one_line_error(excinfo, str(path), "4 pairs", "issame has 3")


@pytest.mark.parametrize(
    ("name", "index", "where"),
    [("broken.bin", 5, "pair 2 right image"), ("broken.parquet", 6, "pair 3 left image")],
)
def test_undecodable_image_names_the_pair_and_side(tmp_path, name, index, where):
    images, same = pair_images(6)
    images[index] = images[index][: len(images[index]) // 3]  # a truncated JPEG
    images[index + 2] = b"\xff\xd8 this is not a jpeg"  # a second bad image: the first is named, both counted
    writer = write_raw_bin if name.endswith(".bin") else write_pair_parquet
    path = writer(tmp_path / name, images, same)
    with pytest.raises(FembError) as excinfo:
        load_pair_set(path, cache=False)
    assert_one_line_error(excinfo, str(path), where, "(2 images fail)")


def test_image_of_the_wrong_size_is_refused(tmp_path):
    images, same = pair_images(4)
    images[2] = encode(face(9, size=96))
    path = write_raw_bin(tmp_path / "small.bin", images, same)
    with pytest.raises(FembError) as excinfo:
        load_pair_set(path, cache=False)
    assert_one_line_error(excinfo, "pair 1 left image", "96x96")


def test_parquet_without_pair_columns_is_refused(tmp_path):
    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"key": [1], "label": [0], "image": [b"x"]}), path)
    with pytest.raises(FembError) as excinfo:
        load_pair_set(path, cache=False)
    assert_one_line_error(excinfo, str(path), "left, right, is_same")


def test_weights_of_another_backbone_are_refused(weights, sets, tmp_path):
    output = tmp_path / "m.json"
    with pytest.raises(FembError) as excinfo:
        run_evaluate(weights, [sets["bin"]], output, backbone="r18")
    assert_one_line_error(excinfo, str(weights), "do not fit backbone 'iresnet18'")
    assert not output.exists()


def test_two_sets_with_one_name_are_refused(weights, sets, tmp_path):
    with pytest.raises(FembError) as excinfo:
        run_evaluate(weights, [sets["bin"], sets["parquet"]], tmp_path / "m.json")
    assert_one_line_error(excinfo, "second set named 'lfw'")


# ---------------------------------------------------------------- IJB releases, quality and EVR outputs


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    """tests/test_ijb.py's tiny IJB-C release: 6 crops in 3 templates, 5 template pairs, 1:N files."""
    from tests.test_ijb import write_release

    return write_release(tmp_path_factory.mktemp("ijb") / "IJBC")


@pytest.fixture(scope="module")
def ijb_evaluated(weights, sets, release, tmp_path_factory) -> dict:
    """`femb evaluate RELEASE lfw.bin` through the CLI, with plots and a feature cache."""
    from femb.cli import main

    root = tmp_path_factory.mktemp("ijb-evaluate")
    output, plots, cache = root / "eval.json", root / "plots", root / "cache"
    argv = ["evaluate", "--weights", str(weights), str(release), str(sets["bin"]), "-o", str(output)]
    assert main([*argv, "--plots", str(plots), "--ijb-cache", str(cache), "--batch-size", "64"]) == 0
    return {"metrics": json.loads(output.read_text()), "plots": plots, "cache": cache}


def cached_features(cache: Path) -> np.ndarray:
    (path,) = cache.glob("ijbc-*.npy")
    return np.load(path)


def test_cli_evaluates_an_ijb_release_beside_a_pair_set(ijb_evaluated, evaluated):
    from femb.evaluation.ijb import FAR_TARGETS
    from femb.evaluation.verification import far_key

    metrics = ijb_evaluated["metrics"]
    assert list(metrics) == ["IJBC", "lfw", "mean_accuracy"]
    assert metrics["mean_accuracy"] == metrics["lfw"]["accuracy"]  # IJB has no accuracy
    for key in ("accuracy", "accuracy_std", "tar_at_far", "num_pairs"):  # as without the IJB set
        assert metrics["lfw"][key] == evaluated["returned"]["lfw"][key], key
    assert metrics["lfw"]["xnorm"] == pytest.approx(evaluated["returned"]["lfw"]["xnorm"], rel=1e-6)
    ijb = metrics["IJBC"]
    keys = [far_key(f) for f in FAR_TARGETS]
    assert list(ijb["tar_at_far"]) == list(ijb["tar_at_far_interpolated"]) == keys
    assert list(ijb["threshold_at_far"]) == keys and 0.0 <= ijb["auc"] <= 1.0
    assert (ijb["num_pairs"], ijb["num_same"], ijb["num_diff"], ijb["num_images"]) == (5, 2, 3, 6)
    assert ijb["far_below_resolution"] == keys  # 3 impostor pairs resolve no FAR below 1/3
    assert {"rank_1", "rank_5", "rank_10", "tpir_at_fpir"} <= set(ijb["1vn"])
    assert ijb["quality"]["fmr"] == 1e-4 and metrics["lfw"]["quality"]["fmr"] == 1e-3
    assert set(ijb["quality"]["fnmr_at_reject"]) == {"0", "0.1", "0.2", "0.3", "0.4", "0.5"}


def test_ijb_outputs_are_roc_evr_and_per_image_quality_files(ijb_evaluated, release):
    from femb.evaluation.ijb import read_ijb

    plots = ijb_evaluated["plots"]
    assert {"roc_IJBC.csv", "evr_IJBC.csv", "quality_IJBC.csv", "roc.png", "evr.png"} <= {
        p.name for p in plots.iterdir()
    }
    for png in ("roc.png", "evr.png"):
        with Image.open(plots / png) as image:
            assert image.format == "PNG" and image.width > 100
    roc = read_csv(plots / "roc_IJBC.csv")
    assert (float(roc[0]["fpr"]), float(roc[-1]["fpr"]), float(roc[-1]["tpr"])) == (0.0, 1.0, 1.0)
    evr = read_csv(plots / "evr_IJBC.csv")
    assert list(evr[0]) == ["reject_fraction", "fnmr"] and len(evr) == 51
    assert float(evr[-1]["reject_fraction"]) == 0.5
    rows = read_csv(plots / "quality_IJBC.csv")
    data = read_ijb(release)
    assert [r["image"] for r in rows] == list(data.images)
    assert [int(r["template"]) for r in rows] == data.templates.tolist()
    norms = np.linalg.norm(cached_features(ijb_evaluated["cache"]).astype(np.float64), axis=1)
    np.testing.assert_allclose([float(r["quality"]) for r in rows], norms, rtol=1e-5)


def test_pair_set_quality_is_the_flip_sum_norm_and_evr_follows_it(embedded, evaluated):
    from femb.evaluation.quality import error_versus_reject

    pair_set, emb, emb_flip = embedded
    summed = (emb + emb_flip).astype(np.float64)
    rows = read_csv(evaluated["plots"] / "quality_lfw.csv")
    assert [(r["pair"], r["side"]) for r in rows[:3]] == [("0", "left"), ("0", "right"), ("1", "left")]
    norms = np.linalg.norm(summed, axis=1)
    np.testing.assert_allclose([float(r["quality"]) for r in rows], norms, rtol=1e-5)
    unit = summed / norms[:, None]
    scores = np.sum(unit[0::2] * unit[1::2], axis=1)
    expected = error_versus_reject(scores, pair_set.is_same, np.minimum(norms[0::2], norms[1::2]))
    evr = read_csv(evaluated["plots"] / "evr_lfw.csv")
    np.testing.assert_allclose([float(r["fnmr"]) for r in evr], expected.fnmr, atol=1e-7)
    quality = evaluated["returned"]["lfw"]["quality"]
    assert quality["auc"] == pytest.approx(expected.auc) and quality["image"]["mean"] == pytest.approx(
        norms.mean(), rel=1e-5
    )


@pytest.mark.parametrize(
    ("flags", "normalize", "faceness"),
    [(["--ijb-normalize-images"], True, True), (["--ijb-no-faceness"], False, False)],
)
def test_ijb_mode_flags_give_evaluate_ijbs_numbers(
    ijb_evaluated, weights, release, tmp_path, flags, normalize, faceness
):
    from femb.cli import main
    from femb.evaluation.ijb import evaluate_ijb, read_ijb

    output = tmp_path / "mode.json"
    argv = ["evaluate", "--weights", str(weights), str(release), "-o", str(output)]
    assert main([*argv, "--ijb-cache", str(ijb_evaluated["cache"]), *flags]) == 0
    got = json.loads(output.read_text())["IJBC"]
    features = cached_features(ijb_evaluated["cache"])
    expected = evaluate_ijb(read_ijb(release), features, normalize_images=normalize, use_faceness=faceness)
    default = ijb_evaluated["metrics"]["IJBC"]
    for key in ("tar_at_far", "tar_at_far_interpolated", "threshold_at_far", "auc"):
        assert got[key] == expected["1v1"][key], key
    assert got["1vn"] == expected["1vn"]
    assert (got["normalize_images"], got["use_faceness"]) == (normalize, faceness)
    # The mode changes the template features, so the impostor scores and the EVR threshold move.
    assert got["quality"]["threshold"] != default["quality"]["threshold"]
    assert got["1vn"]["threshold_at_fpir"] != default["1vn"]["threshold_at_fpir"]
    assert got["quality"]["image"] == default["quality"]["image"]  # quality is the raw norm, in any mode


def test_cached_ijb_features_are_rescored_without_reading_a_crop(weights, tmp_path, capsys):
    import shutil

    from femb.cli import main
    from tests.test_ijb import write_release

    root = write_release(tmp_path / "IJBC")
    argv = ["evaluate", "--weights", str(weights), str(root), "-o", str(tmp_path / "a.json")]
    assert main([*argv, "--ijb-cache", str(tmp_path / "cache")]) == 0
    first = json.loads((tmp_path / "a.json").read_text())
    for crop in (root / "loose_crop").iterdir():  # same names and sizes, nothing decodable left
        crop.write_bytes(bytes(crop.stat().st_size))
    assert main([*argv, "--ijb-cache", str(tmp_path / "cache")]) == 0
    assert json.loads((tmp_path / "a.json").read_text()) == first
    capsys.readouterr()
    assert main([*argv, "--no-ijb-cache"]) == 1  # embedding afresh would have needed the crops
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "cannot read image" in err, err
    shutil.rmtree(tmp_path / "cache")
    assert main([*argv, "--ijb-cache", str(tmp_path / "cache")]) == 1


def test_a_bad_ijb_directory_is_one_line_from_the_cli(weights, release, tmp_path, capsys):
    import shutil

    from femb.cli import main

    (tmp_path / "notijb").mkdir()
    output = tmp_path / "m.json"
    argv = ["evaluate", "--weights", str(weights), "--no-ijb-cache", "-o", str(output)]
    assert main([*argv, str(tmp_path / "notijb")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("femb evaluate: ") and "\n" not in err
    assert str(tmp_path / "notijb" / "meta") in err and "expected an IJB release" in err
    broken = shutil.copytree(release, tmp_path / "IJBC")
    (broken / "meta" / "ijbc_template_pair_label.txt").write_text("1 2 0\n1 3 7\n")
    assert main([*argv, str(broken)]) == 1
    err = capsys.readouterr().err.strip()
    assert "ijbc_template_pair_label.txt:2: label 7 is not 0 or 1" in err and "\n" not in err
    assert not output.exists()


def test_evaluate_stage_runs_pair_sets_and_ijb_releases_from_params(weights, sets, release, tmp_path):
    import shutil

    from femb.config import parse_params
    from stages.evaluate import main as stage

    (tmp_path / "run").mkdir()
    shutil.copy(weights, tmp_path / "run" / "backbone.pth")
    evaluate = {"sets": [str(sets["parquet"])], "batch_size": 64, "ijb_cache": str(tmp_path / "cache")}
    raw = {"backbone": "mbf", "train": {"out_dir": str(tmp_path / "run")}}
    params = parse_params({**raw, "evaluate": {**evaluate, "ijb": [str(release)]}})
    outs = [str(tmp_path / name) for name in ("eval.json", "roc", "evr", "quality")]
    stage(params, outs)
    assert set(json.loads((tmp_path / "eval.json").read_text())) == {"lfw", "IJBC", "mean_accuracy"}
    listed = {name: sorted(p.name for p in (tmp_path / name).iterdir()) for name in ("roc", "evr", "quality")}
    assert listed == {
        "roc": ["roc.png", "roc_IJBC.csv", "roc_lfw.csv"],
        "evr": ["evr.png", "evr_IJBC.csv", "evr_lfw.csv"],
        "quality": ["quality_IJBC.csv", "quality_lfw.csv"],
    }
    assert len(list((tmp_path / "cache").glob("ijbc-*.npy"))) == 1
    absent = parse_params({**raw, "evaluate": {**evaluate, "ijb": [str(tmp_path / "absent")]}})
    with pytest.raises(FembError, match=r"^params.yaml: evaluate.ijb: .*absent is not a directory"):
        stage(absent, outs)


def test_model_card_shows_ijb_tar_and_rank1_and_export_accepts_such_metrics(ijb_evaluated, tmp_path, capsys):
    from femb.cli import main
    from femb.export.model_card import render_model_card

    metrics = ijb_evaluated["metrics"]
    ijb = {
        **metrics["IJBC"],
        "tar_at_far": {**metrics["IJBC"]["tar_at_far"], "1e-05": 0.9123, "1e-04": 0.9456},
    }
    ijb["far_below_resolution"] = []
    card = render_model_card({"backbone": "mbf"}, {**metrics, "IJBC": ijb})
    lines = card.splitlines()
    header = lines.index("## IJB (template 1:1 verification, 1:N identification)")
    assert (
        lines[header + 2]
        == "| Set | TAR@FAR=1e-05 (%) | TAR@FAR=1e-04 (%) | Rank-1 (%) | Template pairs | Mode |"
    )
    rank1 = 100 * ijb["1vn"]["rank_1"]
    assert f"| IJBC | 91.23 | 94.56 | {rank1:.2f} | 5 | F1 N1D1 |" in lines
    assert "| lfw | " in card  # the pair-set table is still there
    only_ijb = render_model_card({}, {"IJBC": metrics["IJBC"]})
    assert "## Verification\n\nNot evaluated." in only_ijb and "| IJBC | " in only_ijb
    assert "TAR at FAR 1e-05, 1e-04 lies below what some releases can measure." in only_ijb
    # `femb export --metrics` takes a file with IJB entries (it fails later, on the missing weights).
    (tmp_path / "m.json").write_text(json.dumps(metrics))
    argv = ["export", "--weights", str(tmp_path / "absent.pth"), "-o", str(tmp_path / "m.onnx")]
    assert main([*argv, "--metrics", str(tmp_path / "m.json")]) == 1
    assert "not a metrics file" not in capsys.readouterr().err
    (tmp_path / "bad.json").write_text(json.dumps({"IJBC": {"auc": 0.5}}))
    assert main([*argv, "--metrics", str(tmp_path / "bad.json")]) == 1
    assert "bad.json: not a metrics file of femb evaluate" in capsys.readouterr().err
