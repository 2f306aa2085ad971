"""The distil stage: Counterfactual Knowledge Distillation (CFKD) of a round's verdicts into the classifier.

Training set as the method's authors build it: every counterfactual the teacher called *spurious* keeps its
source label ("that change must not flip you"); *true* ones take the target label when ``use_true`` is on;
*unsure* ones are ignored. The classifier is fine-tuned from its current weights on class-balanced batches that
mix original training images (fitted to their labels, or with ``originals: explained`` to the probabilities of the
classifier the round explained) and counterfactuals (``mix``; ``stretch`` and ``flip`` vary each draw), optionally
anchored to its starting weights or with only its last linear layer learning on frozen features (``layers: head``,
DFR-style), with model selection on the validation split plus counterfactuals of held-out source images.

Then the erase (``pipeline/erase.py``) removes what the spurious edits moved in the features from the head.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
import torchmetrics
from lightning.pytorch.callbacks import BaseFinetuning
from PIL import Image
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset, WeightedRandomSampler
from torchvision.transforms import v2

from pipeline import erase, feedback, manifest, models
from pipeline.config import DistilConfig
from pipeline.data import Counterfactuals, FolderData, ImageDataset, load_mask, read_rgb
from pipeline.errors import UserError
from pipeline.train import ClassifierSystem, KeepBest, make_trainer, predict, uses_gpu


def training_set(table: pd.DataFrame, consensus: pd.DataFrame, use_true: bool) -> pd.DataFrame:
    """One row per usable counterfactual of one manifest: id, sample, counterfactual and original (paths),
    verdict, label (class name). A spurious verdict is usable on any judged edit, flip or near-flip (the change
    must not move the decision); a true one only on a flip (a near-flip does not show the target class)."""
    verdicts = consensus.set_index("cf_id")["label"]
    table = table.assign(verdict=table["id"].map(verdicts))
    keep = table["verdict"].eq("spurious") | (use_true & table["verdict"].eq("true") & table["success"])
    table = table[keep]
    label = table["source_class"].where(table["verdict"] == "spurious", table["target_class"])
    columns = ["id", "sample", "source_path", "attempt", "counterfactual", "original", "verdict", "label"]
    table = table.assign(label=label)
    return table[[c for c in columns if c in table]].reset_index(drop=True)  # a hand-made table: no attempt


def training_data(run_dir: Path, taught: list[int], use_true: bool) -> pd.DataFrame:
    """The usable counterfactuals of the given rounds (verdicts.csv + manifest), paths relative to the run."""
    tables = []
    for r in taught:
        table = training_set(manifest.read_round(run_dir, r), feedback.read_verdicts(run_dir, r), use_true)
        folder = manifest.folder(r) + "/"
        tables.append(
            table.assign(
                counterfactual=folder + table["counterfactual"], original=folder + table["original"], round=r
            )
        )
    return pd.concat(tables, ignore_index=True)


def cast_verdicts(run_dir: Path, round: int, attempt: int) -> pd.Series:
    """The labels the teacher gave round ``round``'s edits of the colour-cast attempt ``attempt``."""
    table = manifest.read_round(run_dir, round)
    casts = set(table.loc[table["attempt"].astype(int) == attempt, "id"])
    verdicts = feedback.read_verdicts(run_dir, round)
    return verdicts.loc[verdicts["cf_id"].isin(casts), "label"]


def mostly_spurious(labels: pd.Series) -> bool:
    """More than half of the casts judged (true, spurious or unsure) were judged spurious: only then is a gain of
    the whole image a shortcut in this data, and not evidence or a change the teacher could not call."""
    return 2 * int(labels.eq("spurious").sum()) > len(labels)


def casts_are_shortcuts(run_dir: Path, taught: list[int], attempt: int) -> bool:
    """``mostly_spurious`` over the cast verdicts of the rounds ``taught``."""
    return mostly_spurious(pd.concat([cast_verdicts(run_dir, r, attempt) for r in taught]))


def taught_verdicts(
    run_dir: Path, taught: list[int], config: DistilConfig, cast_attempt: int | None = None
) -> pd.DataFrame:
    """``training_data`` of the rounds ``taught`` (true verdicts included), without the cast attempt's where
    ``cast_vote`` holds and the teacher did not judge most casts spurious."""
    labelled = training_data(run_dir, taught, use_true=True)
    if (
        config.cast_vote
        and cast_attempt
        and "attempt" in labelled
        and not casts_are_shortcuts(run_dir, taught, cast_attempt)
    ):
        labelled = labelled[labelled["attempt"].astype(int) != cast_attempt].reset_index(drop=True)
    return labelled


def off_mask(table: pd.DataFrame, data: FolderData) -> pd.DataFrame:
    """``table`` with a ``feature_mask`` column: the mask of each spurious row's source image (empty for true rows
    and images without one), the part of the edit that ``spurious_off_mask`` leaves out of training."""
    masks = (
        data.table.set_index("path")["feature_mask"] if "feature_mask" in data.table else pd.Series(dtype=str)
    )
    mask = table["source_path"].map(masks).fillna("") if "source_path" in table else ""
    return table.assign(
        feature_mask=pd.Series(mask, index=table.index).where(table["verdict"] == "spurious", "")
    )


def off_mask_parts(
    table: pd.DataFrame, run_dir: Path, data: FolderData, resize: str, folder: Path
) -> pd.DataFrame:
    """Each row with a ``feature_mask`` (``off_mask``) gets its edit's part off that mask (original + change outside
    it), written to ``folder``; the table points there. The mask is fitted to the image as the image was (``resize``)."""
    rows = table[table["feature_mask"].astype(bool)]
    if rows.empty:
        return table
    folder.mkdir(parents=True, exist_ok=True)
    paths = table["counterfactual"].astype(object).copy()
    for i, row in rows.iterrows():
        cf, original = (read_rgb(run_dir / p) for p in (row["counterfactual"], row["original"]))
        outside = ~load_mask(data.root / row["feature_mask"], list(cf.shape[:2]), resize)[..., None]
        part = np.clip(original + (cf - original) * outside, 0, 255).round().astype(np.uint8)
        Image.fromarray(part).save(folder / f"{row['id']}.png")
        paths[i] = str((folder / f"{row['id']}.png").resolve())
    return table.assign(counterfactual=paths)


def split_holdout(table: pd.DataFrame, share: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Hold out the counterfactuals of a share of the source images (never half of one image's attempts)."""
    samples = table["sample"].unique()
    n_out = int(round(share * len(samples)))
    if share > 0 and len(samples) >= 4:
        n_out = max(n_out, 1)
    held = set(np.random.default_rng(seed).permutation(samples)[:n_out])
    out = table["sample"].isin(held)
    return table[~out].reset_index(drop=True), table[out].reset_index(drop=True)


def stage(
    run_dir: Path,
    taught: list[int],
    start: Path,
    explained: Path,
    data: FolderData,
    config: DistilConfig,
    out: Path,
    verbose: bool = False,
    cast_attempt: int | None = None,
    resize: str = "pad",
) -> None:
    """The distil stage of round ``taught[-1]``: its training set from the verdicts of the rounds ``taught``,
    fine-tuning of the ``start`` classifier, or, when this round brought nothing new to teach, the ``explained``
    classifier unchanged. Counterfactuals are held out only where model selection uses them (keep: best).
    ``cast_attempt``: the attempt number of the colour-cast edits (explain.search.cast), for ``cast_vote``;
    ``resize``: how the data's images were fitted to the classifier (their feature masks follow)."""
    if config.layers == "staged":  # round 1 erases alone, later rounds fine-tune every layer
        config = replace(config, layers="none" if taught[-1] == 1 else "all")
    labelled = taught_verdicts(run_dir, taught, config, cast_attempt)
    if config.spurious_off_mask:
        labelled = off_mask(labelled, data)
    spurious = labelled["verdict"] == "spurious"
    table = labelled if config.use_true else labelled[spurious].reset_index(drop=True)
    share = config.holdout if config.keep == "best" else 0.0
    fit, held = split_holdout(table, share, config.seed + taught[-1])
    pd.concat([fit.assign(use="train"), held.assign(use="select")]).to_csv(
        out / "training_set.csv", index=False
    )
    if config.spurious_off_mask:  # train (and erase) on the parts; training_set.csv names the edits judged
        fit, held = (off_mask_parts(t, Path(run_dir), data, resize, out / "off_mask") for t in (fit, held))
    # Nothing new to teach (this round's counterfactuals were all judged true or unsure): the classifier goes on
    # unchanged; fitting again on earlier rounds' verdicts only overfits them.
    if fit.empty or not table["round"].eq(taught[-1]).any():
        classifier, card = models.load(explained)
        models.save(classifier, replace(card, metrics={"skipped": "no new usable verdicts"}), out)
    else:
        # erase spares what the counterfactuals judged true moved (the real evidence), except in the features of
        # the classifier the edits were searched on: there every flip moves along that classifier's decision
        # direction, true or spurious alike, so sharing it says nothing about what is evidence
        searched_on = config.layers == "none" and start == explained
        spare = config.erase and config.erase_spare and not searched_on
        true_edits = labelled[labelled["verdict"] == "true"]
        evidence = true_edits if spare else None
        soft_from = explained if config.originals == "explained" else None
        # only erase: verdicts searches its rank with both kinds of verdict holding
        keep_ranks = config.erase_ranks and config.erase == "verdicts"
        ranks = erase.searched_ranks(Path(run_dir), taught[:-1]) if keep_ranks else None
        run(
            start,
            data,
            fit,
            held,
            Path(run_dir),
            config,
            out,
            verbose,
            evidence,
            soft_from,
            true_edits,
            ranks,
        )


FLIPS = {
    "none": [],
    "horizontal": [v2.RandomHorizontalFlip()],
    "both": [v2.RandomHorizontalFlip(), v2.RandomVerticalFlip()],
}


def training_transform(card: models.ModelCard, flip: str, shift: float = 0.0) -> v2.Compose:
    """The classifier's own preprocessing, then the random flips ``distil.flip`` and shifts ``distil.shift`` ask
    for (training data only)."""
    pad = round(shift * min(np.atleast_1d(card.image_size)))
    shifts = [v2.RandomCrop(card.image_size, padding=pad, padding_mode="reflect")] if pad > 0 else []
    return v2.Compose([models.input_transform(card), *FLIPS[flip], *shifts])


def colour_limits(data: FolderData, card: models.ModelCard, n: int = 1000, seed: int = 0) -> np.ndarray:
    """(2, 3): the 1st and 99th percentile of real training images' per-channel means, 0-255, at the classifier's
    geometry (as counterfactuals are saved), from up to ``n`` of them."""
    images = ImageDataset(data, "train", card.classes, models.pixel_transform(card))
    rows = np.random.default_rng(seed).permutation(len(images))[:n]
    means = np.stack([((images[int(i)][0] + 1) * 127.5).mean((1, 2)).numpy() for i in rows])
    return np.percentile(means, [1, 99], axis=0)


class SoftTargets(Dataset):
    """A dataset whose items carry a class distribution instead of a class index: ``probabilities`` per item, or
    one-hot of its own targets. ``targets`` stay the class indices (the sampler balances classes by them)."""

    def __init__(self, dataset, classes: int, probabilities: np.ndarray | None = None):
        self.dataset, self.targets = dataset, dataset.targets
        if probabilities is None:
            probabilities = np.eye(classes, dtype=np.float32)[np.asarray(self.targets, int)]
        self.probabilities = torch.as_tensor(probabilities, dtype=torch.float32)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        x, _, index = self.dataset[i]
        return x, self.probabilities[i], index


def probabilities(checkpoint: Path, data: FolderData, classes: list[str]) -> np.ndarray:
    """The class probabilities the classifier at ``checkpoint`` gives each training image (as preprocessed for it)."""
    model, card = models.load(checkpoint)
    return predict(model.eval(), ImageDataset(data, "train", classes, models.input_transform(card)))


class DistilSystem(ClassifierSystem):
    """Fine-tuning with an optional L2 anchor; selects on mean(val accuracy, held-out counterfactual accuracy)."""

    def __init__(self, backbone: nn.Module, num_classes: int, config: DistilConfig, has_cf_val: bool):
        super().__init__(backbone, num_classes, config.lr, config.weight_decay)
        self.anchor, self.has_cf_val = config.anchor, has_cf_val
        self.start = [p.detach().clone() for p in backbone.parameters()]
        self.cf_acc = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if self.anchor > 0:
            drift = sum(
                ((p - s.to(p.device)) ** 2).sum() for p, s in zip(self.backbone.parameters(), self.start)
            )
            loss = loss + self.anchor * drift
        return loss

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        x, y, _ = batch
        metric = self.val_acc if dataloader_idx == 0 else self.cf_acc
        metric(self(x), y)

    def on_validation_epoch_end(self):
        val = self.val_acc.compute()
        cf = self.cf_acc.compute() if self.has_cf_val else val
        self.log_dict({"val_acc": val, "val_cf_acc": cf, "val_select": (val + cf) / 2}, prog_bar=True)
        self.val_acc.reset()
        self.cf_acc.reset()


class HeadOnly(BaseFinetuning):
    """layers: head (DFR's finding: the features already hold the real evidence; reweight them): only the last
    linear layer learns; the features stay the starting classifier's, batch-norm statistics included."""

    def __init__(self, head: str):
        super().__init__()
        self.head = head

    def freeze_before_training(self, pl_module):
        self.freeze(pl_module.backbone, train_bn=False)
        self.make_trainable(pl_module.backbone.get_submodule(self.head))

    def finetune_function(self, pl_module, epoch, optimizer):
        pass  # nothing is unfrozen later

    def on_train_epoch_start(self, trainer, pl_module):
        super().on_train_epoch_start(trainer, pl_module)
        pl_module.backbone.eval()
        pl_module.backbone.get_submodule(self.head).train()


def mixed_sampler(original: ImageDataset, cfs: Counterfactuals, mix: float, n: int, seed: int):
    """Weights over ConcatDataset([original, cfs]): a ``mix`` share of counterfactuals, classes balanced in each."""
    weights = []
    for part, share in ((original, 1 - mix), (cfs, mix)):
        targets = np.asarray(part.targets)
        counts = np.bincount(targets)
        present = (counts > 0).sum()
        weights.append(share / present / counts[targets] if len(targets) else np.zeros(0))
    return SeededSampler(np.concatenate(weights).tolist(), n, seed)


class SeededSampler(WeightedRandomSampler):
    """Weighted draws with replacement from a generator of its own, made on first use: a torch.Generator cannot
    travel to DDP's spawned workers, and every worker must draw the same sequence to take its share of."""

    def __init__(self, weights: list[float], num_samples: int, seed: int):
        super().__init__(weights, num_samples, replacement=True)
        self.seed = seed

    def __iter__(self):
        if self.generator is None:
            self.generator = torch.Generator().manual_seed(self.seed)
        return super().__iter__()

    def __getstate__(self):
        return self.__dict__ | {"generator": None}


def precision(config: DistilConfig) -> str:
    if config.precision != "auto":
        return config.precision
    return "bf16-mixed" if uses_gpu(config.accelerator) and torch.cuda.is_bf16_supported() else "32-true"


@dataclass
class DistilResult:
    card: models.ModelCard
    train_cfs: int
    val_cfs: int


def fine_tune_epochs(config: DistilConfig, counterfactuals: int, originals: int) -> int:
    """``distil.epochs``, or with ``passes`` the epochs (of ``originals`` draws) in which each counterfactual is
    drawn about that many times."""
    if config.passes <= 0:
        return config.epochs
    return max(1, round(config.passes * counterfactuals / (config.mix * originals)))


def fine_tune(
    backbone: nn.Module,
    card: models.ModelCard,
    data: FolderData,
    cf_train: pd.DataFrame,
    cf_val: pd.DataFrame,
    cf_folder: Path,
    config: DistilConfig,
    out: Path,
    verbose: bool = False,
    soft_from: Path | None = None,
) -> dict:
    """Fine-tune ``backbone`` in place on original training images mixed with the counterfactuals; its metrics.
    With ``soft_from`` (a checkpoint) the originals are fitted to its probabilities instead of their labels (the
    counterfactuals keep the labels their verdicts give)."""
    transform = models.input_transform(card)
    augmented = training_transform(card, config.flip, config.shift)
    original = ImageDataset(data, "train", card.classes, augmented)
    limits = colour_limits(data, card) if config.stretch_within and config.stretch > 1 else None
    cfs = Counterfactuals(cf_train, cf_folder, card.classes, augmented, config.stretch, limits)
    if soft_from is not None:
        classes = len(card.classes)
        original = SoftTargets(original, classes, probabilities(soft_from, data, card.classes))
        cfs = SoftTargets(cfs, classes)
    sampler = mixed_sampler(original, cfs, config.mix, len(original), config.seed)
    epochs = fine_tune_epochs(config, len(cfs), len(original))
    train_loader = DataLoader(ConcatDataset([original, cfs]), batch_size=config.batch_size, sampler=sampler)
    val_loaders = [DataLoader(ImageDataset(data, "val", card.classes, transform), batch_size=256)]
    if not cf_val.empty:
        val_loaders.append(
            DataLoader(Counterfactuals(cf_val, cf_folder, card.classes, transform), batch_size=256)
        )
    system = DistilSystem(backbone.train(), len(card.classes), config, len(val_loaders) > 1)
    keep = KeepBest(out / ".best.safetensors", "val_select", mode="max") if config.keep == "best" else None
    frozen = [HeadOnly(models.last_linear(backbone))] if config.layers == "head" else []
    fit = make_trainer(
        out,
        epochs,
        config.accelerator,
        config.devices,
        [*([keep] if keep else []), *frozen],
        verbose,
        strategy=config.strategy,
        precision=precision(config),
    )
    if keep:  # the starting weights compete in model selection (epoch -1)
        fit.validate(system, val_loaders, verbose=False)
    fit.fit(system, train_loader, val_loaders)
    metrics = {k: round(float(v), 4) for k, v in fit.callback_metrics.items() if k != "val_select"}
    kept = keep.restore(backbone) if keep else None
    if kept:
        metrics.update(best_epoch=kept["best_epoch"], selection_score=round(kept["score"], 4))
    originals = soft_from.name if soft_from is not None else "labels"  # what the originals were fitted to
    return metrics | {"kept": config.keep, "epochs": epochs, "originals": originals}


def run(
    checkpoint: Path,
    data: FolderData,
    cf_train: pd.DataFrame,
    cf_val: pd.DataFrame,
    cf_folder: Path,
    config: DistilConfig,
    out: Path,
    verbose: bool = False,
    evidence: pd.DataFrame | None = None,
    soft_from: Path | None = None,
    true_edits: pd.DataFrame | None = None,
    ranks: dict[int, int] | None = None,
) -> DistilResult:
    """Distil the verdicts into the classifier at ``checkpoint`` (fine-tune unless ``layers: none``, the originals
    fitted to the probabilities of the classifier at ``soft_from`` when given, then erase what the spurious edits
    moved, less what the ``evidence`` edits, judged true, moved); write the weights and card to ``out``.
    ``true_edits``: the counterfactuals judged true, which ``erase: verdicts`` keeps at their target; ``ranks``:
    {earlier round: the rank its erase searched}, erased again, whole, for that round's edits after a
    fine-tune."""
    if cf_train.empty:
        raise UserError("no counterfactual has a usable verdict in this round: nothing to distil")
    L.seed_everything(config.seed, workers=True, verbose=False)
    backbone, card = models.load(checkpoint)
    started = time.perf_counter()
    metrics = {}
    if config.layers != "none":
        metrics = fine_tune(
            backbone, card, data, cf_train, cf_val, cf_folder, config, out, verbose, soft_from
        )
    backbone = backbone.cpu().eval()
    k = erase.per_round(config, len(card.classes))
    if k > 0 and cf_train["verdict"].eq("spurious").any():
        # erase_ranks: an earlier round whose search needed several directions to hold gets them again here, whole
        # (that search already kept its true edits at their target)
        rank = {r: ranks.get(int(r), k) for r in cf_train["round"].unique()} if ranks else k
        whole = tuple(ranks or ())

        def directions_for(k: int | dict[int, int]):
            return erase.spurious_directions(
                backbone, card, cf_train, cf_folder, k, evidence, config.erase_vote, config.erase_clip, whole
            )

        # verdicts: the rank is searched only where nothing was fine-tuned; after a fine-tune 99 % of the edits'
        # feature change spans dozens of directions, so the search's cap no longer bounds it
        searched = config.erase == "hold" or (config.erase == "verdicts" and config.layers == "none")
        guard = true_edits if config.erase == "verdicts" else None
        if searched:
            directions, rank = erase.holding_directions(
                backbone, card, data, cf_train, cf_folder, directions_for, seed=config.seed, true_edits=guard
            )
            metrics.update(erased_rank=rank)
        else:
            directions = directions_for(rank)
        if len(directions):
            erase.project_out(backbone, card, data, directions, config.seed)
        metrics.update(erased_directions=len(directions))
    metrics.update(
        counterfactuals_train=len(cf_train),
        counterfactuals_val=len(cf_val),
        seconds=round(time.perf_counter() - started, 1),
    )
    new_card = replace(card, metrics=metrics, source=f"distilled:{checkpoint.name}")
    models.save(backbone, new_card, out)
    return DistilResult(new_card, len(cf_train), len(cf_val))
