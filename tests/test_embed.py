"""Embedding images: preprocessing, flip sum, normalisation, errors, and the .npy writer behind `femb embed`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from femb.backbones import create_backbone
from femb.embed import embed_images, run_embed
from femb.errors import FembError
from femb.weights import save_backbone


@pytest.fixture(scope="module")
def model() -> nn.Module:
    """A MobileFaceNet (32-d) with BatchNorm statistics from one random batch, in eval mode."""
    torch.manual_seed(0)
    net = create_backbone("mbf", num_features=32)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None
    with torch.no_grad():
        net.train()(torch.randn(4, 3, 112, 112))
    return net.eval()


def face(seed: int, size: tuple[int, int] = (112, 112)) -> np.ndarray:
    """A smooth random RGB image (H, W, 3) uint8."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (size[0] // 8 + 1, size[1] // 8 + 1, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((size[1], size[0]), Image.Resampling.BICUBIC))


def write(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array).save(path)
    return path


def reference(model: nn.Module, arrays: list[np.ndarray]) -> np.ndarray:
    """The model on (x/255 - 0.5)/0.5 of RGB arrays, computed independently of femb.embed."""
    x = (np.stack(arrays).astype(np.float64) / 255.0 - 0.5) / 0.5
    with torch.no_grad():
        return model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).float()).numpy()


def test_embeddings_follow_insightface_preprocessing_in_order(model, tmp_path):
    arrays = [face(i) for i in range(3)]
    paths = [write(tmp_path / f"{i}.png", a) for i, a in enumerate(arrays)]
    out = embed_images(model, paths, batch_size=2)
    assert out.shape == (3, 32) and out.dtype == np.float32
    np.testing.assert_allclose(out, reference(model, arrays), rtol=1e-4, atol=1e-4)


def test_batch_size_does_not_change_embeddings(model, tmp_path):
    paths = [write(tmp_path / f"{i}.png", face(i)) for i in range(3)]
    np.testing.assert_allclose(
        embed_images(model, paths, batch_size=1),
        embed_images(model, paths, batch_size=3),
        rtol=1e-4,
        atol=1e-5,
    )


def test_flip_adds_the_embedding_of_the_mirrored_image(model, tmp_path):
    array = face(7)
    mirror = array[:, ::-1].copy()
    path, mirror_path = write(tmp_path / "a.png", array), write(tmp_path / "b.png", mirror)
    out = embed_images(model, [path, mirror_path], flip=True)
    np.testing.assert_allclose(
        out[0], reference(model, [array])[0] + reference(model, [mirror])[0], rtol=1e-4, atol=1e-4
    )
    np.testing.assert_allclose(out[0], out[1], rtol=1e-4, atol=1e-4)  # the sum is mirror-invariant


def test_normalize_returns_unit_rows_in_the_same_direction(model, tmp_path):
    paths = [write(tmp_path / f"{i}.png", face(i)) for i in range(2)]
    raw = embed_images(model, paths)
    unit = embed_images(model, paths, normalize=True)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(unit, raw / np.linalg.norm(raw, axis=1, keepdims=True), rtol=1e-5, atol=1e-6)


def test_other_sizes_are_resized_to_112_with_pil_bilinear(model, tmp_path):
    big = face(3, size=(150, 130))
    resized = np.asarray(Image.fromarray(big).resize((112, 112), Image.Resampling.BILINEAR))
    out = embed_images(model, [write(tmp_path / "big.png", big), write(tmp_path / "small.png", resized)])
    np.testing.assert_allclose(out[0], out[1], rtol=1e-5, atol=1e-5)


def test_grayscale_and_rgba_images_become_rgb(model, tmp_path):
    gray = face(4)[:, :, 0]
    rgb = np.repeat(gray[:, :, None], 3, axis=2)
    rgba = np.concatenate([face(5), np.full((112, 112, 1), 128, np.uint8)], axis=2)
    paths = [
        write(tmp_path / "g.png", gray),
        write(tmp_path / "rgb.png", rgb),
        write(tmp_path / "rgba.png", rgba),
    ]
    out = embed_images(model, paths)
    np.testing.assert_allclose(out[0], out[1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[2], reference(model, [face(5)])[0], rtol=1e-4, atol=1e-4)


def test_jpeg_images_are_read(model, tmp_path):
    Image.fromarray(face(6)).save(tmp_path / "f.jpg", quality=95)
    decoded = np.asarray(Image.open(tmp_path / "f.jpg").convert("RGB"))
    np.testing.assert_allclose(
        embed_images(model, [tmp_path / "f.jpg"]), reference(model, [decoded]), rtol=1e-4, atol=1e-4
    )


def test_unreadable_or_missing_image_is_named(model, tmp_path):
    good = write(tmp_path / "ok.png", face(0))
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    with pytest.raises(FembError, match=r"broken\.jpg: cannot read image"):
        embed_images(model, [good, tmp_path / "broken.jpg"])
    with pytest.raises(FembError, match=r"gone\.png: no such image file"):
        embed_images(model, [tmp_path / "gone.png"])


def test_training_mode_is_restored_and_running_stats_untouched(model, tmp_path):
    net = create_backbone("mbf", num_features=8).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    embed_images(net, [write(tmp_path / "a.png", face(1))])
    assert net.training
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_bad_arguments_are_user_errors(model, tmp_path):
    with pytest.raises(FembError, match="no images to embed"):
        embed_images(model, [])
    with pytest.raises(FembError, match="batch_size: expected a positive integer, got 0"):
        embed_images(model, [tmp_path / "a.png"], batch_size=0)


def test_run_embed_writes_the_npy_of_embed_images(model, tmp_path):
    weights = save_backbone(model, tmp_path / "mbf.pt", "mbf")
    paths = [write(tmp_path / f"{i}.png", face(i)) for i in range(3)]
    out = tmp_path / "emb" / "faces.npy"
    summary = run_embed(None, weights, out, paths, batch_size=2, flip=True, normalize=True, device="cpu")
    assert summary == {
        "output": str(out), "weights": str(weights), "images": 3, "dim": 32, "flip": True, "normalize": True,
    }  # fmt: skip
    expected = embed_images(model, paths, batch_size=2, flip=True, normalize=True)
    np.testing.assert_allclose(np.load(out), expected, rtol=1e-6, atol=1e-7)
    assert [p.name for p in out.parent.iterdir()] == ["faces.npy"]


def test_run_embed_keeps_the_old_output_when_an_image_fails(model, tmp_path):
    weights = save_backbone(model, tmp_path / "mbf.pt", "mbf")
    out = tmp_path / "faces.npy"
    np.save(out, np.zeros(1))
    (tmp_path / "bad.png").write_bytes(b"nope")
    with pytest.raises(FembError, match=r"bad\.png: cannot read image"):
        run_embed("mbf", weights, out, [tmp_path / "bad.png"], device="cpu")
    np.testing.assert_array_equal(np.load(out), np.zeros(1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.png", "faces.npy", "mbf.pt"]


def test_run_embed_requires_weights_and_an_npy_output(tmp_path):
    with pytest.raises(FembError, match="--weights is required"):
        run_embed("r50", None, tmp_path / "e.npy", [tmp_path / "a.png"])
    with pytest.raises(FembError, match=r"e\.txt: the output file must end in \.npy"):
        run_embed("r50", tmp_path / "w.pt", tmp_path / "e.txt", [tmp_path / "a.png"])


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_run_embed_serves_an_onnx_file_like_the_torch_model(model, tmp_path):
    torch.onnx.export(
        model, (torch.randn(2, 3, 112, 112),), str(tmp_path / "mbf.onnx"), dynamo=False, input_names=["data"],
        output_names=["embedding"], dynamic_axes={"data": {0: "batch"}, "embedding": {0: "batch"}},
    )  # fmt: skip
    paths = [write(tmp_path / f"{i}.png", face(i)) for i in range(3)]
    run_embed(None, tmp_path / "mbf.onnx", tmp_path / "e.npy", paths, batch_size=2, flip=True)
    expected = embed_images(model, paths, batch_size=2, flip=True)
    np.testing.assert_allclose(np.load(tmp_path / "e.npy"), expected, rtol=1e-4, atol=1e-4)
