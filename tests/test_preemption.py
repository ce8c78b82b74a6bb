"""Long runs survive preemption and worker failures: stop signals, automatic continuation
(elastic restarts, ``--resume-if-exists``), step checkpoints, interrupted and corrupt writes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from involution.cli import main
from involution.train.checkpoint import load_checkpoint, load_weights, read_jsonl
from involution.train.engine import Trainer

# A one-stage compact RedNet on 8x8 grayscale images with dropout, EMA, warm-up, gradient
# accumulation and crop/flip augmentation: every piece of state a continuation must restore.
TINY = [
    "data.dataset=synthetic",
    "data.image_size=8",
    "data.synthetic_channels=1",
    "data.synthetic_train_size=32",
    "data.synthetic_val_size=8",
    "data.augment=crop_flip",
    "train.batch_size=2",
    "train.accumulation_steps=2",
    "train.epochs=2",
    "train.warmup_epochs=0.5",
    "train.ema_decay=0.9",
    "train.progress=false",
    "model.kwargs={layers: [1], stage_widths: [16], kernel_size: 3, drop_rate: 0.5}",
]


def _command(out: Path, *extra: str) -> list[str]:
    return ["train", "--set", *TINY, f"output.dir={out}", "output.name=run", *extra]


def _assert_same_run(run: Path, reference: Path) -> None:
    """Bit-exact weights (and EMA weights) and the same evaluation records."""
    for name in ("model.safetensors", "model_ema.safetensors"):
        got, expected = load_weights(run / name)[0], load_weights(reference / name)[0]
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in expected), name

    def evals(folder: Path) -> list[dict]:
        return [r for r in read_jsonl(folder / "metrics.jsonl") if "val_top1" in r]

    assert evals(run) == evals(reference) and evals(run)


def _signal_at_step(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """Send this process SIGTERM while the training computes optimizer step ``step``."""
    train_step = Trainer._train_step

    def step_then_signal(self: Trainer, batches: object) -> object:
        if self.step + 1 == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return train_step(self, batches)

    monkeypatch.setattr(Trainer, "_train_step", step_then_signal)


def test_sigterm_checkpoints_the_step_and_both_ways_back_continue_bit_exact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(_command(tmp_path / "whole")) == 0
    run = tmp_path / "split" / "run"

    # SIGTERM mid-epoch 1 (8 steps an epoch): the step finishes, is checkpointed, exit 143.
    with monkeypatch.context() as patch:
        _signal_at_step(patch, 3)
        assert main(_command(tmp_path / "split")) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "SIGTERM received" in err and "stopped by SIGTERM after step 3" in err
    state = load_checkpoint(run / "checkpoint.pt")
    assert (state["step"], state["epoch"], state["step_in_epoch"]) == (3, 0, 3)

    # The requeued command continues by itself (and is stopped again, in epoch 2) ...
    with monkeypatch.context() as patch:
        _signal_at_step(patch, 11)
        command = _command(tmp_path / "split", "--resume-if-exists")
        assert main(command) == 128 + signal.SIGTERM
    assert "continuing the run in" in capsys.readouterr().out
    state = load_checkpoint(run / "checkpoint.pt")
    assert (state["step"], state["epoch"], state["step_in_epoch"]) == (11, 1, 3)

    # ... and --resume takes it to the end: the same run as the uninterrupted one.
    assert main(["train", "--resume", str(run)]) == 0
    _assert_same_run(run, tmp_path / "whole" / "run")


def test_a_second_signal_stops_at_once() -> None:
    script = textwrap.dedent(
        """
        import os, signal, time
        from involution.train.signals import StopSignals
        with StopSignals() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.received == signal.SIGINT
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(30)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert done.returncode == -signal.SIGINT, done.stderr.decode()


def test_a_corrupt_checkpoint_is_named_and_the_run_not_started_over(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(_command(tmp_path, "train.epochs=1")) == 0
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])  # a truncated file
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}
    assert main(_command(tmp_path, "train.epochs=1", "--resume-if-exists")) == 2
    err = capsys.readouterr().err
    assert str(checkpoint) in err and "truncated" in err and "not started over" in err
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before


def test_a_start_that_died_before_its_first_checkpoint_starts_over(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("task: classification\n")
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1, "train_loss": 9.0}\n')
    assert main(_command(tmp_path, "train.epochs=1", "--resume-if-exists")) == 0
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert records[0]["step"] == 8 and len(records) == 2  # its own records only
    # Without the switch, a run directory is never reused; with it, it must be named.
    assert main(_command(tmp_path, "train.epochs=1")) == 2
    unnamed = ["train", "--set", *TINY, f"output.dir={tmp_path}", "--resume-if-exists"]
    assert main(unnamed) == 2


def test_a_checkpoint_write_killed_midway_leaves_the_previous_one(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import itertools, torch
        from pathlib import Path
        from involution.train.checkpoint import save_checkpoint
        path = Path({str(tmp_path / "checkpoint.pt")!r})
        save_checkpoint(path, {{"step": 0}})
        big = torch.randn(4_000_000)
        for step in itertools.count(1):
            save_checkpoint(path, {{"step": step, "weights": big}})
        """
    )
    checkpoint = tmp_path / "checkpoint.pt"
    process = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 60
        # A write in progress over a complete checkpoint.
        while not (checkpoint.exists() and list(tmp_path.glob(".checkpoint.pt.*.tmp"))):
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.001)
        process.kill()
    finally:
        process.kill()
        process.wait()
    assert list(tmp_path.glob(".checkpoint.pt.*.tmp"))  # killed mid-write ...
    assert load_checkpoint(checkpoint)["step"] >= 0  # ... the last one loads


def _worker_pids(parent: int, rank: int) -> list[int]:
    """The processes ``parent`` (torchrun) started with ``RANK=rank`` in their environment."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) != parent:
                continue
            if f"RANK={rank}".encode() in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


def _torchrun(out: Path, kill_rank: int | None) -> tuple[int, str, bool]:
    """Train 2 gloo ranks under ``torchrun --max-restarts 1`` (2 epochs of 16 steps, a
    checkpoint every 4); with ``kill_rank`` SIGKILL that worker once the first checkpoint
    exists. Returns the exit code, the output and whether a worker was killed."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--standalone",
        "--max-restarts=1",
        "-m",
        "involution.cli",
        *_command(
            out,
            "data.synthetic_train_size=128",
            "train.checkpoint_every_steps=4",
            "train.threads=1",
        ),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    killed = False
    try:
        checkpoint = out / "run" / "checkpoint.pt"
        while kill_rank is not None and not killed and process.poll() is None:
            pids = _worker_pids(process.pid, kill_rank) if checkpoint.exists() else []
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
                killed = True
            time.sleep(0.002)
        output, _ = process.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"torchrun timed out:\n{output[-4000:]}")
    return process.returncode, output, killed


def test_torchrun_restart_after_a_killed_worker_finishes_the_same_run(tmp_path: Path) -> None:
    code, output, _ = _torchrun(tmp_path / "whole", kill_rank=None)
    assert code == 0, output[-4000:]
    code, output, killed = _torchrun(tmp_path / "killed", kill_rank=1)
    assert code == 0, output[-4000:]
    assert killed and "continuing the run in" in output, output[-4000:]
    run, reference = tmp_path / "killed" / "run", tmp_path / "whole" / "run"
    _assert_same_run(run, reference)
    # Step checkpoints end logging windows: the continued run logged the very same records.
    assert _without_timings(run) == _without_timings(reference)


def _without_timings(run: Path) -> list[dict]:
    return [
        {k: v for k, v in r.items() if k != "img_per_s"} for r in read_jsonl(run / "metrics.jsonl")
    ]
