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
    for command in ("synth", "convert"):
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
