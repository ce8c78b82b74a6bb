"""Nothing runs from a file the project reads; concurrent runs never share a run directory.

A crafted ``torch.save`` file whose unpickling runs a shell command (touching a marker file) is
fed through every load path: each refuses it with a message that says why and what to do, and
the marker never appears. Run directories are claimed with an atomic ``mkdir``.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import re
import shlex
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import timm
import torch

from involution.cli import main
from involution.models import RedNet, rednet_from_checkpoint
from involution.models.convert import load_checkpoint as load_model_checkpoint
from involution.models.fpn import load_backbone_weights
from involution.models.rednet import MODEL_DEPTHS
from involution.serialization import UnsafeFileError, load_torch_file
from involution.train import rundir
from involution.train.checkpoint import load_checkpoint, read_jsonl, save_checkpoint
from involution.train.config import dump_config, load_config
from test_train import TINY, _train

# What a refused pickle's message says, on every torch.save path.
REFUSED = r"contains objects other than tensors and plain data.*not loaded \(nothing in it was"
# What the safetensors-only paths (eval, predict) say about a pickle in their place.
NOT_SAFETENSORS = r"is a torch\.save \(pickle\) file, not safetensors, so it was not loaded"


class _TouchesMarker:
    """Unpickling this runs ``touch marker`` (what a malicious checkpoint would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def _crafted(folder: Path, marker: Path, kind: str = "zip", name: str = "evil.pt") -> Path:
    """A checkpoint-looking file carrying the payload: torch.save's zip or legacy format, or a
    bare pickle."""
    path = folder / name
    content = {"state_dict": {"fc.weight": torch.zeros(2, 2)}, "meta": _TouchesMarker(marker)}
    if kind == "zip":
        torch.save(content, path)
    elif kind == "legacy":
        torch.save(content, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(content))
    return path


@pytest.fixture
def marker(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "payload-ran"
    yield path
    assert not path.exists(), "the crafted pickle's code ran"


def test_the_crafted_file_runs_its_code_when_fully_unpickled(tmp_path: Path) -> None:
    # The payload is live: what every other test refuses would otherwise have run.
    marker = tmp_path / "payload-ran"
    torch.load(_crafted(tmp_path, marker), weights_only=False)
    assert marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")  # the bare pickle
@pytest.mark.parametrize("kind", ["zip", "legacy", "pickle"])
def test_loader_refuses_every_pickle_format(tmp_path: Path, marker: Path, kind: str) -> None:
    with pytest.raises(UnsafeFileError, match=REFUSED) as info:
        load_torch_file(_crafted(tmp_path, marker, kind))
    assert "involution upgrade-checkpoint" in str(info.value)
    assert "truncated" not in str(info.value)
    if kind != "pickle":  # torch's unpickler names the refused object in its own formats
        assert "posix.system" in str(info.value)


def test_resume_refuses_a_crafted_checkpoint(tmp_path: Path, marker: Path, capsys) -> None:
    run = tmp_path / "run"
    run.mkdir()
    config = load_config(None, [*TINY, f"output.dir={tmp_path}", "output.name=run"])
    (run / "config.yaml").write_text(dump_config(config))
    checkpoint = _crafted(run, marker, name="checkpoint.pt")
    with pytest.raises(UnsafeFileError, match=REFUSED):
        load_checkpoint(checkpoint)
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert re.search(REFUSED, err) and f"upgrade-checkpoint {checkpoint} {checkpoint}" in err


def test_eval_and_predict_refuse_a_pickle_as_weights(tmp_path: Path, marker: Path, capsys) -> None:
    evil = _crafted(tmp_path, marker)
    run = tmp_path / "run"
    run.mkdir()
    _crafted(run, marker, name="model.safetensors")
    for argv in (
        ["eval", "--weights", str(evil)],
        ["eval", "--run", str(run)],
        ["predict", str(tmp_path / "a.png"), "--weights", str(evil)],
    ):
        assert main(argv) == 2
        assert re.search(NOT_SAFETENSORS, capsys.readouterr().err), argv


def test_convert_refuses_a_crafted_checkpoint(tmp_path: Path, marker: Path, capsys) -> None:
    evil = _crafted(tmp_path, marker, name="rednet26.pth")
    out = tmp_path / "out.safetensors"
    assert main(["convert", str(evil), str(out)]) == 2
    err = capsys.readouterr().err
    assert re.search(REFUSED, err) and "truncated" not in err
    assert not out.exists()


def test_model_loaders_refuse_a_crafted_checkpoint(tmp_path: Path, marker: Path) -> None:
    evil = _crafted(tmp_path, marker, name="rednet26.pth")
    with pytest.raises(UnsafeFileError, match=REFUSED):
        rednet_from_checkpoint(evil)
    model = RedNet(MODEL_DEPTHS[26], num_classes=0)
    with pytest.raises(UnsafeFileError, match=REFUSED):
        load_model_checkpoint(model, evil)
    # The detection / segmentation backbone's weights (models.fpn).
    with pytest.raises(UnsafeFileError, match=REFUSED):
        load_backbone_weights(model, evil)
    # timm's pretrained_cfg_overlay file goes through the same loader first.
    for name in ("rednet26", "rednet_compact"):
        with pytest.raises(UnsafeFileError, match=REFUSED):
            timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(evil)})


def test_truncated_file_still_reads_as_truncated(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"weights": torch.zeros(1000)})
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated") as info:
        load_checkpoint(path)
    assert not isinstance(info.value, UnsafeFileError)


def test_checkpoints_hold_only_plain_data(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"the checkpoint\['extra'\]\[0\] is a builtins.object"):
        save_checkpoint(tmp_path / "checkpoint.pt", {"extra": [object()]})
    assert not (tmp_path / "checkpoint.pt").exists()


def test_resume_of_new_and_upgraded_checkpoints_is_bit_exact(tmp_path: Path, capsys) -> None:
    recipe = ["train.accumulation_steps=2", "model.kwargs.drop_rate=0.5", "train.epochs=1"]
    assert _train(tmp_path, "whole", *recipe) == 0
    assert _train(tmp_path, "split", *recipe, "train.max_steps=1") == 0
    path = tmp_path / "split" / "checkpoint.pt"
    # The training state loads with plain torch.load(weights_only=True): RNGs as tensors.
    state = torch.load(path, weights_only=True)
    assert isinstance(state["rng"][0]["numpy"][1], torch.Tensor)
    assert isinstance(state["rng"][0]["python"], tuple) and state["step"] == 1

    # A checkpoint from before this format (numpy RNG state) is refused with the way out...
    kind, keys, *position = state["rng"][0]["numpy"]
    state["rng"][0]["numpy"] = (kind, keys.numpy().astype(np.uint32), *position)
    torch.save(state, path)
    resume = ["train", "--resume", str(tmp_path / "split"), "--set", "train.max_steps=null"]
    assert main(resume) == 2
    assert f"involution upgrade-checkpoint {path} {path}" in capsys.readouterr().err
    # ...which rewrites it in place, and the run continues exactly as if never interrupted.
    assert main(["upgrade-checkpoint", str(path), str(path)]) == 0
    assert main(resume) == 0
    whole = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)
    split = torch.load(path, weights_only=True)
    for key, value in whole["model"].items():
        assert torch.equal(split["model"][key], value), key
    val = [r for r in read_jsonl(tmp_path / "whole" / "metrics.jsonl") if "val_loss" in r]
    assert val == [r for r in read_jsonl(tmp_path / "split" / "metrics.jsonl") if "val_loss" in r]


class _FrozenClock(datetime):
    """Every process starts in the same second: the automatic names collide."""

    @classmethod
    def now(cls, tz: timezone | None = None) -> datetime:
        return datetime(2025, 1, 2, 3, 4, 5, tzinfo=tz)


def _claim(config: dict, start: Any, results: Any) -> None:
    start.wait()
    try:
        results.put(str(rundir.new_run_dir(config)))
    except ValueError as err:
        results.put(f"refused: {err}")


def _race(config: dict, processes: int = 8) -> list[str]:
    """``new_run_dir(config)`` in ``processes`` forked processes released at once."""
    context = multiprocessing.get_context("fork")
    start, results = context.Barrier(processes), context.Queue()
    workers = [
        context.Process(target=_claim, args=(config, start, results)) for _ in range(processes)
    ]
    for worker in workers:
        worker.start()
    outcomes = [results.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    return outcomes


def test_eight_processes_started_at_once_get_eight_directories(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(rundir, "datetime", _FrozenClock)
    config = load_config(None, [*TINY, f"output.dir={tmp_path}"])
    outcomes = _race(config)
    base = "rednet_compact-synthetic-20250102-030405"
    expected = [base] + [f"{base}-{i}" for i in range(2, 9)]
    assert sorted(Path(p).name for p in outcomes) == sorted(expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(expected)

    # The same explicit name: one process gets it, the seven others are refused.
    outcomes = _race(load_config(None, [*TINY, f"output.dir={tmp_path}", "output.name=named"]))
    assert outcomes.count(str(tmp_path / "named")) == 1
    refused = [o for o in outcomes if o.startswith("refused")]
    assert len(refused) == 7 and all(f"--resume {tmp_path / 'named'}" in o for o in refused)


def test_an_existing_explicit_name_is_refused_and_left_untouched(tmp_path, capsys) -> None:
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "metrics.jsonl").write_text('{"step": 1}\n')
    assert _train(tmp_path, "taken") == 2
    assert f"--resume {taken}" in capsys.readouterr().err
    assert [p.name for p in taken.iterdir()] == ["metrics.jsonl"]
    assert (taken / "metrics.jsonl").read_text() == '{"step": 1}\n'
