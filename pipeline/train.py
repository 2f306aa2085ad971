"""Train a classifier with Lightning (accelerator="auto"): the biased classifier, the reference, later CFKD.

The nn.Module (backbone) stays apart from the LightningModule (system), so everything downstream loads the
classifier from its safetensors checkpoint without Lightning.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torchmetrics
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, WeightedRandomSampler

from pipeline import models
from pipeline.config import ClassifierConfig
from pipeline.data import FolderData, ImageDataset, hw


class ClassifierSystem(L.LightningModule):
    def __init__(self, backbone: nn.Module, num_classes: int, lr: float = 1e-3, weight_decay: float = 0.0):
        super().__init__()
        self.save_hyperparameters(ignore=["backbone"])
        self.backbone = backbone
        self.train_acc = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)
        self.val_acc = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        logits = self(x)
        loss = nn.functional.cross_entropy(logits, y)  # y: class indices, or class probabilities per row
        self.train_acc(logits, y if y.dim() == 1 else y.argmax(1))
        self.log_dict(
            {"train_loss": loss, "train_acc": self.train_acc}, on_step=False, on_epoch=True, prog_bar=True
        )
        return loss

    def validation_step(self, batch, batch_idx):
        x, y, _ = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log_dict(
            {"val_loss": nn.functional.cross_entropy(logits, y), "val_acc": self.val_acc}, prog_bar=True
        )

    def predict_step(self, batch, batch_idx):
        return torch.softmax(self(batch[0]), dim=-1)

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, hp.lr, total_steps=self.trainer.estimated_stepping_batches
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class KeepBest(L.Callback):
    """Keep the backbone weights of the epoch with the best ``monitor`` value (``mode`` min or max). Global rank 0
    writes them to ``path`` (safetensors) with their epoch and score: under DDP the callback lives in the worker
    processes, so only a file comes back. Lightning's ModelCheckpoint would write pickled checkpoints of the
    whole system, and only the backbone is wanted."""

    def __init__(self, path: Path, monitor: str = "val_loss", mode: str = "min"):
        self.path, self.monitor, self.sign = Path(path), monitor, 1.0 if mode == "min" else -1.0
        self.path.unlink(missing_ok=True)  # a file left by an interrupted run competes with nothing

    def kept_score(self) -> float | None:
        if not self.path.is_file():
            return None
        with safe_open(self.path, "pt") as f:
            return float(f.metadata()["score"])

    def on_validation_end(self, trainer, pl_module):
        # not on_validation_epoch_end: Lightning reduces the epoch's logged metrics after that hook. The file is
        # the record to beat: a validate() before fit() runs in other worker processes under DDP
        value = trainer.callback_metrics.get(self.monitor)
        if trainer.sanity_checking or value is None or not trainer.is_global_zero:
            return
        kept = self.kept_score()
        if kept is not None and self.sign * float(value) >= self.sign * kept:
            return
        epoch = trainer.current_epoch if trainer.state.fn == TrainerFn.FITTING else -1  # -1: before training
        state = {k: v.detach().cpu().clone() for k, v in pl_module.backbone.state_dict().items()}
        save_file(state, self.path, metadata={"epoch": str(epoch), "score": str(float(value))})

    def restore(self, backbone: nn.Module) -> dict | None:
        """Load the kept weights into ``backbone`` and remove the file; their epoch and score, or None."""
        if not self.path.is_file():
            return None
        with safe_open(self.path, "pt") as f:
            kept = f.metadata()
        backbone.load_state_dict(load_file(self.path))
        self.path.unlink()
        return {"best_epoch": int(kept["epoch"]), "score": float(kept["score"])}


class EpochBar(TQDMProgressBar):
    """Lightning's bar without the nested validation bar (validation metrics still show on the epoch bar)."""

    def init_validation_tqdm(self):
        bar = super().init_validation_tqdm()
        bar.disable = True
        return bar


class CloseProcessGroup(L.Callback):
    """A spawned DDP worker leaves in step with the others and closes its process group first: a gloo group still
    open when the interpreter exits can abort the worker (SIGABRT, "terminate called without an active exception")
    after its work is done."""

    def teardown(self, trainer, pl_module, stage):
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


@dataclass
class TrainResult:
    card: models.ModelCard
    directory: Path


def _loader(dataset: ImageDataset, batch_size: int, shuffle: bool, balanced: bool = False) -> DataLoader:
    sampler = None
    if balanced:
        counts = np.bincount(dataset.targets)
        weights = 1.0 / counts[dataset.targets]
        sampler = WeightedRandomSampler(weights.tolist(), num_samples=len(dataset), replacement=True)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler)


def uses_gpu(accelerator: str) -> bool:
    """Whether Lightning will run on a CUDA GPU with this accelerator setting ("auto" picks one when present)."""
    return torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda")


def trainer_loggers(out: Path | None) -> list | bool:
    """CSV (read by the report) and TensorBoard logs in ``out/logs``; none without ``out``."""
    if out is None:
        return False
    return [CSVLogger(out, name="logs", version=""), TensorBoardLogger(out, name="logs", version="")]


def device_count(accelerator: str, devices: str | int | list) -> int:
    """How many devices Lightning will run on: an int (-1: all), a list or "0,1" of GPU ids, or auto (all GPUs
    with a GPU accelerator, else one)."""
    every = torch.cuda.device_count() if uses_gpu(accelerator) else 1
    if isinstance(devices, list):
        return len(devices)
    text = str(devices).strip()
    if text in ("auto", "-1"):
        return max(1, every)
    if text.isdigit():
        return int(text)
    return len([d for d in text.split(",") if d.strip()])


def make_trainer(
    out: Path | None = None,
    max_epochs: int = 1,
    accelerator: str = "auto",
    devices: str | int = 1,
    callbacks=(),
    verbose: bool = False,
    **options,
) -> L.Trainer:
    """The one Lightning Trainer of every stage: quiet, no pickled checkpoints, logs in ``out/logs`` when given,
    the epoch bar, DDP in spawned processes over several devices, deterministic kernels (same seed, same result on
    a GPU too: CUDA's fastest kernels add in a varying order); ``options`` pass straight to Lightning (strategy,
    precision, inference_mode, ...)."""
    if options.get("strategy", "auto") == "auto" and device_count(accelerator, devices) > 1:
        # spawned workers: a cfkd run is a sequence of stages, not a script Lightning's DDP could start again
        options["strategy"] = "ddp_spawn"
    if options.get("strategy") == "ddp_spawn":
        callbacks = [*callbacks, CloseProcessGroup()]
    settings = dict(
        max_epochs=max_epochs,
        accelerator=accelerator,
        devices=devices,
        logger=trainer_loggers(out),
        callbacks=[EpochBar(), *callbacks],
        enable_checkpointing=False,
        enable_model_summary=verbose,
        log_every_n_steps=5,
        num_sanity_val_steps=0,
        deterministic=True,
    )
    return L.Trainer(**(settings | options))


def run(
    data: FolderData,
    config: ClassifierConfig,
    image_size,
    out: Path,
    verbose: bool = False,
    resize: str = "pad",
) -> TrainResult:
    """Train ``config.arch`` on the train split (model selection on val) and write the checkpoint to ``out``."""
    L.seed_everything(config.seed, workers=True, verbose=False)
    card = models.ModelCard(
        arch=config.arch,
        classes=data.classes,
        image_size=list(hw(image_size)),
        channels=1 if data.grey else 3,  # greyscale stays greyscale: a 1-channel model
        mean=[0.5] * (1 if data.grey else 3),
        std=[0.5] * (1 if data.grey else 3),
        resize=resize,
        stem=models.own_stem(config.arch, image_size),
    )
    transform = models.input_transform(card)
    train_set = ImageDataset(data, "train", data.classes, transform)
    val_set = ImageDataset(data, "val", data.classes, transform)
    backbone = models.build(config.arch, len(data.classes), image_size, card.channels, card.stem)
    system = ClassifierSystem(backbone, len(data.classes), config.lr, config.weight_decay)
    keep = KeepBest(out / ".best.safetensors")
    started = time.perf_counter()
    fit = make_trainer(out, config.epochs, config.accelerator, config.devices, [keep], verbose)
    fit.fit(
        system, _loader(train_set, config.batch_size, True, config.balanced), _loader(val_set, 256, False)
    )
    kept = keep.restore(backbone)
    metrics = {k: round(float(v), 4) for k, v in fit.callback_metrics.items()}
    metrics.update(
        best_epoch=kept["best_epoch"] if kept else config.epochs - 1,
        epochs=config.epochs,
        seconds=round(time.perf_counter() - started, 1),
    )
    card = replace(card, metrics=metrics, data_hash=data.fingerprint("train"))
    models.save(backbone.eval(), card, out)
    return TrainResult(card, out)


def predict(
    model: nn.Module, dataset: ImageDataset, config: ClassifierConfig = ClassifierConfig()
) -> np.ndarray:
    """Class probabilities for every item of ``dataset`` (Lightning batched inference)."""
    system = ClassifierSystem(model, num_classes=len(dataset.classes))
    # one device: a short pass whose batches must all come back to this process
    batches = make_trainer(None, 1, config.accelerator, 1).predict(system, _loader(dataset, 256, False))
    return torch.cat(batches).float().numpy()
