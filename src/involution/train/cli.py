"""``involution train``, ``eval``, ``predict`` and ``upgrade-checkpoint``."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from involution.cli_utils import USER_ERRORS, add_command, user_error
from involution.train import checkpoint as ckpt
from involution.train.config import DEFAULT_CONFIG_NAME, load_config, shipped_configs

if TYPE_CHECKING:
    from involution.models.loading import LoadedModel


def _add_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        dest="overrides",
        metavar="KEY=VALUE",
        nargs="+",
        action="extend",
        default=[],
        help="override config keys, e.g. --set train.lr=0.05 data.root=/data/imagenet",
    )


def _add_trained_weights(parser: argparse.ArgumentParser) -> None:
    """``--run RUN_DIR`` or ``--weights FILE``, and ``--config``."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", metavar="RUN_DIR", help="a training run directory")
    source.add_argument("--weights", metavar="FILE", help="a .safetensors weights file")
    parser.add_argument("--config", help="config (default: the one stored with the weights)")


def add_commands(subparsers: Any) -> None:
    """Register ``train``, ``eval``, ``predict`` and ``upgrade-checkpoint``."""
    add_command(subparsers, "train", train_command, train_arguments)
    add_command(subparsers, "eval", eval_command, eval_arguments)
    add_command(subparsers, "predict", predict_command, predict_arguments)
    add_command(subparsers, "upgrade-checkpoint", upgrade_command, upgrade_arguments)


def train_arguments(train: argparse.ArgumentParser) -> None:
    """train a model (default: compact RedNet on Fashion-MNIST)"""
    shipped = ", ".join(shipped_configs())
    train.description = f"Train from a YAML config (a path or a shipped one: {shipped})."
    train.add_argument("config", nargs="?", help=f"config file (default: {DEFAULT_CONFIG_NAME})")
    _add_overrides(train)
    train.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR")
    train.add_argument(
        "--resume-if-exists",
        action="store_true",
        help="continue the run in output.dir/output.name if it holds a checkpoint, else start "
        "it (for schedulers that requeue the same command; automatic under torchrun restarts)",
    )


def eval_arguments(evaluate: argparse.ArgumentParser) -> None:
    """metrics of trained weights on a dataset's evaluation split (top-1/top-5, COCO AP,
    mIoU: by task)"""
    _add_trained_weights(evaluate)
    _add_overrides(evaluate)


def predict_arguments(predict: argparse.ArgumentParser) -> None:
    """classes (top-k), detections or segmentation masks of image files"""
    predict.add_argument("images", nargs="+", metavar="IMAGE")
    _add_trained_weights(predict)
    predict.add_argument("--topk", type=int, default=5, help="classes to show per image")
    predict.add_argument(
        "--out",
        metavar="DIR",
        help="write the reports (predictions.txt) and the drawn predictions (detection, "
        "segmentation) here",
    )


def upgrade_arguments(upgrade: argparse.ArgumentParser) -> None:
    """rewrite a checkpoint you trust as tensors and plain data (runs the file's code)

    Unpickle OLD in full and write NEW with tensors and plain data only, so that it
    loads with weights_only=True (numpy arrays become tensors, argparse namespaces
    dicts): for training checkpoints written before RNG states were stored as tensors
    and other checkpoints refused as holding more than tensors and plain data.
    Reading OLD runs any code it contains: only for files whose origin you trust, on
    a trusted machine. NEW may be OLD.
    """
    upgrade.add_argument("old", metavar="OLD", help="checkpoint to rewrite (torch.save file)")
    upgrade.add_argument("new", metavar="NEW", help="output file (may be OLD)")


# ----------------------------------------------------------------------------- train


def _describe_run_dir(run_dir: Path) -> str:
    descriptions = {
        ckpt.CONFIG_NAME: "resolved config",
        ckpt.METRICS_NAME: "metrics, one JSON record per line",
        ckpt.CHECKPOINT_NAME: "full training state for --resume",
        ckpt.WEIGHTS_NAME: "final weights (+ config and class names as metadata)",
        ckpt.EMA_WEIGHTS_NAME: "EMA weights",
        ckpt.PLOT_NAME: "loss and validation-metric curves",
    }
    lines = [
        f"  {name:<22} {text}" for name, text in descriptions.items() if (run_dir / name).exists()
    ]
    return "\n".join(lines)


def train_command(args: argparse.Namespace) -> int:
    from involution.train.engine import NonFiniteLossError, RunOptions, run_training
    from involution.train.signals import TrainingInterrupted

    try:
        if args.resume:
            if args.config:
                return user_error(
                    "give either a config or --resume RUN_DIR (it has its own config)"
                )
            run_dir = Path(args.resume)
            if not (run_dir / ckpt.CHECKPOINT_NAME).is_file():
                return user_error(f"{run_dir} holds no {ckpt.CHECKPOINT_NAME} to resume from")
            config = load_config(run_dir / ckpt.CONFIG_NAME, args.overrides)
            summary = run_training(config, RunOptions(run_dir, resume=True))
        else:
            config = load_config(args.config or DEFAULT_CONFIG_NAME, args.overrides)
            config_name = Path(args.config or DEFAULT_CONFIG_NAME).stem
            options = RunOptions(config_name=config_name, continue_if_exists=args.resume_if_exists)
            summary = run_training(config, options)
    except TrainingInterrupted as err:
        print(f"involution: training {err}", file=sys.stderr)
        return err.exit_code
    except NonFiniteLossError as err:
        print(f"involution: training stopped: {err}", file=sys.stderr)
        return 1
    except USER_ERRORS as err:
        return user_error(err)
    if int(os.environ.get("RANK", "0")) == 0:
        _print_summary(summary)
    return 0


def _print_summary(summary: dict[str, Any]) -> None:
    from involution.train.tasks import get_task

    run_dir = Path(summary["run_dir"])
    state = "finished"
    if not summary["finished"]:
        state = (
            f"stopped at train.max_steps (continue: --resume {run_dir} --set train.max_steps=null)"
        )
    print(f"\nrun {state}: {summary['steps']} steps, {summary['wall_s']:.0f} s")
    print(f"parameters: {summary['num_params']:,}")
    print(f"training throughput: {summary['train_img_per_s']:.1f} img/s")
    task = get_task(summary["task"])
    for prefix, label in (("val_", "evaluation"), ("ema_val_", "evaluation of the EMA weights")):
        metrics = {k[len(prefix) :]: v for k, v in summary.items() if k.startswith(prefix)}
        if metrics:
            print(f"{label}: {task.format_metrics(metrics)}")
    print(f"run directory: {run_dir}")
    print(_describe_run_dir(run_dir))


def upgrade_command(args: argparse.Namespace) -> int:
    try:
        ckpt.upgrade_checkpoint(Path(args.old), Path(args.new))
    except USER_ERRORS as err:
        return user_error(err)
    print(f"wrote {args.new}: tensors and plain data only (loads with weights_only=True)")
    return 0


# ----------------------------------------------------------------------------- eval / predict


def eval_command(args: argparse.Namespace) -> int:
    from involution.train.data import ShardSampler, build_loader
    from involution.train.distributed import DistInfo, resolve_device
    from involution.train.loading import load_model
    from involution.train.tasks import get_task

    files = [Path(args.weights) if args.weights else Path(args.run) / ckpt.WEIGHTS_NAME]
    if args.run and (Path(args.run) / ckpt.EMA_WEIGHTS_NAME).is_file():
        files.append(Path(args.run) / ckpt.EMA_WEIGHTS_NAME)
    try:
        results = {}
        for path in files:
            loaded = load_model(weights=path, config=args.config, overrides=args.overrides)
            model, config, classes = loaded.model, _trained_config(loaded, path), loaded.classes
            task = get_task(config["task"])
            data = task.build_data(config, train=False)
            if classes != data.classes:
                raise ValueError(f"{path} was trained on other classes than {config['data']}")
            info = DistInfo(0, 1, resolve_device(config["train"]["device"]))
            loader = build_loader(
                data.val,
                ShardSampler(len(data.val)),
                config["train"]["batch_size"],
                config["data"]["workers"],
                data.collate_fn,
            )
            metrics = task.evaluate(model.to(info.device), loader, info, progress=True)
            results[path.name] = task.format_metrics(metrics)
    except USER_ERRORS as err:
        return user_error(err)
    for name, text in results.items():
        print(f"{name}: {text}")
    return 0


def _trained_config(loaded: LoadedModel, source: object) -> Mapping[str, Any]:
    """The training config of ``loaded`` (eval and predict take a run's weights only)."""
    if loaded.config is None:
        raise ValueError(f"{source} carries no training config: pass --config")
    return loaded.config


def predict_command(args: argparse.Namespace) -> int:
    from involution.train.loading import load_model
    from involution.train.tasks import get_task

    if args.topk < 1:
        return user_error(f"--topk must be positive, got {args.topk}")
    try:
        loaded = load_model(run=args.run, weights=args.weights, config=args.config)
        out_dir = Path(args.out) if args.out else None
        images = [Path(name) for name in args.images]
        get_task(_trained_config(loaded, args.weights or args.run)["task"]).predict(
            loaded.model, loaded.config, loaded.classes, loaded.in_chans, images, out_dir, args.topk
        )
    except USER_ERRORS as err:
        return user_error(err)
    return 0
