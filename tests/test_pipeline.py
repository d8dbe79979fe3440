"""The DVC pipeline: dvc.yaml agrees with params.yaml, stages fail in one line, and the whole job runs.

The end-to-end test builds a git repository from this checkout in a temporary directory, shrinks the
demo, and drives the real `dvc` of this environment: `dvc repro`, a no-op repro, `dvc status` after a
head's hyper-parameter changes, `dvc exp run -S header=cosface`, a queued sweep, `dvc push` to a
remote in the temporary directory, and in a second clone `dvc pull`, `dvc get --rev` and
`dvc.api.open` of the model at two revisions.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.helpers import REPO, copy_checkout, shrink_demo

BIN = Path(sys.executable).parent  # the environment's bin: its `dvc`, and the `python` stages run
DVC = BIN / "dvc"
STAGES = ("params", "synth", "convert", "train", "evaluate", "export")


def environment() -> dict[str, str]:
    """This environment first on PATH (dvc runs `python -m stages.<name>`), DVC quiet and offline."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "DVC_NO_ANALYTICS": "1"}
    env.pop("PYTHONPATH", None)  # stages import femb from the repository they run in
    return env


def run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> str:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def dotted_keys(data: object, prefix: str = "") -> set[str]:
    """Every key path of a nested mapping: {'a': {'b': 1}} -> {'a', 'a.b'}."""
    if not isinstance(data, dict):
        return set()
    keys: set[str] = set()
    for key, value in data.items():
        path = f"{prefix}{key}"
        keys |= {path} | dotted_keys(value, f"{path}.")
    return keys


def test_dvc_yaml_names_only_keys_that_params_yaml_holds():
    """DVC fails on a `${key}` or a params dependency that params.yaml lacks, defaults notwithstanding."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    pipeline = yaml.safe_load((REPO / "dvc.yaml").read_text())
    keys = dotted_keys(params)
    text = (REPO / "dvc.yaml").read_text()
    interpolated = set(re.findall(r"\$\{([^}]+)\}", text))
    assert {"header", "data.source", "data.shards", "train.out_dir"} <= interpolated
    assert interpolated <= keys
    assert list(pipeline["stages"]) == list(STAGES)
    for name, stage in pipeline["stages"].items():
        assert stage["cmd"].startswith(f"python -m stages.{name}")
        assert (REPO / "stages" / f"{name}.py").is_file()
        for entry in stage.get("params", []):
            if isinstance(entry, str):
                assert entry.replace("${header}", params["header"]) in keys, (name, entry)


def test_train_depends_on_the_trained_heads_hyperparameters_only():
    train = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["train"]
    assert "headers.${header}" in train["params"] and "headers" not in train["params"]
    synth_convert = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert all("header" not in str(synth_convert[s].get("params")) for s in ("synth", "convert"))


def test_dvc_config_turns_analytics_off_and_names_a_remote_outside_the_work_tree():
    from configobj import ConfigObj

    config = ConfigObj(str(REPO / ".dvc" / "config"))
    assert config["core"]["analytics"] == "false"
    url = config[f'remote "{config["core"]["remote"]}"']["url"]
    assert url.startswith("~/")  # shared by every clone of this user; relative paths follow the clone


@pytest.mark.parametrize("stage", ["params", "synth", "train"])
def test_stage_prints_a_params_error_as_one_line_and_exits_1(tmp_path, stage):
    (tmp_path / "params.yaml").write_text("header: magfce\n")
    env = {**environment(), "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", f"stages.{stage}", "out"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith(f"stage {stage}: params.yaml: header: 'magfce' is not a head; choose one of ")
    assert "arcface" in lines[0] and "magface" in lines[0]
    assert not (tmp_path / "out").exists()


def wait_for_queue(repo: Path, env: dict[str, str], timeout: float) -> str:
    """Poll `dvc queue status` until nothing is queued or running; the last status."""
    deadline = time.monotonic() + timeout
    while True:
        status = run([str(DVC), "queue", "status"], repo, env)
        if not re.search(r"\b(Queued|Running)\b", status):
            return status
        assert time.monotonic() < deadline, f"queue still busy after {timeout} s:\n{status}"
        time.sleep(2)


def experiments(repo: Path, env: dict[str, str]) -> list[dict]:
    """{'name', 'header', 'hparams', 'accuracy'} of the baseline and each experiment, from `dvc exp show`."""
    rows = []
    for baseline in json.loads(run([str(DVC), "exp", "show", "--json"], repo, env)):
        revs = [baseline] + [rev for exp in baseline.get("experiments") or [] for rev in exp["revs"]]
        for rev in revs:
            data = rev.get("data") or {}
            params = data.get("params", {}).get("params.yaml", {}).get("data", {})
            metrics = data.get("metrics", {}).get("metrics/eval.json", {}).get("data", {})
            rows.append(
                {
                    "name": rev.get("name") or rev["rev"],
                    "header": params.get("header"),
                    "hparams": params.get("headers", {}).get(params.get("header")),
                    "accuracy": metrics.get("demo", {}).get("accuracy"),
                }
            )
    return rows


def check_model(path: Path) -> None:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    data = np.random.default_rng(0).uniform(-1, 1, (2, 3, 112, 112)).astype(np.float32)
    (embedding,) = session.run(["embedding"], {"data": data})
    assert embedding.shape == (2, 512) and np.isfinite(embedding).all()


@pytest.mark.slow
@pytest.mark.skipif(not DVC.exists(), reason="dvc is not installed in this environment")
def test_pipeline_runs_experiments_and_versions_models_from_a_fresh_clone(tmp_path, monkeypatch):
    env = {**environment(), "DVC_SITE_CACHE_DIR": str(tmp_path / "dvc-site")}  # DVC's locks and indexes
    repo, remote, clone = tmp_path / "repo", tmp_path / "remote", tmp_path / "clone"
    copy_checkout(repo)
    shrink_demo(repo)
    run(["git", "-c", "init.defaultBranch=main", "init", "-q"], repo, env)
    run(["git", "config", "user.name", "femb test"], repo, env)
    run(["git", "config", "user.email", "test@femb.invalid"], repo, env)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "small demo"], repo, env)
    run([str(DVC), "remote", "add", "--local", "-d", "test", str(remote)], repo, env)

    # The whole job, then nothing to do.
    log = run([str(DVC), "repro"], repo, env)
    for stage in STAGES:
        assert f"Running stage '{stage}'" in log
    eval_metrics = json.loads((repo / "metrics" / "eval.json").read_text())
    assert 0.0 <= eval_metrics["demo"]["accuracy"] <= 1.0 and "demo_hard" in eval_metrics
    assert json.loads((repo / "metrics" / "train.json").read_text())["steps"] == 4
    assert {p.name for p in (repo / "plots" / "roc").iterdir()} >= {"roc_demo.csv", "roc.png"}
    assert (repo / "models" / "train" / "dvclive" / "plots" / "metrics" / "val" / "accuracy.tsv").exists()
    check_model(repo / "models" / "model.onnx")
    assert "arcface" in (repo / "models" / "model.md").read_text()
    started = time.monotonic()
    assert "Data and pipelines are up to date" in run([str(DVC), "repro"], repo, env)
    assert time.monotonic() - started < 30
    assert "demo.accuracy" in run([str(DVC), "metrics", "show"], repo, env)
    run([str(DVC), "plots", "show", "-o", str(tmp_path / "plots")], repo, env)
    assert (tmp_path / "plots" / "index.html").exists()
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "arcface run"], repo, env)
    first_rev = run(["git", "rev-parse", "HEAD"], repo, env).strip()
    first_model = (repo / "models" / "model.onnx").read_bytes()
    run([str(DVC), "push"], repo, env)

    # The trained head's hyper-parameter reruns train onward, another head's reruns nothing.
    params_text = (repo / "params.yaml").read_text()
    params = yaml.safe_load(params_text)
    params["headers"]["arcface"]["m"] = 0.45
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = run([str(DVC), "status"], repo, env)
    assert re.search(r"^train:", status, re.M) and not re.search(r"^(synth|convert):", status, re.M)
    params["headers"]["arcface"]["m"] = 0.5
    params["headers"]["magface"]["l_m"] = 0.5
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = run([str(DVC), "status"], repo, env)
    assert re.findall(r"^(\w+):", status, re.M) == ["params"]
    # A wrong head fails the first stage, in one line that lists the heads.
    (repo / "params.yaml").write_text(params_text.replace("header: arcface", "header: magfce"))
    failed = subprocess.run(
        [str(DVC), "repro"], cwd=repo, env=env, capture_output=True, text=True, timeout=300
    )
    assert failed.returncode != 0 and "Traceback" not in failed.stdout + failed.stderr
    assert "stage params: params.yaml: header: 'magfce' is not a head; choose one of " in failed.stderr
    (repo / "params.yaml").write_text(params_text)

    # An experiment with another head: train onward only, results in the workspace.
    log = run([str(DVC), "exp", "run", "-S", "header=cosface"], repo, env)
    assert "Stage 'convert' didn't change" in log and "Running stage 'train'" in log
    assert "Running stage 'export'" in log
    assert yaml.safe_load((repo / "params.yaml").read_text())["header"] == "cosface"
    assert "cosface" in (repo / "models" / "model.md").read_text()
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "cosface run"], repo, env)
    second_model = (repo / "models" / "model.onnx").read_bytes()
    assert second_model != first_model
    run([str(DVC), "push"], repo, env)

    # A queued sweep over two heads, run by a background worker.
    run([str(DVC), "exp", "run", "--queue", "-S", "header=arcface,magface"], repo, env)
    run([str(DVC), "queue", "start"], repo, env)
    status = wait_for_queue(repo, env, timeout=240)
    assert "Failed" not in status, status
    found = experiments(repo, env)
    heads = {exp["header"]: exp for exp in found}
    assert {"cosface", "arcface", "magface"} <= set(heads), found
    assert heads["magface"]["hparams"]["l_m"] == 0.45
    assert all(exp["accuracy"] is not None and 0.0 <= exp["accuracy"] <= 1.0 for exp in heads.values()), found

    # A second clone pulls the model; `dvc get` and dvc.api.open read it at either revision.
    run(["git", "clone", "-q", str(repo), str(clone)], tmp_path, env)
    run([str(DVC), "remote", "add", "--local", "-d", "test", str(remote)], clone, env)
    run([str(DVC), "pull", "export"], clone, env)
    assert (clone / "models" / "model.onnx").read_bytes() == second_model
    check_model(clone / "models" / "model.onnx")
    run(
        [str(DVC), "get", str(clone), "models/model.onnx", "--rev", first_rev, "-o", "first.onnx"],
        tmp_path,
        env,
    )
    assert (tmp_path / "first.onnx").read_bytes() == first_model
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    import dvc.api

    with dvc.api.open("models/model.onnx", repo=str(clone), rev=first_rev, mode="rb") as f:
        assert f.read() == first_model
    assert "arcface" in dvc.api.read("models/model.md", repo=str(clone), rev=first_rev)
