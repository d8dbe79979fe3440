"""The `femb` command itself: entry points, help, and how user errors are printed."""

import subprocess
import sys

from femb import __version__
from femb.cli import main


def run_femb(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "femb", *args], capture_output=True, text=True, timeout=120)


def test_python_dash_m_femb_prints_version():
    result = run_femb("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"femb {__version__}"


def test_every_subcommand_has_help():
    for command in ("synth", "convert", "embed", "train", "evaluate", "export"):
        result = run_femb(command, "--help")
        assert result.returncode == 0, result.stderr
        assert f"femb {command}" in result.stdout


def test_user_error_is_one_line_without_traceback(tmp_path):
    missing = tmp_path / "nowhere"
    result = run_femb("convert", str(missing), str(tmp_path / "out"))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("femb convert: ")
    assert str(missing) in lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_main_returns_nonzero_on_user_error(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "absent"), str(tmp_path / "out")]) == 1
    assert "absent" in capsys.readouterr().err


def _save_faces(directory, count):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = directory / f"face{i}.png"
        Image.fromarray(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_embed_command_writes_the_embeddings_of_its_images(tmp_path):
    import numpy as np
    import torch

    from femb.backbones import create_backbone
    from femb.embed import embed_images
    from femb.weights import save_backbone

    torch.manual_seed(0)
    model = create_backbone("mbf").eval()
    weights = save_backbone(model, tmp_path / "backbone.pth", "mbf")
    faces = _save_faces(tmp_path, 3)
    out = tmp_path / "emb.npy"
    result = run_femb("embed", *map(str, faces), "--weights", str(weights), "--output", str(out), "--flip")
    assert result.returncode == 0, result.stderr
    embeddings = np.load(out)
    assert embeddings.shape == (3, 512) and embeddings.dtype == np.float32
    np.testing.assert_allclose(embeddings, embed_images(model, faces, flip=True), atol=1e-4)


def test_embed_command_names_an_unreadable_image(tmp_path):
    from femb.backbones import create_backbone
    from femb.weights import save_backbone

    weights = save_backbone(create_backbone("mbf"), tmp_path / "backbone.pth", "mbf")
    (bad := tmp_path / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "emb.npy"
    result = run_femb("embed", str(bad), "--weights", str(weights), "--output", str(out))
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1 and str(bad) in result.stderr
    assert "Traceback" not in result.stderr and not out.exists()


def test_unwritable_output_path_is_one_line_without_traceback(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = run_femb("synth", str(blocker / "demo"), "--identities", "2", "--images-per-identity", "2")
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1 and str(blocker) in result.stderr
    assert "Traceback" not in result.stderr


def test_export_refuses_a_metrics_file_of_the_wrong_shape_before_writing(tmp_path):
    from femb.backbones import create_backbone
    from femb.weights import save_backbone

    weights = save_backbone(create_backbone("iresnet_tiny"), tmp_path / "backbone.pth", "iresnet_tiny")
    (metrics := tmp_path / "metrics.json").write_text('{"lfw": {"accuracy": "0.9"}}')
    out = tmp_path / "model.onnx"
    result = run_femb("export", "--weights", str(weights), "--output", str(out), "--metrics", str(metrics))
    assert result.returncode == 1 and "not a metrics file" in result.stderr
    assert not out.exists() and not out.with_suffix(".md").exists()


def test_synth_flag_errors_name_the_flag_not_the_library_argument(tmp_path):
    result = run_femb("synth", str(tmp_path / "demo"), "--images-per-identity", "0")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "femb synth: --images-per-identity must be an integer in [1, 100000], got 0"
    ]
    assert not (tmp_path / "demo").exists()


def test_argument_names_rewords_only_errors_that_start_with_a_known_argument():
    import pytest

    from femb.errors import FembError, argument_names

    names = {"workers": "data.workers"}
    reworded = r"^data\.workers must be 0 \(one per core\) or more, got -1$"
    with pytest.raises(FembError, match=reworded), argument_names(names):
        raise FembError("workers must be 0 (one per core) or more, got -1")
    with pytest.raises(FembError, match="^src: no such directory$"), argument_names(names):
        raise FembError("src: no such directory")


def test_argument_names_anywhere_rewords_every_whole_word_mention():
    import pytest

    from femb.errors import FembError, argument_names

    names = {"lr": "train.lr", "num_workers": "train.num_workers"}
    message = "diverged (lr=0.1); lower lr, keep num_workers; train.lr_scale and clr stay"
    expected = r"^diverged \(train\.lr=0\.1\); lower train\.lr, keep train\.num_workers; train\.lr_scale and clr stay$"
    with pytest.raises(FembError, match=expected), argument_names(names, anywhere=True):
        raise FembError(message)
