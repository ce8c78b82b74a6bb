"""End-to-end ``involution train / eval / predict`` on tiny synthetic data and image folders."""

from __future__ import annotations

import gc
import itertools
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from involution.cli import main
from involution.train.checkpoint import (
    atomic_write,
    load_checkpoint,
    load_weights,
    read_jsonl,
    save_checkpoint,
)
from involution.train.config import load_config
from involution.train.engine import Trainer, lr_factor, model_label

# A one-stage compact RedNet on 8x8 grayscale images: a few milliseconds per step.
TINY = [
    "data.dataset=synthetic",
    "data.image_size=8",
    "data.synthetic_channels=1",
    "data.synthetic_train_size=32",
    "data.synthetic_val_size=8",
    "train.batch_size=4",
    "train.epochs=2",
    "train.progress=false",
    "model.kwargs={layers: [1], stage_widths: [16], kernel_size: 3}",
]


def _train(tmp_path: Path, name: str, *overrides: str) -> int:
    return main(
        ["train", "--set", *TINY, f"output.dir={tmp_path}", f"output.name={name}", *overrides]
    )


def _weights(run: Path, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    return load_weights(run / name)[0]


def test_resume_reaches_the_same_weights_as_an_uninterrupted_run(tmp_path: Path) -> None:
    # Dropout, EMA, momentum, warm-up and gradient accumulation all carry state to restore.
    recipe = [
        "train.ema_decay=0.9",
        "train.accumulation_steps=2",
        "train.warmup_epochs=0.5",
        "model.kwargs.drop_rate=0.5",
    ]
    assert _train(tmp_path, "whole", *recipe) == 0
    # Stop mid-epoch 1 (4 steps per epoch), then resume.
    assert _train(tmp_path, "split", *recipe, "train.max_steps=3") == 0
    interrupted = load_checkpoint(tmp_path / "split" / "checkpoint.pt")
    assert (interrupted["step"], interrupted["epoch"], interrupted["step_in_epoch"]) == (3, 0, 3)
    assert (
        main(["train", "--resume", str(tmp_path / "split"), "--set", "train.max_steps=null"]) == 0
    )

    for name in ("model.safetensors", "model_ema.safetensors"):
        whole, split = _weights(tmp_path / "whole", name), _weights(tmp_path / "split", name)
        assert whole.keys() == split.keys()
        for key in whole:
            torch.testing.assert_close(split[key], whole[key], rtol=0, atol=1e-6, msg=key)
    # The training actually moved the weights away from their initial values.
    assert not torch.equal(
        _weights(tmp_path / "whole")["fc.weight"], interrupted["model"]["fc.weight"]
    )
    # The resumed run logs each step once and evaluates exactly like the uninterrupted one.
    split_log = read_jsonl(tmp_path / "split" / "metrics.jsonl")
    whole_log = read_jsonl(tmp_path / "whole" / "metrics.jsonl")
    assert [r["step"] for r in split_log if "train_loss" in r] == [3, 4, 8]
    assert [r for r in split_log if "val_top1" in r] == [r for r in whole_log if "val_top1" in r]
    assert {p.name for p in (tmp_path / "whole").iterdir()} == {
        "config.yaml",
        "metrics.jsonl",
        "checkpoint.pt",
        "model.safetensors",
        "model_ema.safetensors",
        "curves.png",
    }


def test_eval_every_epochs_evaluates_every_nth_and_the_last_epoch(tmp_path: Path) -> None:
    # 8 steps an epoch; 20 iterations cut the third epoch short: evaluations after 2 and 3.
    assert _train(tmp_path, "run", "train.eval_every_epochs=2", "train.iterations=20") == 0
    log = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [(r["epoch"], r["step"]) for r in log if "val_top1" in r] == [(2, 16), (3, 20)]


def test_eval_and_predict_use_the_run_weights(tmp_path: Path, capsys) -> None:
    assert _train(tmp_path, "run", "train.ema_decay=0.5") == 0
    run = tmp_path / "run"
    last = read_jsonl(run / "metrics.jsonl")[-1]
    capsys.readouterr()
    assert main(["eval", "--run", str(run)]) == 0
    out = capsys.readouterr().out
    top1 = float(re.search(r"model.safetensors: top-1 ([\d.]+)%", out).group(1))
    assert top1 == pytest.approx(last["val_top1"], abs=0.01)
    ema_top1 = float(re.search(r"model_ema.safetensors: top-1 ([\d.]+)%", out).group(1))
    assert ema_top1 == pytest.approx(last["ema_val_top1"], abs=0.01)

    pixels = np.random.default_rng(0).integers(0, 256, (8, 8)).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    Image.fromarray(pixels).convert("RGB").save(tmp_path / "b.png")
    assert (
        main(
            [
                "predict",
                str(tmp_path / "a.png"),
                str(tmp_path / "b.png"),
                "--run",
                str(run),
                "--topk",
                "3",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 * 4
    probabilities = [float(line.split("%")[0]) for line in out[1:4]]
    assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 100.01
    # RGB input is converted to the model's single channel: same prediction.
    assert out[1:4] == out[5:8]

    # A finished run is not overwritten.
    assert _train(tmp_path, "run") == 2
    assert "already holds a run" in capsys.readouterr().err

    weights = run / "model.safetensors"
    assert main(["predict", str(tmp_path / "missing.png"), "--weights", str(weights)]) == 2
    assert "cannot read image" in capsys.readouterr().err


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path, capsys) -> None:
    code = _train(tmp_path, "nan", "train.lr=1e30", "train.checkpoint_every_steps=1")
    assert code == 1
    err = capsys.readouterr().err
    assert re.search(r"loss is (nan|inf)", err) and "last good checkpoint" in err
    state = load_checkpoint(tmp_path / "nan" / "checkpoint.pt")
    assert state["step"] >= 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_engine_options_channels_last_bf16_clip_and_accumulation(tmp_path: Path) -> None:
    options = [
        "train.channels_last=true",
        "train.amp=bf16",
        "train.grad_clip=1.0",
        "train.accumulation_steps=2",
        "train.optimizer=adamw",
        "train.lr=1e-3",
        "train.epochs=1",
    ]
    assert _train(tmp_path, "options", *options) == 0
    record = read_jsonl(tmp_path / "options" / "metrics.jsonl")[-1]
    assert record["epoch"] == 1 and 0 <= record["val_top1"] <= 100
    assert np.isfinite(record["val_loss"])


def test_compiled_training_matches_eager(tmp_path: Path) -> None:
    # train.compile=true: the whole model, involution ops included, through torch.compile.
    assert _train(tmp_path, "eager", "train.epochs=1") == 0
    assert _train(tmp_path, "compiled", "train.epochs=1", "train.compile=true") == 0
    eager, compiled = _weights(tmp_path / "eager"), _weights(tmp_path / "compiled")
    assert eager.keys() == compiled.keys()
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], rtol=1e-4, atol=1e-4, msg=key)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["model.name=no_such_net"], "unknown model 'no_such_net'"),
        (["data.dataset=imagefolder", "data.root=/no/such/dir"], "does not exist"),
        (["train.lrr=1"], "unknown config key 'train.lrr'"),
        (["train.batch_size=64"], "fewer than one step"),
        (["train.eval_every_epochs=0"], "'train.eval_every_epochs' must be positive"),
    ],
)
def test_bad_input_gives_a_one_line_error(tmp_path: Path, capsys, overrides, match) -> None:
    assert _train(tmp_path, "bad", *overrides) == 2
    assert re.search(match, capsys.readouterr().err)


def _tiny_image_folder(root: Path) -> None:
    for split, count in (("train", 8), ("val", 3)):
        for label, color in (("red", (255, 0, 0)), ("blue", (0, 0, 255))):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (10, 10), tuple(min(255, c + 10 * i) for c in color)).save(
                    folder / f"{i}.png"
                )


def test_ddp_two_cpu_processes(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _tiny_image_folder(data)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--standalone",
        "-m",
        "involution.cli",
        "train",
        "--set",
        *[o for o in TINY if not o.startswith("data.")],
        "data.dataset=imagefolder",
        f"data.root={data}",
        "data.val_split=val",
        "data.image_size=8",
        f"output.dir={tmp_path}",
        "output.name=ddp",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Own process group: on a timeout the workers die with torchrun instead of lingering.
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"torchrun timed out:\n{stderr[-3000:]}")
    assert process.returncode == 0, stderr[-3000:]
    run = tmp_path / "ddp"
    state = load_checkpoint(run / "checkpoint.pt")
    # 16 training images, 2 ranks x batch 4: 2 steps per epoch, 2 epochs.
    assert (state["world_size"], state["step"], state["epoch"]) == (2, 4, 2)
    assert len(state["rng"]) == 2
    # Each rank seeds its own dropout RNG.
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
    evals = [r for r in read_jsonl(run / "metrics.jsonl") if "val_top1" in r]
    assert [r["epoch"] for r in evals] == [1, 2]
    # 6 validation images split 3 + 3: accuracy is a multiple of 1/6.
    assert all(abs(r["val_top1"] * 6 / 100 - round(r["val_top1"] * 6 / 100)) < 1e-6 for r in evals)
    assert "run finished" in stdout and stdout.count("run directory") == 1
    config = json.loads(json.dumps(load_checkpoint(run / "checkpoint.pt")["config"]))
    assert config["data"]["dataset"] == "imagefolder"


def test_training_frees_the_trainer_before_returning(tmp_path: Path) -> None:
    # Under DDP the trainer holds the process group; one left to interpreter shutdown can abort
    # a rank while Gloo's threads are torn down.
    assert _train(tmp_path, "freed") == 0
    assert not any(isinstance(o, Trainer) for o in gc.get_objects())


def test_progress_off_a_terminal_is_a_few_plain_lines(tmp_path: Path, capfd) -> None:
    # 100 steps an epoch: a tqdm bar would redraw itself with "\r" at every one of them.
    assert _train(tmp_path, "log", "train.progress=true", "data.synthetic_train_size=400") == 0
    out, err = capfd.readouterr()
    assert "\r" not in out + err
    lines = [line for line in err.splitlines() if line.startswith("epoch ")]
    assert len(lines) == 2 * 10 and lines[-1].startswith("epoch 2/2: 100/100, loss ")
    assert len(out + err) < 4000
    assert "epoch 2: val_loss" in out


def test_unnamed_runs_are_named_after_the_model_built(tmp_path: Path, capsys) -> None:
    # TINY's model.kwargs reshape rednet_compact: the folder says which config and how big.
    assert main(["train", "--set", *TINY, f"output.dir={tmp_path}"]) == 0
    (run,) = tmp_path.iterdir()
    params = int(re.search(r"parameters: ([\d,]+)", capsys.readouterr().out)[1].replace(",", ""))
    assert re.fullmatch(r"fashion_mnist-(\d+\.\d)k-synthetic-\d{8}-\d{6}", run.name)
    assert run.name.split("-")[1] == f"{params / 1e3:.1f}k"
    demo = load_config("scenes_det")
    assert model_label(demo, 4_812_345, "scenes_det") == "scenes_det-4.8M"
    assert model_label(load_config("fashion_mnist"), 1, "fashion_mnist") == "rednet_compact"


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"step": 1})

    def crash(f) -> None:  # a kill in the middle of writing
        f.write(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, crash)
    assert load_checkpoint(path) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temporary left


def test_lr_schedule_warms_up_linearly_then_decays_to_the_floor() -> None:
    factors = [lr_factor(step, total_steps=10, warmup_steps=4, min_ratio=0.1) for step in range(10)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == 1.0  # cosine starts at the peak
    assert all(a > b for a, b in itertools.pairwise(factors[4:]))
    assert lr_factor(10, 10, 4, 0.1) == pytest.approx(0.1)


def test_predict_out_writes_a_classifiers_reports(tmp_path: Path, capsys) -> None:
    assert _train(tmp_path, "run") == 0
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(image)
    out = tmp_path / "predictions"
    capsys.readouterr()
    argv = ["predict", str(image), "--run", str(tmp_path / "run"), "--topk", "2"]
    assert main([*argv, "--out", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert (out / "predictions.txt").read_text().splitlines() == printed[:3]
    assert printed[3] == f"reports -> {out / 'predictions.txt'}"
