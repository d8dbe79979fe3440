"""The Prefect flows drive the real dvc: retries, failures, schedules and the head comparison.

Flows run against one temporary Prefect server (`prefect_test_harness`, started once). The pipeline
and retrain tests use a small git + DVC repository whose `train` stage is a script each test rewrites
to crash once, fail for ever or print a config error; the comparison runs the real femb pipeline on a
shrunk demo in a copy of this checkout.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from femb.errors import FembError
from flows.common import DvcError, classify_failure, failure_reason
from tests.helpers import copy_checkout, shrink_demo

DVC = Path(sys.executable).parent / "dvc"

pytestmark = pytest.mark.skipif(not DVC.exists(), reason="dvc is not installed in this environment")

PIPELINE = """\
stages:
  train:  # listed first: the flow must still run convert before it
    cmd: python train.py
    deps: [shards.txt, train.py]
    outs: [model.txt]
  convert:
    cmd: python convert.py
    deps: [source.txt, convert.py]
    params: [scale]
    outs: [shards.txt]
"""
CONVERT = """\
import yaml
scale = yaml.safe_load(open("params.yaml"))["scale"]
open("shards.txt", "w").write(open("source.txt").read() * scale)
"""
TRAIN_OK = """\
open("attempts", "a").write("x")
open("model.txt", "w").write("model of " + open("shards.txt").read())
"""
TRAIN_CRASHES_ONCE = """\
import os, signal
open("attempts", "a").write("x")
if not os.path.exists("crashed"):
    open("crashed", "w").close()
    print("training...", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer would
open("model.txt", "w").write("model of " + open("shards.txt").read())
"""
TRAIN_PREEMPTED_ONCE = """\
import os, sys
open("attempts", "a").write("x")
if not os.path.exists("preempted"):
    open("preempted", "w").close()
    print("Preempted by SIGTERM at step 120: saved last.ckpt; exiting with status 75", file=sys.stderr)
    sys.exit(75)  # as femb train does after its checkpoint (femb/training/preemption.py)
open("model.txt", "w").write("model of " + open("shards.txt").read())
"""
TRAIN_IO_ERROR = """\
import sys
open("attempts", "a").write("x")
sys.exit("OSError: [Errno 5] Input/output error: '/mnt/faces/train.rec'")
"""
TRAIN_CONFIG_ERROR = """\
import sys
open("attempts", "a").write("x")
sys.exit("stage train: params.yaml: train.lr: Input should be greater than 0 (got -0.1)")
"""


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)


def dvc(repo: Path, *args: str) -> str:
    env = {**os.environ, "PATH": f"{DVC.parent}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    result = subprocess.run([str(DVC), *args], cwd=repo, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def init_repo(repo: Path) -> None:
    git(repo, "-c", "init.defaultBranch=main", "init", "-q")
    git(repo, "config", "user.name", "femb test")
    git(repo, "config", "user.email", "test@femb.invalid")
    dvc(repo, "init", "-q")
    dvc(repo, "config", "core.analytics", "false")


def attempts(repo: Path) -> int:
    path = repo / "attempts"
    return len(path.read_text()) if path.exists() else 0


@pytest.fixture(scope="session")
def prefect_server():
    """One temporary Prefect server and database for every flow test of the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    """A git + DVC repository: convert (source.txt x scale) -> train (a script that tests rewrite)."""
    repo = tmp_path / "repo"
    repo.mkdir()
    init_repo(repo)
    (repo / "dvc.yaml").write_text(PIPELINE)
    (repo / "params.yaml").write_text("scale: 2\n")
    (repo / "source.txt").write_text("faces;")
    (repo / "convert.py").write_text(CONVERT)
    (repo / "train.py").write_text(TRAIN_OK)
    return repo


# The failure rule, on lines that dvc and the stages print: permanent when, and only when, dvc was not
# killed by a signal and the log shows a femb user error or DVC refusing its definition; else transient.


@pytest.mark.parametrize(
    ("returncode", "stderr", "kind"),
    [
        (1, ["stage train: params.yaml: train.lr: Input should be greater than 0 (got -1)"], "permanent"),
        (-15, ["stage train: params.yaml: train.lr: Input should be greater than 0 (got -1)"], "transient"),
        (1, ["ERROR: Stage 'zz' not found inside 'dvc.yaml' file"], "permanent"),
        (-9, ["ERROR: Stage 'zz' not found inside 'dvc.yaml' file"], "transient"),
        (1, ["something nobody has seen before"], "transient"),
        # Preempted (exit 75): the checkpoint is saved and a retry resumes, whatever else was printed.
        (
            255,
            [
                "stage train: params.yaml: train.lr: Input should be greater than 0 (got -1)",
                "ERROR: failed to reproduce 'train': failed to run: python -m stages.train out, exited with 75",
            ],
            "transient",
        ),
        (75, ["femb train: anything"], "transient"),
        (1, [], "transient"),
    ],
)
def test_the_failure_rule_is_one_statement(returncode, stderr, kind):
    assert classify_failure(returncode, stderr) == kind


@pytest.mark.parametrize(
    ("returncode", "stderr"),
    [
        (255, ["ERROR: failed to reproduce 'train': failed to run: python -m stages.train, exited with -9"]),
        (
            255,
            [
                "ERROR: Unable to acquire lock. Most likely another DVC process is running or was terminated "
                "abruptly."
            ],
        ),
        (
            255,
            ["torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", "ERROR: failed ..."],
        ),
        (255, ["ERROR: failed to reproduce 'convert': [Errno 2] No such file or directory: '/mnt/faces'"]),
        (255, ["requests.exceptions.ConnectionError: ('Connection aborted.', ...)"]),
        (255, ["Traceback (most recent call last):", "KeyError: 'x'", "ERROR: failed to reproduce 'train'"]),
        (-9, []),
    ],
)
def test_crashes_locks_gpu_network_and_unknown_failures_are_transient(returncode, stderr):
    assert classify_failure(returncode, stderr) == "transient"


@pytest.mark.parametrize(
    "stderr",
    [
        ["stage train: params.yaml: header: 'magfce' is not a head; choose one of arcface, cosface"],
        ["femb convert: data/raw/train.rec: record 18231 at offset 73400320 is truncated"],
        ["ERROR: failed to parse 'stages.train.cmd' in 'dvc.yaml': Could not find 'train.out'"],
        ["ERROR: failed to reproduce 'a': Parameters 'y' are missing from 'params.yaml'."],
        ["ERROR: unable to read: 'params.yaml', YAML file structure is corrupted: while parsing"],
        ["ERROR: Invalid `--set-param` value: Could not override 'zz'."],
        ["ERROR: Stage 'zz' not found inside 'dvc.yaml' file"],
        ["ERROR: failed to push data to the cloud - config file error: no remote specified in /srv/femb."],
        ["stage train: params.yaml: train.accelerator: 'cuda' requested but no CUDA device is visible"],
        [
            "You are using a CUDA device ('NVIDIA H200') that has Tensor Cores. To properly utilize them, ...",
            "stage train: training diverged: the loss is nan at step 812 (lr=0.1, precision=16-mixed); lower ...",
            "ERROR: failed to reproduce 'train': failed to run: python -m stages.train, exited with 1",
        ],
        ["'./dvc.yaml' is invalid.", "", "Mapping values are not allowed here, in line 7, column 58"],
    ],
)
def test_user_errors_and_pipeline_definition_errors_are_permanent(stderr):
    assert classify_failure(255, stderr) == "permanent"


def test_failure_reason_is_the_user_error_else_the_exception_and_dvc_error_line():
    user = [
        "stage train: params.yaml: train.lr: must be > 0",
        "ERROR: failed to reproduce 'train': exited with 1",
    ]
    assert failure_reason(255, user) == "stage train: params.yaml: train.lr: must be > 0"
    crash = [
        "Traceback (most recent call last):",
        '  File "x.py", line 1, in <module>',
        "RuntimeError: CUDA error: an illegal memory access was encountered",
        "ERROR: failed to reproduce 'train': failed to run: python train.py, exited with 1",
        "",
        "Having any troubles? Hit us up at https://dvc.org/support, we are always happy to help!",
    ]
    assert failure_reason(255, crash) == (
        "RuntimeError: CUDA error: an illegal memory access was encountered; "
        "ERROR: failed to reproduce 'train': failed to run: python train.py, exited with 1"
    )
    assert "status 3" in failure_reason(3, [])


# The pipeline flow on a real dvc repository.


@pytest.mark.slow
def test_pipeline_retries_a_stage_killed_once_and_completes_in_dag_order(prefect_server, workspace):
    from flows.pipeline import pipeline

    (workspace / "train.py").write_text(TRAIN_CRASHES_ONCE)
    outcome = pipeline(repo=str(workspace), retries=2, retry_delay=0)
    assert outcome == {"convert": "ran", "train": "ran"}
    assert list(outcome) == ["convert", "train"]
    assert attempts(workspace) == 2
    assert (workspace / "model.txt").read_text() == "model of faces;faces;"
    assert json.loads(dvc(workspace, "status", "--json")) == {}
    assert pipeline(repo=str(workspace), retries=0, retry_delay=0) == {
        "convert": "unchanged",
        "train": "unchanged",
    }


def test_the_preempted_status_is_the_one_femb_train_exits_with():
    from femb.training.preemption import EXIT_PREEMPTED
    from flows.common import PREEMPTED_STATUS

    assert PREEMPTED_STATUS == EXIT_PREEMPTED == 75


@pytest.mark.slow
def test_pipeline_retries_a_preempted_stage_as_transient(prefect_server, workspace):
    from flows.pipeline import pipeline

    (workspace / "train.py").write_text(TRAIN_PREEMPTED_ONCE)
    assert pipeline(repo=str(workspace), retries=1, retry_delay=0) == {"convert": "ran", "train": "ran"}
    assert attempts(workspace) == 2
    assert (workspace / "model.txt").read_text() == "model of faces;faces;"


@pytest.mark.slow
def test_pipeline_fails_with_the_stage_error_and_restores_previous_outputs(prefect_server, workspace):
    from flows.pipeline import pipeline

    pipeline(repo=str(workspace), retries=0, retry_delay=0)
    before = {name: (workspace / name).read_bytes() for name in ("shards.txt", "model.txt", "dvc.lock")}
    (workspace / "train.py").write_text(TRAIN_IO_ERROR)
    (workspace / "attempts").unlink()

    state = pipeline(repo=str(workspace), retries=2, retry_delay=0, return_state=True)
    assert state.is_failed()
    assert "Input/output error: '/mnt/faces/train.rec'" in state.message
    with pytest.raises(DvcError, match=r"repro --single-item train: OSError: \[Errno 5\] Input/output error"):
        state.result()
    assert attempts(workspace) == 3  # a transient failure: the first try and two retries
    assert {name: (workspace / name).read_bytes() for name in before} == before


@pytest.mark.slow
def test_pipeline_does_not_retry_a_config_error(prefect_server, workspace):
    from flows.pipeline import pipeline

    (workspace / "train.py").write_text(TRAIN_CONFIG_ERROR)
    with pytest.raises(DvcError) as raised:
        pipeline(repo=str(workspace), retries=3, retry_delay=0)
    assert raised.value.kind == "permanent"
    assert str(raised.value).endswith(
        "stage train: params.yaml: train.lr: Input should be greater than 0 (got -0.1)"
    )
    assert attempts(workspace) == 1
    assert (workspace / "shards.txt").read_text() == "faces;faces;"  # the stage before it completed


def test_pipeline_refuses_an_unknown_stage_in_one_line(prefect_server, workspace, capsys):
    from flows.pipeline import main

    assert main(["--repo", str(workspace), "trian"]) == 1
    message = (
        "python -m flows.pipeline: stages: 'trian' is not a stage of dvc.yaml; choose from convert, train\n"
    )
    assert message in capsys.readouterr().err
    assert not (workspace / "shards.txt").exists()


# The retrain flow and its schedule.


@pytest.mark.slow
def test_retrain_runs_and_pushes_only_when_the_data_changed(prefect_server, workspace, tmp_path):
    from flows.retrain import retrain

    remote = tmp_path / "remote"
    dvc(workspace, "remote", "add", "--local", "-d", "test", str(remote))
    first = retrain(repo=str(workspace), retries=0, retry_delay=0)
    assert set(first["changed"]) == {"convert"} and first["pushed"]
    assert first["stages"] == {"convert": "ran", "train": "ran"}
    assert json.loads(dvc(workspace, "status", "--cloud", "--json")) == {}  # the remote holds every output
    assert any(p.is_file() for p in remote.rglob("*"))

    (workspace / "train.py").write_text(TRAIN_OK + "# a code change, not a data change\n")
    assert retrain(repo=str(workspace), retries=0, retry_delay=0) == {
        "changed": {},
        "stages": {},
        "pushed": False,
    }

    (workspace / "source.txt").write_text("more faces;")
    third = retrain(repo=str(workspace), retries=0, retry_delay=0)
    assert "convert" in third["changed"] and third["stages"] == {"convert": "ran", "train": "ran"}
    assert (workspace / "model.txt").read_text() == "model of more faces;more faces;"


def test_served_deployment_carries_the_cron_schedule():
    from flows.retrain import deployment

    served = deployment("0 3 * * 1", parameters={"repo": "/srv/femb", "push": True})
    (schedule,) = served.schedules
    assert schedule.schedule.cron == "0 3 * * 1"
    assert schedule.schedule.timezone == "UTC"
    assert served.name == "femb-retrain" and served.flow_name == "femb-retrain"
    assert served.parameters == {"repo": "/srv/femb", "push": True}
    assert served.entrypoint.endswith("flows/retrain.py:retrain")
    assert served.concurrency_limit == 1
    with pytest.raises(FembError, match="--cron 'every monday'"):
        deployment("every monday")


def test_serving_without_a_prefect_server_says_how_to_start_one(capsys):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.retrain import main

    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert main(["serve", "--cron", "0 3 * * 1"]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "PREFECT_API_URL is not set" in line and "make prefect-server" in line


# The head comparison.


def test_leaderboard_table_marks_the_best_head_unmeasurable_fars_and_failed_heads():
    from flows.compare import markdown_table

    def row(head, acc, tar, below=()):
        sets = {
            "lfw": {
                "accuracy": acc,
                "accuracy_std": 0.01,
                "tar_at_far": tar,
                "far_below_resolution": list(below),
            }
        }
        return {
            "head": head,
            "experiment": f"exp-{head}",
            "sets": sets,
            "mean_accuracy": acc,
            "train_seconds": 125.0,
        }

    rows = [
        row("arcface", 0.9950, {"1e-04": 0.91, "1e-02": 0.99}, below=["1e-04"]),
        row("magface", 0.9965, {"1e-04": 0.93, "1e-02": 0.995}, below=["1e-04"]),
    ]
    lines = markdown_table(rows, {"adaface": "dvc exp run -S header=adaface: stage train: bad"}).splitlines()
    assert lines[0] == (
        "|  | head | experiment | lfw accuracy (%) | lfw TAR@FAR=1e-04 | lfw TAR@FAR=1e-02 "
        "| mean accuracy (%) | train time |"
    )
    assert (
        lines[2] == "| ★ | **magface** | `exp-magface` | 99.65 ± 1.00 | 0.9300† | 0.9950 | 99.65 | 2m 05s |"
    )
    assert lines[3].startswith("|  | arcface | `exp-arcface` | 99.50 ± 1.00 |")
    assert lines[4].startswith("| ✗ | adaface | failed |")
    assert any(line.startswith("† ") for line in lines)
    assert "✗ adaface: dvc exp run -S header=adaface: stage train: bad" in lines


# The head comparison on the real femb pipeline.


@pytest.mark.slow
def test_compare_trains_two_heads_and_writes_the_leaderboard(prefect_server, tmp_path, monkeypatch):
    from flows.compare import compare

    monkeypatch.delenv("PYTHONPATH", raising=False)  # stages import femb from the copy they run in
    repo = tmp_path / "femb"
    copy_checkout(repo)
    shrink_demo(repo, compare={"headers": ["arcface", "cosface"]})
    git(repo, "-c", "init.defaultBranch=main", "init", "-q")
    git(repo, "config", "user.name", "femb test")
    git(repo, "config", "user.email", "test@femb.invalid")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "small demo")

    result = compare(repo=str(repo), retries=0, retry_delay=0)

    assert result["heads"] == ["arcface", "cosface"] and not result["failed"]
    assert [row["header_param"] for row in result["rows"]] == ["arcface", "cosface"]  # -S header= took effect
    for row in result["rows"]:
        assert set(row["sets"]) == {"demo", "demo_hard"}
        assert all(0.0 <= s["accuracy"] <= 1.0 for s in row["sets"].values())
        assert row["train_seconds"] > 0 and row["steps"] == 4
    best = max(result["rows"], key=lambda row: row["mean_accuracy"])
    assert result["best"] == best["head"]

    table = (repo / "reports" / "compare.md").read_text()
    assert "| demo accuracy (%) | demo TAR@FAR=1e-04 |" in table and "| demo_hard TAR@FAR=1e-02 |" in table
    assert f"| ★ | **{best['head']}** | `{best['experiment']}` |" in table
    assert all(f"`{row['experiment']}`" in table for row in result["rows"])
    assert "![accuracy by head](compare.png)" in table
    chart = (repo / "reports" / "compare.png").read_bytes()
    assert chart.startswith(b"\x89PNG\r\n\x1a\n") and len(chart) > 10_000
    assert json.loads((repo / "reports" / "compare.json").read_text())["best"] == best["head"]
    names = dvc(repo, "exp", "list", "--name-only")
    assert all(row["experiment"] in names for row in result["rows"])


@pytest.mark.slow
def test_an_interrupted_run_dvc_stops_the_stage_it_runs_not_only_dvc(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run([str(DVC), "init", "--no-scm", "-q"], cwd=repo, check=True)
    stage = "import os, time; open('stage.pid', 'w').write(str(os.getpid())); time.sleep(120)"
    (repo / "dvc.yaml").write_text(f'stages:\n  wait:\n    cmd: {sys.executable} -c "{stage}"\n')
    flow = subprocess.Popen(
        [sys.executable, "-c", f"from flows.common import run_dvc; run_dvc(['repro'], repo={str(repo)!r})"],
        cwd=Path(__file__).resolve().parents[1],
    )
    pid_file = repo / "stage.pid"
    try:
        for _ in range(600):
            if pid_file.exists() and pid_file.read_text():
                break
            time.sleep(0.05)
        stage_pid = int(pid_file.read_text())
        flow.send_signal(signal.SIGINT)  # what a cancelled flow run's process gets
        flow.wait(timeout=30)
        for _ in range(100):
            try:
                os.kill(stage_pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            os.kill(stage_pid, signal.SIGKILL)
            pytest.fail("the stage outlived the interrupted run_dvc")
    finally:
        if flow.poll() is None:
            flow.kill()
