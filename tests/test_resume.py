"""Long runs survive: verified checkpoints, preemption, another world size, divergence rewinds, `dvc repro`.

Runs that must be interrupted run as real processes (the probe script below is `femb train` with a few
callbacks that send a real signal to the process at a given step and write what the model holds
when training starts); the rest call `train()`. Every run is the tiniest there is: iresnet_tiny,
16 identities x 4 images, batches of 8, a handful of steps, 10 verification pairs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from femb.config import parse_params
from femb.data.convert import convert
from femb.data.loader import make_train_loader
from femb.data.synth import synthesize
from femb.errors import FembError
from femb.training import run
from femb.training.checkpoints import (
    LAST,
    PREVIOUS,
    CheckpointDamaged,
    OtherRunCheckpoint,
    VerifiedCheckpointIO,
    choose_resume,
    read_record,
    record_path,
    verify,
)
from femb.training.preemption import EXIT_PREEMPTED
from femb.training.schedule import lr_factor
from tests.helpers import copy_checkout, shrink_demo

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 identities x 4 images (8 batches of 8 per epoch), 10 pairs per verification set."""
    root = tmp_path_factory.mktemp("tiny")
    synthesize(
        root / "source", identities=16, images_per_identity=4, pairs=10, seed=5, loose_identities=0,
        ijb_subjects=0, progress=False,
    )  # fmt: skip
    convert(root / "source", root / "shards", progress=False)
    return root / "shards"


def tiny(shards: Path, out_dir: Path, **train) -> dict:
    return {
        "backbone": "iresnet_tiny",
        "embedding_size": 64,
        "header": "arcface",
        "data": {"shards": str(shards)},
        "train": {
            "out_dir": str(out_dir),
            "batch_size": 8,
            "num_workers": 0,
            "max_steps": 6,
            "checkpoint_every": 100,
            "val_every": 100,
            "lr": 0.05,
            "warmup_steps": 2,
            "accelerator": "cpu",
            "devices": 1,
            **train,
        },
    }


PROBE = textwrap.dedent(
    '''
    """`femb train` with probes: a real signal at a step, the loss of each step, the state at the start."""
    import json, os, signal, sys
    import lightning as L
    import torch
    from femb.config import parse_params
    from femb.training.run import train

    params, signal_at, out = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
    name, _, at = signal_at.partition("@")


    class Probe(L.Callback):
        def __init__(self):
            self.started = False

        def probe_loss(self, module):
            """The loss of a fixed batch of 8, the model in eval mode: the embeddings of rank 0's backbone
            (each rank's BatchNorm statistics differ under DDP; a checkpoint holds rank 0's), each rank
            scoring its share of them against its centres."""
            images, labels = self.fixed
            world, rank = module.trainer.world_size, module.trainer.global_rank
            module.eval()
            with torch.no_grad():
                embeddings = module(images)
                if world > 1:
                    torch.distributed.broadcast(embeddings, src=0)
                rows = slice(rank * len(labels) // world, (rank + 1) * len(labels) // world)
                loss = module.loss(embeddings[rows], labels[rows])
            module.train()
            return float(loss)

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if not self.started:
                self.started = True
                self.fixed = torch.load(out + "/fixed.pt", weights_only=True)
                opt = trainer.optimizers[0]
                header = module.header
                torch.save(
                    {
                        "step": trainer.global_step,
                        "lr": opt.param_groups[0]["lr"],
                        "weight": header.weight.detach().clone(),
                        "momentum": opt.state.get(header.weight, {}).get("momentum_buffer"),
                        "loss": self.probe_loss(module),
                    },
                    f"{out}/start-rank{trainer.global_rank}.pt",
                )
            if name and trainer.global_step == int(at) and trainer.global_rank == 0:
                os.kill(os.getpid(), getattr(signal, name))

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            row = {"step": trainer.global_step, "loss": float(outputs["loss"])}
            if name and trainer.global_step == int(at) + 1:  # the step the preemption checkpoint holds
                row["probe_loss"] = self.probe_loss(module)
            with open(f"{out}/steps-rank{trainer.global_rank}.jsonl", "a") as f:
                f.write(json.dumps(row) + "\\n")


    summary = train(parse_params(params), callbacks=[Probe()], progress=False)
    if summary:
        print(json.dumps(summary))
    '''
)


def probe_run(
    params: dict, out: Path, signal_at: str = "", env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run the probe script as its own process (DDP runs relaunch it per rank); `out` gets its probes."""
    out.mkdir(parents=True, exist_ok=True)
    script = out.parent / "probe.py"
    script.write_text(PROBE)
    if not (out / "fixed.pt").exists():
        loader = make_train_loader(params["data"]["shards"], 8, 0, seed=99, flip=False)
        images, labels = next(iter(loader))
        from femb.data.decode import normalize

        torch.save((normalize(images), labels), out / "fixed.pt")
    return subprocess.run(
        [sys.executable, str(script), json.dumps(params), signal_at, str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=out,
        env={**os.environ, **(env or {})},
    )


def steps(out: Path, rank: int = 0) -> list[dict]:
    path = out / f"steps-rank{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def backbone(out_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(out_dir / "backbone.pth", weights_only=True)


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:  # the same ops on the same inputs on one CPU: equal to float32 rounding
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)


# Preemption: a real SIGTERM, then a SLURM SIGUSR1, then a damaged last.ckpt and run.json.


@pytest.mark.slow
def test_sigterm_and_slurm_sigusr1_checkpoint_at_a_step_boundary_exit_75_and_resume_exactly(
    tiny_shards, tmp_path
):
    whole = run.train(parse_params(tiny(tiny_shards, tmp_path / "whole")), progress=False)
    params = tiny(tiny_shards, tmp_path / "cut")
    checkpoints = tmp_path / "cut" / "checkpoints"

    first = probe_run(params, tmp_path / "a", "SIGTERM@1")
    assert first.returncode == EXIT_PREEMPTED, first.stderr[-3000:]
    assert (
        f"Preempted by SIGTERM at step 2: saved {checkpoints / LAST}; exiting with status 75" in first.stderr
    )
    assert [s["step"] for s in steps(tmp_path / "a")] == [1, 2]  # the step in flight finished, no more
    assert read_record(checkpoints / LAST)["step"] == 2 and verify(checkpoints / LAST).step == 2

    # Under SLURM, SIGUSR1 (sbatch --signal=USR1@90) also requeues the job, as Lightning's auto-requeue does.
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text('#!/bin/sh\necho "$@" >> "$SCONTROL_LOG"\n')
    (fake / "scontrol").chmod(0o755)
    slurm = {
        "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}",
        "SCONTROL_LOG": str(tmp_path / "scontrol.log"),
        "SLURM_NTASKS": "1",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "femb",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_NODELIST": "localhost",
    }
    second = probe_run(params, tmp_path / "b", "SIGUSR1@3", env=slurm)
    assert second.returncode == EXIT_PREEMPTED, second.stderr[-3000:]
    assert f"from step 2: {checkpoints / LAST}" in second.stderr  # the log says it resumed, and from where
    assert "Preempted by SIGUSR1 at step 4" in second.stderr and "SLURM job 4242 requeued" in second.stderr
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"
    assert [s["step"] for s in steps(tmp_path / "b")] == [3, 4]
    assert (read_record(checkpoints / LAST)["step"], read_record(checkpoints / PREVIOUS)["step"]) == (4, 2)

    # A truncated last.ckpt and a run.json that is a list: each named in one line; the previous one is used.
    last = checkpoints / LAST
    size = last.stat().st_size
    last.write_bytes(last.read_bytes()[: size // 2])
    (tmp_path / "cut" / "run.json").write_text("[1, 2]\n")
    third = probe_run(params, tmp_path / "c")
    assert third.returncode == 0, third.stderr[-3000:]
    assert (
        f"{last}: is {size // 2:,} bytes, its record says {size} (truncated or replaced); resuming from the "
        f"previous checkpoint {checkpoints / PREVIOUS} (step 2)"
    ) in third.stderr
    assert (
        f"{tmp_path / 'cut' / 'run.json'}: not a run record (a JSON list); ignored and written anew"
        in third.stderr
    )
    summary = json.loads(third.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 6 and summary["resumed_from"] == str(checkpoints / PREVIOUS)
    assert summary["best_val_accuracy"] == whole["best_val_accuracy"]
    assert_same_weights(backbone(tmp_path / "whole"), backbone(tmp_path / "cut"))


# Another world size: 1 -> 2 -> 1 processes (gloo), partial FC centres and momentum re-partitioned.


@pytest.mark.slow
def test_partial_fc_resumes_on_two_processes_then_on_one_with_centres_and_momentum_bitwise(
    tiny_shards, tmp_path
):
    one = tiny(tiny_shards, tmp_path / "run", max_steps=7, partial_fc={"enabled": True, "sample_rate": 0.5})
    two = {**one, "train": {**one["train"], "devices": 2, "strategy": "ddp"}}
    checkpoints = tmp_path / "run" / "checkpoints"

    a = probe_run(one, tmp_path / "a", "SIGTERM@2")
    assert a.returncode == EXIT_PREEMPTED, a.stderr[-3000:]
    saved = torch.load(checkpoints / LAST, weights_only=True)
    meta = saved["femb_partial_fc"]
    assert (meta["world_size"], meta["step"], meta["files"]) == (1, 3, {})
    centres = saved["state_dict"]["header.weight"]
    momentum = saved["optimizer_states"][0]["state"][meta["optimizer_index"]["header.weight"]][
        "momentum_buffer"
    ]

    b = probe_run(two, tmp_path / "b", "SIGTERM@4")
    assert b.returncode == EXIT_PREEMPTED, b.stderr[-3000:]
    assert (
        "Data position: 24 samples into epoch 0, saved with world size 1 and 0 loader worker(s), now 2 and 0: "
        "1 of 4 batches per rank done"
    ) in b.stderr
    starts = [torch.load(tmp_path / "b" / f"start-rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert torch.equal(torch.cat([s["weight"] for s in starts]), centres)  # 8 + 8 of 16 classes, bitwise
    assert torch.equal(torch.cat([s["momentum"] for s in starts]), momentum)
    expected_lr = 0.05 * lr_factor(3, total_steps=7, warmup_steps=2)
    assert all(s["step"] == 3 and s["lr"] == pytest.approx(expected_lr, rel=1e-12) for s in starts)
    # The same fixed batch has the same loss before and after the re-partition: the model did not move.
    before = next(row["probe_loss"] for row in steps(tmp_path / "a") if "probe_loss" in row)
    assert starts[0]["loss"] == pytest.approx(before, rel=1e-5) and starts[1]["loss"] == starts[0]["loss"]
    record = read_record(checkpoints / LAST)
    assert record["world_size"] == 2 and sorted(record["partial_fc"]) == [
        f"step{5:09d}-rank{r}-of-2.pt" for r in (0, 1)
    ]
    assert torch.load(checkpoints / LAST, weights_only=True)["ShardDataModule"]["batches_done"] == 3  # 1 + 2

    c = probe_run(one, tmp_path / "c")
    assert c.returncode == 0, c.stderr[-3000:]
    assert "48 samples into epoch 0, saved with world size 2" in c.stderr and "6 of 8 batches" in c.stderr
    shards = [
        torch.load(checkpoints / "partial_fc" / f"step{5:09d}-rank{r}-of-2.pt", weights_only=True)
        for r in (0, 1)
    ]
    start = torch.load(tmp_path / "c" / "start-rank0.pt", weights_only=True)
    assert torch.equal(start["weight"], torch.cat([s["header"]["weight"] for s in shards]))
    assert torch.equal(
        start["momentum"], torch.cat([s["optimizer"]["weight"]["momentum_buffer"] for s in shards])
    )
    assert start["step"] == 5 and start["lr"] == pytest.approx(0.05 * lr_factor(5, 7, 2), rel=1e-12)
    before = next(row["probe_loss"] for row in steps(tmp_path / "b") if "probe_loss" in row)
    assert start["loss"] == pytest.approx(before, rel=1e-5)
    assert [s["step"] for s in steps(tmp_path / "c")] == [6, 7]
    assert json.loads(c.stdout.strip().splitlines()[-1])["steps"] == 7  # the run's length in steps is kept


# Integrity: damaged checkpoints, records and shards; checkpoints of another run.


def saved_two(checkpoints: Path, fingerprint: str) -> None:
    """last.ckpt (step 4) and previous.ckpt (step 2), saved the way training saves them."""
    io = VerifiedCheckpointIO(fingerprint)
    for step in (2, 4):
        io.save_checkpoint(
            {"global_step": step, "epoch": 0, "state_dict": {"w": torch.full((500,), step)}},
            checkpoints / LAST,
        )


def _damage(path: Path, how: str) -> None:
    """Damage a checkpoint as a crash or a bad disk would, through a new file (a new inode: the hash
    cache keyed by inode, size and mtime cannot then mistake it for the file it replaced)."""
    damaged = {
        "truncated": lambda b: b[:1000],
        "empty": lambda b: b"",
        "random": lambda b: os.urandom(len(b)),
    }
    if how in damaged:
        fresh = path.with_name(path.name + ".damaged")
        fresh.write_bytes(damaged[how](path.read_bytes()))
        os.replace(fresh, path)
    elif how == "record missing":
        record_path(path).unlink()
    elif how == "record not json":
        record_path(path).write_text('{"format": ')
    elif how == "record a list":
        record_path(path).write_text("[]")


def test_saving_last_keeps_the_one_before_as_previous_each_with_its_record(tmp_path):
    saved_two(tmp_path, "f00d")
    assert (verify(tmp_path / LAST).step, verify(tmp_path / PREVIOUS).step) == (4, 2)
    assert torch.load(tmp_path / PREVIOUS, weights_only=True)["state_dict"]["w"][0] == 2
    record = read_record(tmp_path / LAST)
    assert record["fingerprint"] == "f00d" and record["bytes"] == (tmp_path / LAST).stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == [LAST, f"{LAST}.json", PREVIOUS, f"{PREVIOUS}.json"]


@pytest.mark.parametrize(
    ("how", "says"),
    [
        ("truncated", "is 1,000 bytes, its record says"),
        ("empty", "is 0 bytes, its record says"),
        ("random", "its sha256 does not match its record (corrupt or replaced)"),
        ("record missing", "no checksum recorded (last.ckpt.json is missing)"),
        ("record not json", "its record last.ckpt.json is unreadable (JSONDecodeError)"),
        ("record a list", "its record last.ckpt.json is not a femb-checkpoint/1 record"),
    ],
)
def test_a_damaged_last_checkpoint_is_named_and_the_previous_one_used(tmp_path, how, says):
    saved_two(tmp_path, "f00d")
    _damage(tmp_path / LAST, how)
    lines: list[str] = []
    chosen = choose_resume(tmp_path, "f00d", lines.append)
    assert chosen.path == tmp_path / PREVIOUS and chosen.step == 2
    (line,) = lines
    assert line.startswith(f"{tmp_path / LAST}: {says}")
    assert line.endswith(f"; resuming from the previous checkpoint {tmp_path / PREVIOUS} (step 2)")
    # The next save replaces the damaged one and keeps the good previous.ckpt.
    VerifiedCheckpointIO("f00d").save_checkpoint({"global_step": 3}, tmp_path / LAST)
    assert (verify(tmp_path / LAST).step, verify(tmp_path / PREVIOUS).step) == (3, 2)


def test_with_both_checkpoints_damaged_the_run_starts_afresh_saying_so(tmp_path):
    saved_two(tmp_path, "f00d")
    _damage(tmp_path / LAST, "random")
    _damage(tmp_path / PREVIOUS, "empty")
    lines: list[str] = []
    assert choose_resume(tmp_path, "f00d", lines.append) is None
    (line,) = lines
    assert line.startswith(f"{tmp_path / LAST}: its sha256") and f"{tmp_path / PREVIOUS}: is 0 bytes" in line
    assert line.endswith("; no intact checkpoint is left, so the run starts afresh")


@pytest.mark.slow
def test_train_resumes_from_the_previous_checkpoint_to_the_same_weights(tiny_shards, tmp_path):
    params = tiny(tiny_shards, tmp_path / "whole", max_steps=4, checkpoint_every=2)
    run.train(parse_params(params), progress=False)
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "whole", copy)
    _damage(copy / "checkpoints" / LAST, "random")
    summary = run.train(
        parse_params({**params, "train": {**params["train"], "out_dir": str(copy)}}), progress=False
    )
    assert summary["resumed_from"] == str(copy / "checkpoints" / PREVIOUS) and summary["steps"] == 4
    assert_same_weights(backbone(tmp_path / "whole"), backbone(copy))
    assert verify(copy / "checkpoints" / LAST).step == 4  # the damaged one was replaced, not kept as previous
    assert verify(copy / "checkpoints" / PREVIOUS).step == 2


def test_a_checkpoint_of_another_run_is_refused_naming_both_fingerprints(tiny_shards, tmp_path):
    params = parse_params(tiny(tiny_shards, tmp_path / "out"))
    ours = run._fingerprint(params)
    saved_two(tmp_path / "out" / "checkpoints", "0123456789abcdef")
    with pytest.raises(FembError) as refused:
        run.train(params, progress=False)
    message = str(refused.value)
    assert message.startswith(
        f"{tmp_path / 'out' / 'checkpoints' / LAST}: a checkpoint of run 0123456789abcdef, "
    )
    assert f"but this run's fingerprint is {ours}" in message and "\n" not in message
    with pytest.raises(OtherRunCheckpoint):
        run.resuming(params)
    assert run.resuming(params, other_run="replace") is False  # the DVC stage starts that run afresh


def test_divergence_and_hardware_knobs_leave_the_fingerprint_alone(tiny_shards, tmp_path):
    params = tiny(tiny_shards, tmp_path)
    fingerprint = run._fingerprint(parse_params(params))
    changed = {"on_divergence": "rewind", "max_rewinds": 9, "devices": 2, "num_workers": 3}
    assert run._fingerprint(parse_params({**params, "train": {**params["train"], **changed}})) == fingerprint
    assert run._fingerprint(parse_params({**params, "train": {**params["train"], "lr": 0.01}})) != fingerprint


def test_a_damaged_partial_fc_shard_makes_its_checkpoint_unusable_naming_the_shard(tmp_path):
    shard = tmp_path / "partial_fc" / "step000000003-rank1-of-2.pt"
    shard.parent.mkdir()
    torch.save({"header": {"weight": torch.zeros(4, 2)}}, shard)
    from femb.training.checkpoints import file_sha256

    checkpoint = {"global_step": 3, "femb_partial_fc": {"files": {shard.name: file_sha256(shard)}}}
    VerifiedCheckpointIO("f00d").save_checkpoint(checkpoint, tmp_path / LAST)
    assert verify(tmp_path / LAST).step == 3
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(
        CheckpointDamaged, match=f"its partial FC shard {shard} does not match its recorded sha256"
    ):
        verify(tmp_path / LAST)
    shard.unlink()
    with pytest.raises(CheckpointDamaged, match=f"its partial FC shard {shard} is missing"):
        verify(tmp_path / LAST)


# Divergence: an injected NaN, rewound from the last good checkpoint.


class _PoisonAt(L.Callback):
    """Makes one backbone weight NaN when a batch starts at `step`, the first `times` times it gets there."""

    def __init__(self, step: int, times: int) -> None:
        self.step, self.times = step, times
        self.batches: list[tuple[int, list[int], float]] = []  # (step, labels, lr) of every batch trained

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step and self.times > 0:
            self.times -= 1
            with torch.no_grad():
                pl_module.backbone.fc.weight[0, 0] = float("nan")
            return
        self.batches.append(
            (trainer.global_step, batch[1].tolist(), trainer.optimizers[0].param_groups[0]["lr"])
        )


@pytest.mark.slow
def test_injected_nan_rewinds_to_the_last_good_checkpoint_skips_the_window_and_lowers_the_lr(
    tiny_shards, tmp_path
):
    params = tiny(tiny_shards, tmp_path / "run", checkpoint_every=2, on_divergence="rewind", max_rewinds=2)
    poison = _PoisonAt(step=3, times=2)
    summary = run.train(parse_params(params), callbacks=[poison], progress=False)
    assert summary["rewinds"] == 2 and summary["steps"] == 6
    order = [
        labels.tolist() for _, labels in make_train_loader(tiny_shards, 8, 0, seed=0)
    ]  # epoch 0's batches
    trained = [(step, labels) for step, labels, _ in poison.batches]
    # Steps 0-2 on batches 0-2; NaN at step 3: back to step 2, batches 2-3 skipped; NaN again at step 3:
    # back to step 2 (batch 4), batches 4-5 skipped; then steps 2-5 on batches 6, 7 and the next epoch's.
    assert trained[:3] == [(0, order[0]), (1, order[1]), (2, order[2])]
    assert trained[3:5] == [(2, order[4]), (2, order[6])]
    assert [step for step, _ in trained[5:]] == [3, 4, 5]
    assert trained[5][1] == order[7]
    lrs = {step: lr for step, _, lr in poison.batches}
    for step in (3, 4, 5):  # after two rewinds the schedule runs at a quarter of the LR
        assert lrs[step] == pytest.approx(0.25 * 0.05 * lr_factor(step, 6, 2), rel=1e-12)
    last = torch.load(tmp_path / "run" / "checkpoints" / LAST, weights_only=True)
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())
    assert last["callbacks"]["Rewinds"]["count"] == 2  # a restart keeps counting toward max_rewinds


@pytest.mark.slow
def test_divergence_after_max_rewinds_stops_the_run_saying_how_many(tiny_shards, tmp_path):
    params = tiny(
        tiny_shards, tmp_path / "run", max_steps=4, checkpoint_every=1, on_divergence="rewind", max_rewinds=1
    )
    with pytest.raises(
        FembError, match=r"loss is nan at step 2 .*; gave up after 1 rewind\(s\) \(train\.max_rewinds=1\)$"
    ):
        run.train(parse_params(params), callbacks=[_PoisonAt(step=2, times=5)], progress=False)


# The DVC pipeline: `dvc repro` SIGKILLed after its first checkpoint, then rerun.


@pytest.mark.slow
@pytest.mark.parametrize("command", [["repro", "train"], ["exp", "run", "train"]], ids=["repro", "exp-run"])
def test_dvc_killed_after_its_first_checkpoint_resumes_to_the_uninterrupted_metrics(tmp_path, command):
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "DVC_NO_ANALYTICS": "1"}
    env.pop("PYTHONPATH", None)
    env["DVC_SITE_CACHE_DIR"] = str(tmp_path / "dvc-site")
    repo = tmp_path / "repo"
    copy_checkout(repo)
    shrink_demo(repo)
    params_path = repo / "params.yaml"
    params = yaml.safe_load(params_path.read_text())
    params["train"].update(max_steps=6, batch_size=16, checkpoint_every=2, val_every=100, accelerator="cpu")
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "small demo"]):
        subprocess.run(
            ["git", "-c", "init.defaultBranch=main", "-c", "user.name=t", "-c", "user.email=t@t.invalid", *args],
            cwd=repo, check=True, capture_output=True,
        )  # fmt: skip
    dvc = [str(BIN / "dvc"), *command]
    stashes = repo / ".femb-cache" / "runs"  # `dvc exp run` removes models/train: the stage's stash survives

    def stashed() -> list[Path]:
        return list(stashes.glob("*/last.ckpt.json"))

    killed = subprocess.Popen(
        dvc, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    deadline = time.monotonic() + 600
    while not stashed() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(killed.pid, signal.SIGKILL)  # dvc and the stage, as the OOM killer or a lost node would
    output = killed.communicate()[0].decode()
    assert stashed(), output[-3000:]
    first_step = json.loads(stashed()[0].read_text())["step"]
    assert first_step < 6 and not (repo / "metrics" / "train.json").exists()

    resumed = subprocess.run(dvc, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    log = resumed.stdout + resumed.stderr
    assert "Running stage 'train'" in log and "Resuming run " in log
    step = int(log.split("Resuming run ", 1)[1].split(" from step ", 1)[1].split(":", 1)[0])
    assert step >= first_step
    assert not any(stashes.iterdir())  # a complete run leaves no stash behind
    metrics = json.loads((repo / "metrics" / "train.json").read_text())

    # The uninterrupted run: the same params in this process, from the repository's shards.
    reference = parse_params({**params, "data": {**params["data"], "shards": str(repo / "data" / "shards")},
                              "train": {**params["train"], "out_dir": str(tmp_path / "whole")}})  # fmt: skip
    whole = run.train(reference, progress=False)
    timing = {"seconds", "images_per_sec"}
    expected = {k: v for k, v in whole.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert {k: v for k, v in metrics.items() if k not in timing} == {
        k: v for k, v in expected.items() if k not in timing
    }
    assert_same_weights(backbone(tmp_path / "whole"), backbone(repo / "models" / "train"))
    if command[0] == "repro":
        again = subprocess.run(dvc, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
        assert "Data and pipelines are up to date" in again.stdout


def test_the_stash_mirrors_by_hard_links_drops_stale_files_and_restores(tmp_path):
    from femb.training.stash import mirror, restore

    run, stash = tmp_path / "checkpoints", tmp_path / "stash"
    (run / "partial_fc").mkdir(parents=True)
    (run / "last.ckpt").write_bytes(b"weights")
    (run / "last.ckpt.json").write_text("{}")
    (run / "partial_fc" / "rank0.pt").write_bytes(b"centres")
    (run / ".last.ckpt.123-abcdef01.tmp").write_bytes(b"half")  # a save in progress is not mirrored
    (stash / "old").mkdir(parents=True)
    (stash / "old" / "gone.pt").write_bytes(b"stale")
    mirror(run, stash)
    assert sorted(p.relative_to(stash).as_posix() for p in stash.rglob("*") if p.is_file()) == [
        "last.ckpt",
        "last.ckpt.json",
        "partial_fc/rank0.pt",
    ]
    assert (stash / "last.ckpt").stat().st_ino == (run / "last.ckpt").stat().st_ino  # no copy
    os.replace(run / ".last.ckpt.123-abcdef01.tmp", run / "last.ckpt")  # the next save renames over it
    assert (stash / "last.ckpt").read_bytes() == b"weights"  # the stash keeps the checkpoint it mirrored
    shutil.rmtree(run)
    assert restore(stash, run) and (run / "last.ckpt").read_bytes() == b"weights"
    assert not restore(tmp_path / "nothing", run)
