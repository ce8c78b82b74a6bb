"""The training engine: one process or DDP (torchrun), AMP, EMA, exact resume, NaN guard.

A run lives in a directory holding ``config.yaml`` (the resolved config), ``metrics.jsonl``,
``checkpoint.pt`` (everything needed to continue), ``model.safetensors`` (plus
``model_ema.safetensors`` with EMA) and ``curves.png``.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import math
import os
import signal
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from involution.serialization import UnsafeFileError
from involution.train import checkpoint as ckpt
from involution.train.config import Config, dump_config
from involution.train.data import DataBundle, EpochBatchSampler, ShardSampler, build_loader
from involution.train.distributed import (
    DistInfo,
    all_reduce_sum,
    broadcast_from_main,
    init_distributed,
    seed_everything,
)
from involution.train.plots import plot_curves
from involution.train.progress import progress_bar, write_line
from involution.train.rundir import RunStart, model_label, open_run_dir
from involution.train.signals import StopSignals, TrainingInterrupted
from involution.train.tasks import Task, get_task
from involution.train.tasks.base import total_loss


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


# ----------------------------------------------------------------------------- model pieces


class ModelEma:
    """Exponential moving average of a model's parameters and buffers (float copies).

    ``ema = decay * ema + (1 - decay) * model`` after every optimizer step; integer buffers
    (BatchNorm's step counter) are copied.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema_state = self.module.state_dict()
        floats_ema, floats_new = [], []
        for key, value in model.state_dict().items():
            if value.is_floating_point():
                floats_ema.append(ema_state[key])
                floats_new.append(value.detach())
            else:
                ema_state[key].copy_(value)
        torch._foreach_lerp_(floats_ema, floats_new, 1.0 - self.decay)


def lr_factor(
    step: int,
    total_steps: int,
    warmup_steps: int,
    min_ratio: float,
    schedule: str = "cosine",
    warmup_factor: float | None = None,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
    power: float = 0.9,
) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based).

    ``cosine``: linear warm-up from 1/warmup_steps (or ``warmup_factor``), then cosine decay to
    ``min_ratio`` at ``total_steps``. ``step``: ``gamma`` ** (milestones passed, in steps).
    ``poly``: ``(1 - step/total_steps) ** power``, floored at ``min_ratio``. ``step`` and
    ``poly`` decay from step 0 and the warm-up multiplies them (as mmdet/mmseg do).
    """
    warm = 1.0
    if step < warmup_steps:
        if warmup_factor is None:
            warm = (step + 1) / warmup_steps
        else:
            warm = warmup_factor + (1 - warmup_factor) * step / warmup_steps
    if schedule == "step":
        return warm * gamma ** sum(step >= m for m in milestones)
    if schedule == "poly":
        decayed = (1 - min(step, total_steps) / max(1, total_steps)) ** power
        return warm * max(min_ratio, decayed)
    if step < warmup_steps:
        return warm
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def build_optimizer(model: nn.Module, config: Config, lr: float) -> torch.optim.Optimizer:
    """SGD (optionally Nesterov) or AdamW over all trainable parameters."""
    train = config["train"]
    params = [p for p in model.parameters() if p.requires_grad]
    if train["optimizer"] == "sgd":
        return torch.optim.SGD(
            params,
            lr=lr,
            momentum=train["momentum"],
            nesterov=train["nesterov"] and train["momentum"] > 0,
            weight_decay=train["weight_decay"],
        )
    return torch.optim.AdamW(params, lr=lr, weight_decay=train["weight_decay"])


def autocast_dtype(config: Config, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``train.amp`` (None: full precision)."""
    amp = config["train"]["amp"]
    if amp == "none":
        return None
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("train.amp=fp16 needs a CUDA device (use bf16 on the CPU)")
    return torch.bfloat16 if amp == "bf16" else torch.float16


def weights_metadata(config: Config, classes: list[str], in_chans: int) -> dict[str, str]:
    """safetensors metadata that lets ``eval``/``predict`` rebuild the model from the file."""
    return {
        "format": "pt",
        "task": config["task"],
        "model": config["model"]["name"],
        "config": dump_config(config),
        "classes": json.dumps(classes),
        "in_chans": str(in_chans),
    }


# ----------------------------------------------------------------------------- trainer


@dataclass(frozen=True)
class RunOptions:
    """How a run starts: in ``run_dir`` (continued from its checkpoint with ``resume``), or,
    without it, in a directory rank 0 picks once the model is built: a new one named after the
    model (:func:`~involution.train.rundir.model_label`, with ``config_name``, the config file's
    stem), or, on an elastic restart or with ``continue_if_exists``, the run already in
    ``output.dir/output.name``, continued (:func:`~involution.train.rundir.open_run_dir`)."""

    run_dir: Path | None = None
    resume: bool = False
    config_name: str | None = None
    continue_if_exists: bool = False


class Trainer:
    """Train ``config`` in the run directory ``options`` give (:class:`RunOptions`; every rank
    takes rank 0's choice). Call :meth:`fit`. Only rank 0 writes files and prints.
    """

    def __init__(self, config: Config, options: RunOptions = RunOptions()) -> None:
        self.config = config
        self.info = self._set_up_runtime()
        self._build_model()
        self._build_loaders()
        self._build_optimization()
        self.net = self._wrap_model()
        self.step = 0
        self.epoch = 0
        self.step_in_epoch = 0
        self.stopped_early = False
        self.last_eval: dict[str, float] = {}
        self.stop_signals = StopSignals()
        self.interrupted_by: int | None = None
        if options.run_dir is not None:
            found = RunStart(options.run_dir, options.resume)
        else:
            found = self._open_run_dir(options.config_name, options.continue_if_exists)
        self.run_dir = found.path
        self._start(found.resume, announce=options.run_dir is None)

    # ---------------------------------------------------------------- set-up steps

    def _set_up_runtime(self) -> DistInfo:
        """Join the job's processes; CPU threads, determinism and precision from ``train``."""
        train = self.config["train"]
        info = init_distributed(train["device"])
        if train["threads"] is not None:
            if train["threads"] < 1:
                raise ValueError(f"train.threads must be positive, got {train['threads']}")
            torch.set_num_threads(train["threads"])
        if train["deterministic"]:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        elif info.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.amp_dtype = autocast_dtype(self.config, info.device)
        self.channels_last: bool = train["channels_last"]
        return info

    def _build_model(self) -> None:
        """The task, its data and the model on this rank's device."""
        train = self.config["train"]
        # Same initial weights on every rank, then per-rank randomness (dropout).
        seed_everything(train["seed"])
        self.task: Task = get_task(self.config["task"])
        self.data: DataBundle = self.task.build_data(self.config)
        model = self.task.build_model(self.config, self.data.classes, self.data.in_chans)
        if train["sync_bn"] and self.info.distributed:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = model.to(self.info.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.num_params = sum(p.numel() for p in model.parameters())
        seed_everything(train["seed"] + self.info.rank)

    def _build_loaders(self) -> None:
        """This rank's training batches and evaluation shard; the run's length in steps."""
        train, info = self.config["train"], self.info
        self.batch_size = train["batch_size"]
        self.accumulation = train["accumulation_steps"]
        self.global_batch = self.batch_size * self.accumulation * info.world_size
        self.sampler = EpochBatchSampler(
            self.data.train,
            self.batch_size,
            train["seed"],
            info.rank,
            info.world_size,
            group_ids=self.data.group_ids,
        )
        if len(self.sampler) < self.accumulation:
            raise ValueError(
                f"each rank gets {len(self.data.train) // info.world_size} training samples, "
                "fewer than one step's batch_size * accumulation_steps = "
                f"{self.batch_size * self.accumulation}"
            )
        workers = self.config["data"]["workers"]
        collate_fn = self.data.collate_fn
        self.train_loader = build_loader(self.data.train, self.sampler, None, workers, collate_fn)
        val_sampler = ShardSampler(len(self.data.val), info.rank, info.world_size)
        self.val_loader = build_loader(
            self.data.val, val_sampler, self.batch_size, workers, collate_fn
        )
        self.steps_per_epoch = len(self.sampler) // self.accumulation
        self.total_steps = train["epochs"] * self.steps_per_epoch
        self.num_epochs = train["epochs"]
        if train["iterations"] is not None:
            # An iteration budget (segmentation's 80k): the last epoch is cut short.
            self.total_steps = train["iterations"]
            self.num_epochs = math.ceil(self.total_steps / self.steps_per_epoch)

    def _build_optimization(self) -> None:
        """Optimizer, lr schedule (per optimizer step), gradient scaler and EMA."""
        train = self.config["train"]
        base_batch = train["lr_base_batch"]
        self.peak_lr = train["lr"] * (self.global_batch / base_batch if base_batch else 1.0)
        self.optimizer = build_optimizer(self.model, self.config, self.peak_lr)
        warmup = train["warmup_steps"]
        if warmup is None:
            warmup = round(train["warmup_epochs"] * self.steps_per_epoch)
        milestones = [round(m * self.steps_per_epoch) for m in train["milestones"]]
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: lr_factor(
                step,
                self.total_steps,
                warmup,
                train["min_lr_ratio"],
                train["schedule"],
                train["warmup_factor"],
                milestones,
                train["gamma"],
                train["poly_power"],
            ),
        )
        fp16 = self.amp_dtype == torch.float16
        self.scaler = torch.amp.GradScaler(self.info.device.type, enabled=fp16)
        self.ema = ModelEma(self.model, train["ema_decay"]) if train["ema_decay"] else None

    def _wrap_model(self) -> nn.Module:
        """The module the training steps call: the model under DDP and/or ``torch.compile``."""
        net: nn.Module = self.model
        if self.info.distributed:
            ids = [self.info.device.index] if self.info.device.type == "cuda" else None
            net = DistributedDataParallel(self.model, device_ids=ids)
        if self.config["train"]["compile"]:
            net = torch.compile(net)
        return net

    def _open_run_dir(self, config_name: str | None, continue_if_exists: bool) -> RunStart:
        """Rank 0's choice of run directory (a new one, or one to continue) on every rank."""
        found: tuple[RunStart | None, str | None] = (None, None)  # the choice, or the error
        if self.info.is_main:
            label = model_label(self.config, self.num_params, config_name)
            try:
                found = (open_run_dir(self.config, label, continue_if_exists), None)
            except (ValueError, OSError) as err:
                found = (None, str(err))
        start, error = broadcast_from_main(found, self.info)
        if error is not None:
            raise ValueError(error)
        return start

    def _start(self, resume: bool, announce: bool) -> None:
        """Continue from the run directory's checkpoint (saying so when ``announce``: the
        command did not name the run), or record the config of a new run."""
        if resume:
            if self.info.is_main:
                ckpt.remove_temporaries(self.run_dir)  # writes a killed process left unfinished
            self._load(self.run_dir / ckpt.CHECKPOINT_NAME)
            if announce and self.info.is_main:
                print(f"continuing the run in {self.run_dir} from step {self.step}", flush=True)
        elif self.info.is_main:
            # run_dir is new, or emptied of an attempt that died before its first checkpoint.
            ckpt.atomic_write(
                self.run_dir / ckpt.CONFIG_NAME,
                lambda f: f.write(dump_config(self.config).encode()),
            )

    # ---------------------------------------------------------------- state

    def _state(self) -> dict[str, Any]:
        rng = ckpt.rng_state()
        rngs = [rng]
        if self.info.distributed:
            rngs = [None] * self.info.world_size
            dist.all_gather_object(rngs, rng)
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema else None,
            "step": self.step,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "world_size": self.info.world_size,
            "rng": rngs,
            "last_eval": self.last_eval,
            "config": self.config,
        }

    def _load(self, path: Path) -> None:
        try:
            state = ckpt.load_checkpoint(path)
        except UnsafeFileError:
            raise
        except ValueError as err:
            raise ValueError(
                f"{err}. The run was not started over in its place: restore {path}, or move "
                f"{path.parent} away to start afresh"
            ) from None
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            if state["ema"] is None:
                raise ValueError(f"{path} has no EMA weights but train.ema_decay is set")
            self.ema.module.load_state_dict(state["ema"])
        self.step = state["step"]
        self.epoch = state["epoch"]
        self.step_in_epoch = state["step_in_epoch"]
        self.last_eval = state["last_eval"]
        if state["world_size"] != self.info.world_size:
            raise ValueError(
                f"{path} was saved by {state['world_size']} processes, this job has "
                f"{self.info.world_size}: resume with the same number of processes"
            )
        ckpt.set_rng_state(state["rng"][self.info.rank])
        if self.info.is_main:
            ckpt.truncate_metrics(self.run_dir / ckpt.METRICS_NAME, self.step)

    def save(self) -> None:
        """Checkpoint, weights and plot (rank 0 writes; every rank must call it)."""
        state = self._state()
        if not self.info.is_main:
            return
        ckpt.save_checkpoint(self.run_dir / ckpt.CHECKPOINT_NAME, state)
        meta = weights_metadata(self.config, self.data.classes, self.data.in_chans)
        ckpt.save_weights(self.run_dir / ckpt.WEIGHTS_NAME, self.model, meta)
        if self.ema is not None:
            ckpt.save_weights(self.run_dir / ckpt.EMA_WEIGHTS_NAME, self.ema.module, meta)
        plot_curves(
            ckpt.read_jsonl(self.run_dir / ckpt.METRICS_NAME),
            self.run_dir / ckpt.PLOT_NAME,
            self.task.curve_metrics,
        )

    def log(self, record: dict[str, Any]) -> None:
        if self.info.is_main:
            ckpt.append_jsonl(self.run_dir / ckpt.METRICS_NAME, record)

    # ---------------------------------------------------------------- loop

    def _batches(self) -> Iterator[Any]:
        for batch in self.train_loader:
            yield self.task.to_device(batch, self.info.device, self.channels_last)

    def _train_step(self, batches: Iterator[Any]) -> tuple[float, dict[str, float]]:
        """One optimizer step over ``accumulation_steps`` micro-batches; returns the mean loss
        and the mean of each of its named terms (none where the task's loss is one tensor).

        Raises :class:`NonFiniteLossError` (on every rank) before touching the weights.
        """
        loss_sum = torch.zeros((), device=self.info.device)
        term_sums: dict[str, torch.Tensor] = {}
        for micro in range(self.accumulation):
            batch = next(batches)
            last = micro == self.accumulation - 1
            sync = contextlib.nullcontext()
            if self.info.distributed and not last:
                sync = self.net.no_sync()  # all-reduce gradients once, on the last micro-batch
            with sync:
                with torch.autocast(
                    self.info.device.type, self.amp_dtype, enabled=self.amp_dtype is not None
                ):
                    loss, terms = total_loss(self.task.loss(self.net, batch, self.config))
                    loss = loss / self.accumulation
                self.scaler.scale(loss).backward()
            loss_sum += loss.detach()
            for name, term in terms.items():
                term_sums[name] = term_sums.get(name, 0.0) + term.detach() / self.accumulation
        names = sorted(term_sums)  # the same order on every rank
        loss_value, bad, *term_values = all_reduce_sum(
            [
                loss_sum.item(),
                float(not torch.isfinite(loss_sum).item()),
                *(term_sums[name].item() for name in names),
            ],
            self.info,
        )
        if bad:
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(
                f"loss is {loss_sum.item()} at step {self.step + 1} (epoch {self.epoch}); "
                f"stopped without applying it. The last good checkpoint is "
                f"{self.run_dir / ckpt.CHECKPOINT_NAME} (lower train.lr, set train.grad_clip "
                "or use train.amp=none, then --resume)"
            )
        if self.config["train"]["grad_clip"]:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.config["train"]["grad_clip"])
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)
        world = self.info.world_size
        return loss_value / world, {n: v / world for n, v in zip(names, term_values, strict=True)}

    def fit(self) -> dict[str, Any]:
        """Train to the end (or ``train.max_steps``); returns the summary of the run.

        A SIGTERM or SIGINT stops every rank after the same step, with a checkpoint, and raises
        :class:`~involution.train.signals.TrainingInterrupted` (:mod:`~involution.train.signals`).
        """
        with self.stop_signals:
            summary = self._fit()
        if self.interrupted_by is not None:
            name = signal.Signals(self.interrupted_by).name
            raise TrainingInterrupted(
                self.interrupted_by,
                f"stopped by {name} after step {self.step} (epoch {self.epoch + 1}); checkpoint "
                f"{self.run_dir / ckpt.CHECKPOINT_NAME}: continue with --resume {self.run_dir} "
                "or the same command with --resume-if-exists",
            )
        return summary

    def _fit(self) -> dict[str, Any]:
        train = self.config["train"]
        max_steps = train["max_steps"]
        every = train["checkpoint_every_steps"]
        show = train["progress"] and self.info.is_main
        timed_images, timed_seconds = 0, 0.0
        start = time.perf_counter()
        while self.epoch < self.num_epochs and not self.stopped_early:
            skip = self.step_in_epoch * self.accumulation
            self.sampler.set_epoch(self.epoch, skip=skip)
            self.model.train()
            batches = self._batches()
            bar = progress_bar(
                self.steps_per_epoch,
                f"epoch {self.epoch + 1}/{self.num_epochs}",
                show,
                initial=self.step_in_epoch,
            )
            window_loss, window_steps, window_seconds = 0.0, 0, 0.0
            window_terms: dict[str, float] = {}
            while self.step_in_epoch < self.steps_per_epoch and self.step < self.total_steps:
                tick = time.perf_counter()
                loss, terms = self._train_step(batches)
                seconds = time.perf_counter() - tick
                self.step += 1
                self.step_in_epoch += 1
                # The first step (allocations, compilation) would skew the throughput.
                if self.step_in_epoch > 1:
                    timed_images += self.global_batch
                    timed_seconds += seconds
                window_loss += loss
                for name, value in terms.items():
                    window_terms[name] = window_terms.get(name, 0.0) + value
                window_steps += 1
                window_seconds += seconds
                lr = self.scheduler.get_last_lr()[0]
                rate = self.global_batch / seconds
                # The terms too, so that a diverging one shows at once.
                parts = "".join(f", {name} {value:.3f}" for name, value in terms.items())
                bar.set_postfix_str(f"loss {loss:.4f}{parts}, lr {lr:.3g}, {rate:.0f} img/s", False)
                bar.update()
                # Windows end at checkpoints too: a run continued from one logs the same records.
                end_of_window = (
                    self.step_in_epoch == self.steps_per_epoch
                    or self.step == self.total_steps
                    or self.step % 50 == 0
                    or (every and self.step % every == 0)
                )
                stop = max_steps is not None and self.step >= max_steps
                stop = self._stop_requested() or stop
                if end_of_window or stop:
                    self.log(
                        {
                            "step": self.step,
                            "epoch": self.epoch + self.step_in_epoch / self.steps_per_epoch,
                            "lr": lr,
                            "train_loss": window_loss / window_steps,
                            **{
                                f"train_loss_{name}": total / window_steps
                                for name, total in window_terms.items()
                            },
                            "img_per_s": window_steps * self.global_batch / window_seconds,
                        }
                    )
                    window_loss, window_steps, window_seconds = 0.0, 0, 0.0
                    window_terms = {}
                if stop:
                    self.stopped_early = True
                    break
                if every and self.step % every == 0:
                    self.save()
            bar.close()
            if self.stopped_early:
                self.save()
                break
            self._end_epoch(show)
            if self.epoch < self.num_epochs and self._stop_requested():
                self.stopped_early = True  # the epoch's checkpoint is written
        throughput = timed_images / timed_seconds if timed_seconds else float("nan")
        if self.info.distributed:
            dist.barrier()
        return {
            "run_dir": str(self.run_dir),
            "task": self.task.name,
            "steps": self.step,
            "epochs_done": self.epoch,
            "finished": not self.stopped_early,
            "num_params": self.num_params,
            "train_img_per_s": throughput,
            "wall_s": time.perf_counter() - start,
            **self.last_eval,
        }

    def _stop_requested(self) -> bool:
        """Whether a stop signal reached this process or, under DDP, any rank: every rank gets
        the same answer at the same step. Notes the signal in :attr:`interrupted_by`."""
        received = self.stop_signals.received
        stop = received is not None
        if self.info.distributed:
            stop = all_reduce_sum([float(stop)], self.info)[0] > 0
        if stop:
            self.interrupted_by = received or signal.SIGTERM
        return stop

    def _end_epoch(self, show: bool) -> None:
        """Evaluate (and the EMA) when ``train.eval_every_epochs`` says so, advance the epoch,
        checkpoint."""
        self.epoch += 1
        self.step_in_epoch = 0
        last = self.epoch == self.num_epochs or self.step >= self.total_steps
        if last or self.epoch % self.config["train"]["eval_every_epochs"] == 0:
            metrics = self.task.evaluate(
                self.net,
                self.val_loader,
                self.info,
                self.amp_dtype,
                self.channels_last,
                progress=show,
            )
            record = {f"val_{k}": v for k, v in metrics.items()}
            if self.ema is not None:
                if self.info.distributed:
                    # Each rank's EMA averages its own BatchNorm statistics: evaluate rank 0's on
                    # every shard, the EMA that is saved (and that a continued run restores).
                    for buffer in self.ema.module.buffers():
                        dist.broadcast(buffer, src=0)
                ema = self.task.evaluate(
                    self.ema.module, self.val_loader, self.info, self.amp_dtype, self.channels_last
                )
                record.update({f"ema_val_{k}": v for k, v in ema.items()})
            self.last_eval = record
            self.log({"step": self.step, "epoch": self.epoch, **record})
            if show:
                text = ", ".join(f"{k} {v:.4g}" for k, v in record.items())
                write_line(f"epoch {self.epoch}: {text}")
        self.save()


def run_training(config: Config, options: RunOptions = RunOptions()) -> dict:
    """Train ``config`` in the run directory ``options`` give (see :class:`RunOptions`) and
    tear down the process group. Raises :class:`~involution.train.signals.TrainingInterrupted`
    after a stop signal.
    """
    trainer: Trainer | None = None
    try:
        trainer = Trainer(config, options)
        return trainer.fit()
    finally:
        # The trainer sits in reference cycles and its DDP wrapper holds the process group: free
        # them now, while the interpreter is whole. Left to interpreter shutdown, Gloo's worker
        # threads could abort the process ("terminate called without an active exception").
        del trainer
        gc.collect()
        if dist.is_initialized():
            dist.destroy_process_group()
