"""Issue 13 point 6: the bad inputs and faults a hostile probe found, one test each, on real components.

Disk faults are real, never mocked: a full disk is a tiny tmpfs mounted in a private mount namespace
(`unshare -rm`, which needs neither root nor leaves a mount behind) or, where that is not allowed, a
file-size limit (RLIMIT_FSIZE with SIGXFSZ ignored: writes fail with EFBIG); a read-only directory is
a read-only tmpfs the same way, or a 0o555 directory when not running as root (root writes there).
"""

from __future__ import annotations

import functools
import json
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import simplejpeg
import torch
import yaml

from femb.cli import main
from femb.config import load_params
from femb.data.binfile import read_bin
from femb.data.convert import convert
from femb.data.decode import decode_batch, decode_rgb
from femb.data.recordio import write_insightface
from femb.embed import load_face_image, run_embed
from femb.errors import FembError
from femb.evaluation.evaluate import run_evaluate
from femb.training.preflight import preflight, usable_cores
from femb.training.run import train
from femb.weights import load_backbone
from tests.helpers import REPO

PYTHON = sys.executable


# --- helpers -------------------------------------------------------------------------------------------


def _descendants(pid: int) -> list[int]:
    """Every live process below `pid` (from /proc: children of each of its threads)."""
    found, todo = [], [pid]
    while todo:
        for task in Path(f"/proc/{todo.pop()}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                children = []
            found += children
            todo += children
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@functools.cache
def _private_mounts() -> bool:
    """Whether `unshare -rm` may mount a tmpfs here (a private mount namespace: nothing stays mounted)."""
    if shutil.which("unshare") is None or not Path("/proc/self/task").exists():
        return False
    probe = tempfile.mkdtemp()
    try:
        done = subprocess.run(
            ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {probe}"],
            capture_output=True,
            timeout=20,
        )
        return done.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False
    finally:
        os.rmdir(probe)


def _on_tmpfs(
    mount: Path, options: str, command: list[str], listed: Path, cwd: Path
) -> tuple[int, str, str, list[str]]:
    """Run `command` with a tmpfs (`options`) on `mount` in a private mount namespace.

    Returns its exit code, its stdout and stderr, and the names in `listed` afterwards (seen from
    inside: the mount goes away with the namespace).
    """
    mount.mkdir(exist_ok=True)
    script = (
        f'mount -t tmpfs -o {options} tmpfs "{mount}" || exit 99; "$@" >"{mount}.out" 2>"{mount}.err"; '
        f'rc=$?; ls -A "{listed}" 2>/dev/null > "{mount}.ls"; exit $rc'
    )
    done = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script, "sh", *command], cwd=cwd, timeout=120, env=_env()
    )
    assert done.returncode != 99, "could not mount the tmpfs"
    texts = [Path(f"{mount}.{kind}").read_text() for kind in ("out", "err", "ls")]
    return done.returncode, texts[0], texts[1], texts[2].split()


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def _limit_file_size(limit: int):  # noqa: ANN202 (a preexec_fn)
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def _params(tmp_path: Path, shards: Path, *overrides: str):
    return load_params(
        tmp_path / "absent.yaml",
        [f"data.shards={shards}", f"train.out_dir={tmp_path / 'run'}", "train.num_workers=0", *overrides],
    )


def _jpeg(seed: int = 0) -> bytes:
    y, x = np.mgrid[0:112, 0:112]
    rng = np.random.default_rng(seed)
    pixels = np.stack([x * 2, y * 2, x + y], -1) + rng.integers(0, 40, (112, 112, 3))
    return simplejpeg.encode_jpeg(np.clip(pixels, 0, 255).astype(np.uint8), quality=95)


def _corrupt_jpeg() -> bytes:
    """A JPEG whose scan stops half-way at an EOI: libjpeg warns "premature end of data segment"."""
    data = _jpeg(1)
    return data[: len(data) // 2] + b"\xff\xd9"


def _png16(seed: int = 0) -> tuple[bytes, np.ndarray]:
    """A 16-bit grayscale 112x112 PNG and its samples."""
    gray = np.random.default_rng(seed).integers(0, 1 << 16, (112, 112), dtype=np.uint16)
    ok, encoded = cv2.imencode(".png", gray)
    assert ok
    return encoded.tobytes(), gray


def _dataset(out: Path, images: list[bytes]) -> Path:
    """An InsightFace directory holding `images`, one class each."""
    write_insightface(out, np.arange(len(images)), images, 112)
    return out


# --- femb convert --verify and SIGINT ------------------------------------------------------------------


@pytest.mark.slow
def test_convert_verify_sigint_exits_promptly_without_orphan_workers(tmp_path):
    src = _dataset(tmp_path / "src", [_jpeg()] * 3000)
    for signals in (1, 2):  # the second Ctrl-C must not orphan the workers either
        out = tmp_path / f"out{signals}"
        command = [PYTHON, "-m", "femb", "convert", str(src), str(out), "--workers", "2"]
        proc = subprocess.Popen(
            [*command, "--shard-size-mb", "0.1", "--verify"],
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        seen: set[int] = set()
        try:
            started = time.monotonic()
            while proc.poll() is None and time.monotonic() - started < 60 and len(seen) < 3:
                seen.update(_descendants(proc.pid))  # forkserver, resource tracker, then workers
                time.sleep(0.02)
            assert proc.poll() is None, "convert ended before its workers were seen"
            for _ in range(signals):
                seen.update(_descendants(proc.pid))
                os.kill(proc.pid, signal.SIGINT)
                time.sleep(0.15)
            rc = proc.wait(timeout=15)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        assert rc in (130, -signal.SIGINT)
        deadline = time.monotonic() + 5
        while any(map(_alive, seen)) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = [pid for pid in seen if _alive(pid)]
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        assert not left, f"orphan processes after Ctrl-C: {left}"


# --- hardware params -----------------------------------------------------------------------------------


def test_devices_99_on_cpu_is_refused_before_any_process_or_run_json(tmp_path, demo_shards):
    if usable_cores() >= 99:
        pytest.skip("this machine has 99 cores")
    before = set(_descendants(os.getpid()))
    with pytest.raises(FembError, match=r"train\.devices=99 would start 99 training processes on \d+ CPU"):
        train(_params(tmp_path, demo_shards, "train.devices=99", "train.accelerator=cpu"), progress=False)
    assert set(_descendants(os.getpid())) <= before
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value", ["0", "-5", "abc", "0,0", "true"])
def test_devices_zero_negative_or_text_is_refused_naming_the_key(value):
    with pytest.raises(FembError, match=r"train\.devices: (expected 'auto'|GPU indices)"):
        load_params(Path("absent.yaml"), [f"train.devices={value}"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.accelerator=gpu", r"train\.accelerator=gpu: no GPU is available here"),
        ("train.accelerator=tpu", r"train\.accelerator=tpu: not available here"),
        ("train.accelerator=hpu", r"train\.accelerator: 'hpu' is not an accelerator; choose one of"),
        ("train.strategy=bogus", r"train\.strategy: 'bogus' is not a Lightning strategy; choose one of auto"),
        ("train.devices=0,1", r"train\.devices=0,1: GPU indices or -1 \(every GPU\) on a CPU run"),
    ],
)
def test_accelerator_or_strategy_that_cannot_run_is_refused_before_run_json(
    tmp_path, demo_shards, override, message
):
    if override in ("train.accelerator=gpu", "train.devices=0,1") and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(FembError, match=message):
        train(_params(tmp_path, demo_shards, override), progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value", ["[1", "a\tb", "!!python/object/apply:os.system ['touch pwned']"])
def test_set_with_bad_yaml_is_one_line_naming_the_override(tmp_path, capsys, value, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc = main(["train", "--params", str(tmp_path / "absent.yaml"), "-S", f"train.lr={value}"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1, err
    assert err.startswith(("femb train: --set 'train.lr=", 'femb train: --set "train.lr='))
    assert "the value is not plain YAML (" in err
    assert not (tmp_path / "pwned").exists()


# --- values that pass validation, then crash ----------------------------------------------------------


def test_batch_size_1_with_batchnorm_is_refused_before_run_json(tmp_path, demo_shards):
    with pytest.raises(FembError, match=r"train\.batch_size=1: iresnet_tiny has BatchNorm.*at least 2"):
        train(_params(tmp_path, demo_shards, "train.batch_size=1"), progress=False)
    assert not (tmp_path / "run").exists()


def test_embedding_size_1e9_is_refused_with_the_memory_it_needs(tmp_path, demo_shards):
    with pytest.raises(FembError, match=r"train: needs at least [\d.,]+ TB per rank.*lower embedding_size"):
        train(_params(tmp_path, demo_shards, "embedding_size=1000000000"), progress=False)
    assert not (tmp_path / "run").exists()


def test_property_claiming_1e12_classes_is_refused_at_convert_and_in_training(tmp_path, capsys):
    src = _dataset(tmp_path / "src", [_jpeg(), _jpeg(1)])
    (src / "property").write_text("1000000000000,112,112")
    assert main(["convert", str(src), str(tmp_path / "out"), "--workers", "1"]) == 1
    err = capsys.readouterr().err
    assert "property: says 1,000,000,000,000 classes" in err and "2^24" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()

    # A manifest written elsewhere can still claim them: the training cost is checked up front.
    params = load_params(tmp_path / "absent.yaml", ["train.accelerator=cpu"])
    with pytest.raises(
        FembError,
        match=r"class centres [\d.,]+ [TP]B \(1,000,000,000,000 classes per rank x 512 "
        r"features x 12 bytes.*set train\.partial_fc\.enabled=true with more train\.devices",
    ):
        preflight(params, 10**12)
    sharded = load_params(tmp_path / "absent.yaml", ["train.partial_fc.enabled=true"])
    with pytest.raises(FembError, match=r"add train\.devices / train\.num_nodes \(1 rank\(s\) share"):
        preflight(sharded, 10**12)
    preflight(params, 93_431)  # MS1MV3's 93k identities fit


# --- images --------------------------------------------------------------------------------------------


def test_16bit_png_decodes_as_opencv_does_in_train_evaluate_embed_and_verify_warns(tmp_path, caplog):
    png, gray = _png16()
    expected = np.repeat((gray >> 8).astype(np.uint8)[..., None], 3, axis=2)
    opencv = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
    assert np.array_equal(expected, opencv)
    assert np.array_equal(decode_rgb(png), expected)  # PIL alone gives 255 almost everywhere
    assert np.array_equal(decode_rgb(png, mirror=True), expected[:, ::-1])
    batch = decode_batch([png, png], flip=np.array([False, True]))  # the loader's and evaluation's path
    assert np.array_equal(batch[0].permute(1, 2, 0).numpy(), expected)
    assert np.array_equal(batch[1].permute(1, 2, 0).numpy(), expected[:, ::-1])
    (tmp_path / "face.png").write_bytes(png)
    assert np.array_equal(load_face_image(tmp_path / "face.png"), expected)  # femb embed's reader

    src = _dataset(tmp_path / "src", [_jpeg(), png])
    with caplog.at_level("WARNING"):
        convert(src, tmp_path / "out", verify=True, workers=1, progress=False)
    warned = [r.getMessage() for r in caplog.records if "repairs or reductions" in r.getMessage()]
    assert len(warned) == 1 and "keys 2 (key 2: a 16-bit PNG, reduced to 8 bits" in warned[0], warned


def test_verify_warns_about_jpegs_libjpeg_reports_corrupt_naming_the_key(tmp_path, caplog):
    bad = _corrupt_jpeg()
    with pytest.raises(ValueError, match="premature end of data segment"):
        simplejpeg.decode_jpeg(bad)  # libjpeg-turbo's own verdict, strictly
    src = _dataset(tmp_path / "src", [_jpeg(), _jpeg(2), bad])
    with caplog.at_level("WARNING"):
        convert(src, tmp_path / "out", verify=True, workers=1, progress=False)
    warned = [r.getMessage() for r in caplog.records if "repairs or reductions" in r.getMessage()]
    assert len(warned) == 1, warned
    assert "train.rec: 1 image(s)" in warned[0] and "keys 3 (key 3: libjpeg-turbo reports" in warned[0]
    assert "premature end of data segment" in warned[0]


# --- .bin pair sets ------------------------------------------------------------------------------------


def test_bin_with_deeply_nested_or_huge_issame_gives_one_short_line(tmp_path):
    depth = 100_000
    # (bins, issame) with issame = [[[[...]]]] 100,000 deep, written opcode by opcode (pickle.dumps recurses).
    nested = b"\x80\x02(](C\x01aC\x01be]" + b"]" * depth + b"a" * depth + b"t."
    (tmp_path / "deep.bin").write_bytes(nested)
    with pytest.raises(FembError) as deep:
        read_bin(tmp_path / "deep.bin")
    assert str(deep.value) == f"{tmp_path / 'deep.bin'}: issame[0] is list [[[[...]]]], expected a bool"

    (tmp_path / "huge.bin").write_bytes(pickle.dumps(([b"a", b"b"], [list(range(300_000))]), protocol=4))
    with pytest.raises(FembError, match=r"huge\.bin: issame\[0\] is list \[0, 1, 2, 3, \.\.\.\]") as huge:
        read_bin(tmp_path / "huge.bin")
    assert len(str(huge.value)) < 200

    (tmp_path / "global.bin").write_bytes(b"\x80\x02c" + b"m" * 100_000 + b"\nf\n.")
    with pytest.raises(
        FembError, match=r"global\.bin: refuses to load: the pickle names the global mmm"
    ) as name:
        read_bin(tmp_path / "global.bin")
    assert len(str(name.value)) < 400


# --- weights -------------------------------------------------------------------------------------------


def _onnx_model(path: Path, squeeze: bool) -> Path:
    """`data` N x 3 x 112 x 112 -> its channel means N x 3 x 1 x 1 (or squeezed: rank unknown until run)."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [helper.make_node("ReduceMean", ["data", "axes"], ["mean"], keepdims=1)]
    shape: list | None = ["N", 3, 1, 1]
    if squeeze:
        nodes.append(helper.make_node("Squeeze", ["mean"], ["embedding"]))
        shape = None
    else:
        nodes[0].output[0] = "embedding"
    graph = helper.make_graph(
        nodes,
        "not_n_by_d",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", 3, 112, 112])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, shape)],
        initializer=[helper.make_tensor("axes", TensorProto.INT64, [2], [2, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_onnx_output_that_is_not_n_by_d_is_refused_by_embed_and_evaluate(tmp_path, demo_shards):
    four = _onnx_model(tmp_path / "four.onnx", squeeze=False)
    (tmp_path / "face.jpg").write_bytes(_jpeg())
    with pytest.raises(
        FembError, match=r"four\.onnx: its output 'embedding' is N x 3 x 1 x 1, expected N x D"
    ):
        run_embed(None, four, tmp_path / "emb.npy", [tmp_path / "face.jpg"], progress=False)
    assert not (tmp_path / "emb.npy").exists()
    with pytest.raises(FembError, match=r"four\.onnx: its output 'embedding' is N x 3 x 1 x 1"):
        run_evaluate(four, [demo_shards / "demo.parquet"], tmp_path / "eval.json", progress=False)

    # A graph whose output rank is known only when it runs: one image squeezes to a 1-D output.
    squeezed = load_backbone(_onnx_model(tmp_path / "squeeze.onnx", squeeze=True))
    assert squeezed(torch.zeros(2, 3, 112, 112)).shape == (2, 3)
    with pytest.raises(FembError, match=r"squeeze\.onnx: gave an output of shape \[3\] for 1 images"):
        squeezed(torch.zeros(1, 3, 112, 112))


def test_malicious_pth_names_the_blocked_global_without_weights_only_false_advice(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"fc.weight": torch.zeros(2, 2), "x": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(FembError) as refused:
        load_backbone(tmp_path / "evil.pth")
    message = str(refused.value)
    assert f"{tmp_path / 'evil.pth'}: refused to load: the pickle names the global posix.system" in message
    assert "weights_only=False" not in message and "\n" not in message
    assert not marker.exists()


# --- params files and stages ---------------------------------------------------------------------------


def _stage(name: str, cwd: Path, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, "-m", f"stages.{name}", *args],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
        **kwargs,
    )


def _tiny_params(directory: Path, shards: str = "data/shards") -> None:
    """A params.yaml whose synth stage writes 8 images and two pair sets of 10."""
    synth = {"identities": 4, "images_per_identity": 2, "pairs": 10, "seed": 1}
    (directory / "params.yaml").write_text(yaml.safe_dump({"data": {"shards": shards, "synth": synth}}))


@pytest.mark.slow
def test_non_utf8_params_yaml_is_one_line_in_stages_and_femb_train(tmp_path, capsys, monkeypatch):
    (tmp_path / "params.yaml").write_bytes(b"train: {lr: 0.1}\n# caf\xe9\n")
    expected = "params.yaml: not UTF-8 text (byte 0xe9 at line 2); save the file as UTF-8"
    done = _stage("params", tmp_path)
    assert done.returncode == 1 and done.stderr == f"stage params: {expected}\n", done.stderr
    monkeypatch.chdir(tmp_path)
    assert main(["train"]) == 1
    assert capsys.readouterr().err == f"femb train: {expected}\n"


@pytest.mark.slow
def test_stage_io_errors_are_one_line_naming_the_file(tmp_path):
    _tiny_params(tmp_path, shards="none")
    done = _stage("export", tmp_path, "metrics.json")  # export before any convert: no shards
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("stage export: none/manifest.json: no manifest fingerprint")

    _tiny_params(tmp_path)
    if _private_mounts():
        rc, _, err, listed = _on_tmpfs(
            tmp_path / "ro",
            "ro,size=64k",
            [PYTHON, "-m", "stages.synth", str(tmp_path / "ro/demo")],
            tmp_path / "ro",
            tmp_path,
        )
        assert rc == 1 and err == f"stage synth: {tmp_path / 'ro/demo'}: Read-only file system\n", err
        rc, _, err, listed = _on_tmpfs(
            tmp_path / "full",
            "size=64k",
            [PYTHON, "-m", "stages.synth", str(tmp_path / "full/demo")],
            tmp_path / "full/demo",
            tmp_path,
        )
        assert rc == 1 and err.count("\n") == 1, err
        assert err.startswith(f"stage synth: {tmp_path / 'full/demo'}/") and "No space left on device" in err
        assert not [name for name in listed if name.endswith(".tmp")]
    elif os.geteuid() != 0:
        (tmp_path / "ro").mkdir(mode=0o555)
        done = _stage("synth", tmp_path, str(tmp_path / "ro/demo"))
        assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
        assert "Permission denied" in done.stderr
    else:
        pytest.skip("root writes into 0o555 directories and `unshare -rm` may not mount a tmpfs here")


# --- full disk -----------------------------------------------------------------------------------------

_KEEP_THE_ERROR = """
import os, sys
from femb.data.synth import synthesize
try:
    synthesize(sys.argv[1], identities=10, images_per_identity=5, pairs=20, progress=False)
except OSError as err:
    kept = err  # as a caller that logs or retries holds it (Prefect keeps it in the task state)
    print(err.filename, sorted(os.listdir(sys.argv[1])))
"""


@pytest.mark.slow
def test_full_disk_synth_leaves_no_temp_files_and_names_the_file(tmp_path):
    out = tmp_path / "limited"
    command = [PYTHON, "-m", "femb", "synth", str(out), "--identities", "10", "--images-per-identity", "5"]
    done = subprocess.run(
        [*command, "--pairs", "20"],
        capture_output=True,
        text=True,
        preexec_fn=_limit_file_size(50_000),
        timeout=120,
    )
    assert done.returncode == 1, done.stderr
    assert (
        done.stderr == f"femb synth: {out}/train.rec: File too large (larger than the file system or "
        "the file size limit, ulimit -f, allows)\n"
    )
    assert os.listdir(out) == []

    # While the error is still referenced, nothing of the half-written files remains either.
    kept = subprocess.run(
        [PYTHON, "-c", _KEEP_THE_ERROR, str(tmp_path / "kept")],
        capture_output=True,
        text=True,
        preexec_fn=_limit_file_size(50_000),
        timeout=120,
    )
    assert kept.stdout == f"{tmp_path / 'kept'}/train.rec []\n", kept.stderr

    if not _private_mounts():
        pytest.skip("`unshare -rm` may not mount a tmpfs here: the real ENOSPC case is not run")
    for size in ("64k", "144k", "200k"):  # full while writing train.rec, property, demo.bin
        rc, _, err, listed = _on_tmpfs(
            tmp_path / f"disk{size}",
            f"size={size}",
            [*command[:4], str(tmp_path / f"disk{size}/s"), *command[5:], "--pairs", "20"],
            tmp_path / f"disk{size}/s",
            tmp_path,
        )
        assert rc == 1 and err.count("\n") == 1, err
        assert err.startswith(f"femb synth: {tmp_path / f'disk{size}/s'}/"), err
        assert err.endswith(": No space left on device (the disk is full: free space or write elsewhere)\n")
        assert not [name for name in listed if name.endswith(".tmp")], listed


_WRITES_ON_FULL_DISK = """
import json, sys, torch
from femb.io import atomic_path, write_json
out, result = sys.argv[1], {}
def save(path):
    with atomic_path(path) as tmp:
        torch.save({"w": torch.zeros(100_000)}, tmp)  # torch reports "file write failed", no OSError
for write, path in ((lambda p: write_json(p, {"x": "y" * 100_000}), "m.json"), (save, "w.pth")):
    try:
        write(f"{out}/{path}")
    except OSError as err:
        result[path] = [err.filename, err.strerror]
print(json.dumps(result))
"""


@pytest.mark.slow
def test_json_and_torch_save_on_a_full_disk_name_the_file(tmp_path):
    if not _private_mounts():
        pytest.skip("`unshare -rm` may not mount a tmpfs here: no real ENOSPC without root")
    disk = tmp_path / "disk"
    rc, out, err, listed = _on_tmpfs(
        disk, "size=64k", [PYTHON, "-c", _WRITES_ON_FULL_DISK, str(disk)], disk, tmp_path
    )
    assert rc == 0, err
    full = "No space left on device (the disk is full: free space or write elsewhere)"
    assert json.loads(out) == {"m.json": [f"{disk}/m.json", full], "w.pth": [f"{disk}/w.pth", full]}
    assert listed == []
