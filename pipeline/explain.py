"""The explain stage: SCE-LITE-HQ counterfactuals for correctly classified images, every ordered (source, target)
class pair, N per pair, K attempts each; run as Lightning ``Trainer.predict`` (GPUs and devices by config).

Writes originals/, counterfactuals/, differences/ (PNG), manifest.csv (one row per attempt), desiderata.json
and one grid per class pair for the report.
"""

from __future__ import annotations

import copy
import hashlib
import shutil
import time
from pathlib import Path

import lightning as L
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from pipeline import cast, change_maps, desiderata, generator, manifest, models, surrogate  # noqa: E402
from pipeline.config import ExplainConfig, GeneratorConfig  # noqa: E402
from pipeline.counterfactual import Explainer  # noqa: E402
from pipeline.data import FolderData, ImageDataset, hw, load_mask  # noqa: E402
from pipeline.errors import UserError  # noqa: E402
from pipeline.patchprior import PatchPrior  # noqa: E402
from pipeline.rundir import write_json  # noqa: E402
from pipeline.train import make_trainer, predict, uses_gpu  # noqa: E402


def feature_mask(images: ImageDataset, row: int, size: tuple[int, int], resize: str) -> torch.Tensor | None:
    """A row's feature mask as a (1, H, W) float tensor fitted as its image is, or None where it has none."""
    rel = images.rows["feature_mask"][row] if "feature_mask" in images.rows else ""
    return torch.from_numpy(load_mask(images.root / rel, size, resize))[None].float() if rel else None


class Requests(Dataset):
    """(image in [-1, 1], target class, row in the split, feature mask or zeros, has-mask flag, request index)."""

    def __init__(self, images: ImageDataset, rows: list[int], targets: list[int], card: models.ModelCard):
        self.images, self.rows, self.targets = images, rows, targets
        self.size, self.resize = hw(card.image_size), card.resize

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        row = self.rows[i]
        x, _, _ = self.images[row]
        mask = feature_mask(self.images, row, self.size, self.resize)
        return {
            "x": x,
            "target": self.targets[i],
            "row": row,
            "mask": torch.zeros(1, *self.size) if mask is None else mask,
            "has_mask": mask is not None,
            "index": i,
        }


class ExplainSystem(L.LightningModule):
    """The search as a predict step. Each process (one per device under DDP) writes its share of the results to
    ``parts/rank-<r>.pt`` at the end; the stage reads every part, so no result is lost or counted twice."""

    def __init__(self, explainer: Explainer, seed: int, parts: Path, grey: bool = False):
        super().__init__()
        self.explainer, self.seed, self.parts, self.grey = explainer, seed, Path(parts), grey
        self.results: list[dict] = []

    def predict_step(self, batch, batch_idx):
        with torch.enable_grad():  # Trainer.predict runs without autograd; the search needs it
            attempts = self.explainer(batch["x"], batch["target"], seed=self.seed + batch_idx)
        if self.grey:  # greyscale data: the counterfactual is what the classifier saw, the channel mean
            for a in attempts:
                a["x_cf"] = a["x_cf"].mean(1, keepdim=True).expand_as(a["x_cf"]).contiguous()
        n = len(batch["x"])
        self.results.append(
            {
                "batch": {k: v.cpu() if torch.is_tensor(v) else v for k, v in batch.items()},
                # a batch-wide number (seconds) becomes a per-image share
                "attempts": [
                    {k: v.cpu() if torch.is_tensor(v) else torch.full((n,), v / n) for k, v in a.items()}
                    for a in attempts
                ],
            }
        )

    def on_predict_epoch_end(self):
        self.parts.mkdir(parents=True, exist_ok=True)
        torch.save(self.results, self.parts / f"rank-{self.global_rank}.pt")


def gathered(parts: Path) -> list[dict]:
    """Every process's batches, in request order."""
    batches = [b for path in sorted(parts.glob("rank-*.pt")) for b in torch.load(path, weights_only=True)]
    return sorted(batches, key=lambda b: int(b["batch"]["index"][0]))


# On the CPU a search batch holds at most this many pixels (32 images at 64 px, 2 at 256 px): larger batches fall
# out of the cache and every image gets slower (256 px: 0.34 s per image and step at batch 8, 0.26 s at batch 2)
CPU_BATCH_PIXELS = 32 * 64 * 64


def batch_size(config: ExplainConfig, image_size) -> int:
    """explain.batch_size, capped on the CPU to CPU_BATCH_PIXELS (GPUs take the whole batch)."""
    if uses_gpu(config.accelerator):
        return config.batch_size
    height, width = hw(image_size)
    return max(1, min(config.batch_size, CPU_BATCH_PIXELS // (height * width)))


def select(probs: np.ndarray, targets: list[int], per_pair: int, seed: int) -> tuple[list[int], list[int]]:
    """Rows the classifier gets right, per_pair of them for every ordered (source, target) pair."""
    rng = np.random.default_rng(seed)
    pred, n_classes = probs.argmax(1), probs.shape[1]
    rows, goals = [], []
    for source in range(n_classes):
        correct = np.flatnonzero((pred == source) & (np.asarray(targets) == source))
        for target in range(n_classes):
            if target != source and len(correct):
                chosen = np.sort(rng.choice(correct, min(per_pair, len(correct)), replace=False))
                rows += chosen.tolist()
                goals += [target] * len(chosen)
    return rows, goals


def heatmap(delta: torch.Tensor) -> Image.Image:
    """Signed change (mean over channels) as a red (brighter) / blue (darker) image, fixed scale [-1, 1]."""
    signed = delta.mean(0).clamp(-1, 1).numpy()
    return Image.fromarray((plt.get_cmap("RdBu_r")((signed + 1) / 2)[..., :3] * 255).astype(np.uint8))


def pixels(x: torch.Tensor, grey: bool = False) -> np.ndarray:
    """A [-1, 1] image as the uint8 array written to PNG (one channel for greyscale data)."""
    array = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return array[..., 0] if grey else array


def build_explainer(classifier, card, data, config: ExplainConfig, gen: GeneratorConfig, verbose=False):
    codec = generator.load(gen.source, gen.subfolder)
    model = models.OnPixels(classifier, card, data.grey)
    smooth, agreement = None, None
    train = ImageDataset(data, "train", card.classes, models.pixel_transform(card))
    if config.surrogate:
        smooth, agreement = surrogate.distil(model, train, config.surrogate_epochs, config.accelerator)
    denoiser = generator.load_denoiser(gen.unet) if gen.unet else None
    s, classes = config.search, range(len(card.classes))
    needs_reals = s.prototype > 0 or s.needs_prior or s.donors > 0 or s.casts
    reals = {t: class_images(train, t) for t in classes} if needs_reals else {}
    codes = {}
    if s.prototype > 0 or s.donors > 0:
        codes = {
            t: remembered("codes", reals[t], codec, lambda t=t: real_codes(codec, reals[t])) for t in classes
        }
    prototypes = codes if s.prototype > 0 else None
    # the patch prior and the colour basis are unlabelled: images of every class together
    every = torch.cat(list(reals.values())) if s.needs_prior or s.casts else None
    prior = None
    if s.needs_prior:
        prior = remembered("prior", every, config.seed, lambda: PatchPrior.fit(every, seed=config.seed))
    bank = None
    if s.donors > 0:
        masks = {t: class_masks(train, t, card) if s.leave_evidence else None for t in classes}
        bank = {t: donor_bank(model, reals[t], codes[t], t, s.goal, masks[t]) for t in classes}
    colours = cast.colour_basis(every) if s.casts else None
    explainer = Explainer(codec, model, config.search, smooth, denoiser, prototypes, prior, bank, colours)
    return explainer, agreement


# what a later explain stage of the same process would compute again from the same inputs (the real images'
# latent codes; the patch prior of the same seed, as another teacher's run of the same round fits it): neither
# depends on the classifier, so each is kept by a digest of its inputs
_REMEMBERED: dict[tuple, object] = {}


def remembered(kind: str, images: torch.Tensor, owner, make):
    """``make()``, or a copy of what it returned for the same images and the same ``owner`` (a seed, a codec: its
    weights' digest) earlier in this process. Only the last few results are kept."""
    digest = hashlib.sha256(images.contiguous().numpy().tobytes())
    if isinstance(owner, torch.nn.Module):
        for tensor in owner.state_dict().values():
            digest.update(tensor.contiguous().cpu().numpy().tobytes())
    else:
        digest.update(repr(owner).encode())
    key = (kind, digest.hexdigest())
    if key not in _REMEMBERED:
        while len(_REMEMBERED) >= 8:
            _REMEMBERED.pop(next(iter(_REMEMBERED)))
        _REMEMBERED[key] = make()
    return copy.deepcopy(_REMEMBERED[key])


@torch.no_grad()
def donor_bank(
    model,
    images: torch.Tensor,
    codes: torch.Tensor,
    target: int,
    goal: float,
    masks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """The real images of one class the classifier assigns to it at the goal probability (all of them if none is
    that sure), their pooled latent codes (``codes``: of every image) and, if given, their feature masks: where a
    donor window (pipeline/donors.py) comes from."""
    p = torch.cat([torch.softmax(model(part), -1)[:, target] for part in images.split(128)])
    sure = p >= goal if bool((p >= goal).any()) else torch.ones_like(p, dtype=torch.bool)
    return (images[sure], codes[sure]) + (() if masks is None else (masks[sure],))


def class_rows(images: ImageDataset, target: int, limit: int = 400) -> list[int]:
    """The first ``limit`` rows of one class in a split."""
    return [i for i, t in enumerate(images.targets) if t == target][:limit]


def class_images(images: ImageDataset, target: int, limit: int = 400) -> torch.Tensor:
    """Up to ``limit`` real images of one class, stacked: the reference set for realism and prototypes."""
    return torch.stack([images[i][0] for i in class_rows(images, target, limit)])


def class_masks(images: ImageDataset, target: int, card: models.ModelCard, limit: int = 400) -> torch.Tensor:
    """The feature masks of ``class_images``' images as (N, 1, H, W) floats, fitted as the images are; empty
    (zeros) where an image has none."""
    size, masks = hw(card.image_size), []
    for i in class_rows(images, target, limit):
        mask = feature_mask(images, i, size, card.resize)
        masks.append(torch.zeros(1, *size) if mask is None else mask)
    return torch.stack(masks)


def real_codes(codec, images: torch.Tensor, batch: int = 128) -> torch.Tensor:
    """Pooled latent codes of real images."""
    with torch.no_grad():
        return torch.cat(
            [generator.pooled(codec.encode(images[j : j + batch])) for j in range(0, len(images), batch)]
        )


def run(
    checkpoint: Path,
    data: FolderData,
    config: ExplainConfig,
    gen: GeneratorConfig,
    out: Path,
    verbose: bool = False,
) -> dict:
    L.seed_everything(
        config.seed, verbose=False
    )  # surrogate distillation, noise: same seed, same counterfactuals
    classifier, card = models.load(checkpoint)
    images = ImageDataset(data, config.split, card.classes, models.pixel_transform(card))
    if len(images) == 0:
        raise UserError(f"dataset {data.root} has no '{config.split}' images to explain (explain.split)")
    probs = predict(models.OnPixels(classifier, card, data.grey), images)
    rows, targets = select(probs, images.targets, config.per_pair, config.seed)
    if not rows:
        raise UserError(f"the classifier gets no '{config.split}' image right: nothing to explain")
    explainer, agreement = build_explainer(classifier, card, data, config, gen, verbose)
    requests = Requests(images, rows, targets, card)
    trainer = make_trainer(accelerator=config.accelerator, devices=config.devices, inference_mode=False)
    started = time.perf_counter()
    parts = out / ".parts"
    per_batch = batch_size(config, card.image_size)
    trainer.predict(
        ExplainSystem(explainer, config.seed, parts, data.grey),
        DataLoader(requests, batch_size=per_batch),
        return_predictions=False,
    )
    seconds = time.perf_counter() - started
    outputs = gathered(parts)
    shutil.rmtree(parts)
    table = write_outputs(outputs, images, card, explainer, data, out, per_batch)
    summary = desiderata.summarise(table)
    summary.update(
        surrogate_agreement=agreement,
        wall_seconds=round(seconds, 1),
        counterfactuals_per_second=len(table) / seconds,
        processes=trainer.world_size,
        explained=checkpoint.name,  # the classifier's folder (in a run: classifier, distil_r<N>)
        settings=config.search.__dict__,
    )
    summary.update(attempt_diversity(outputs))
    write_json(out / "desiderata.json", summary)
    for (source, target), group in table.groupby(["source_class", "target_class"]):
        grid(group, out, out / f"grid_{card.classes.index(source)}_to_{card.classes.index(target)}.png")
    return summary


def attempt_diversity(outputs) -> dict:
    xs = torch.cat([o["batch"]["x"] for o in outputs])
    k = len(outputs[0]["attempts"])
    attempts = [torch.cat([o["attempts"][a]["x_cf"] for o in outputs]) for a in range(k)]
    masks = [torch.cat([o["attempts"][a]["mask"] for o in outputs]) for a in range(k)]
    return {"diversity": desiderata.diversity(xs, attempts, masks)}


def source_probability(
    explainer: Explainer, images: ImageDataset, rows, *xs: torch.Tensor
) -> list[torch.Tensor]:
    """p(source class) of each batch of images, on the explainer's device (the card shows it before -> after)."""
    device = next(explainer.classifier.parameters()).device
    source = torch.tensor(images.targets)[rows.cpu()].to(device)
    return [explainer.p_class(x.to(device), source).cpu() for x in xs]


def write_outputs(
    outputs, images: ImageDataset, card, explainer: Explainer, data: FolderData, out: Path, per_batch: int
) -> pd.DataFrame:
    """PNGs and the manifest, its rows in one order whatever the device count: one device's batches of
    ``per_batch`` requests, each batch attempt by attempt."""
    for folder in ("originals", "counterfactuals", "differences"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    split = images.rows["split"][0]
    train = ImageDataset(data, "train", card.classes, models.pixel_transform(card))
    real = {t: desiderata.thumbnails(class_images(train, t)) for t in range(len(card.classes))}
    records = []
    for output in outputs:
        batch = output["batch"]
        for k, attempt in enumerate(output["attempts"], start=1):
            masks = batch["mask"] if batch["has_mask"].any() else None
            stats = desiderata.per_counterfactual(batch["x"], attempt["x_cf"], masks)
            feats = desiderata.thumbnails(attempt["x_cf"])
            p_source = source_probability(explainer, images, batch["row"], batch["x"], attempt["x_cf"])
            progress = manifest.progress(
                attempt["p_before"].cpu().numpy(), attempt["p_after"].cpu().numpy(), explainer.settings.goal
            )
            progress[attempt["success"].cpu().numpy()] = 1.0
            for i, row in enumerate(batch["row"].tolist()):
                target, request = int(batch["target"][i]), int(batch["index"][i])
                sample = manifest.sample_id(split, row)
                before, after = pixels(batch["x"][i], data.grey), pixels(attempt["x_cf"][i], data.grey)
                cf_id = manifest.counterfactual_id(sample, target, k, before, after)
                original = f"originals/{sample}.png"
                Image.fromarray(before).save(out / original)
                Image.fromarray(after).save(out / f"counterfactuals/{cf_id}.png")
                heatmap(attempt["x_cf"][i] - batch["x"][i]).save(out / f"differences/{cf_id}.png")
                has_mask = masks is not None and bool(batch["has_mask"][i])
                records.append(
                    {
                        "order": (request // per_batch, k, request),
                        "id": cf_id,
                        "sample": sample,
                        "source_path": images.rows["path"][row],
                        "original": original,
                        "counterfactual": f"counterfactuals/{cf_id}.png",
                        "difference": f"differences/{cf_id}.png",
                        "split": split,
                        "label": images.rows["label"][row],
                        "source_class": card.classes[images.targets[row]],
                        "target_class": card.classes[target],
                        "attempt": k,
                        "p_source_before": float(p_source[0][i]),
                        "p_source_after": float(p_source[1][i]),
                        "p_target_before": float(attempt["p_before"][i]),
                        "p_target_after": float(attempt["p_after"][i]),
                        "success": bool(attempt["success"][i]),
                        "progress": float(progress[i]),
                        "l1": float(stats["l1"][i]),
                        "l2": float(stats["l2"][i]),
                        "changed_area": float(stats["changed_area"][i]),
                        "feature_share": float(stats["feature_share"][i]) if has_mask else np.nan,
                        "feature_density": float(stats["feature_density"][i]) if has_mask else np.nan,
                        "realism": float(desiderata.realism(feats[i : i + 1], real[target])[0]),
                        "steps": int(attempt["steps"][i]),
                        "no_room": bool(attempt["no_room"][i]),
                        "evaluations": int(attempt["evaluations"][i]),
                        "seconds": float(attempt["seconds"][i]),
                    }
                )
    return manifest.write(sorted(records, key=lambda r: r["order"]), out / manifest.NAME)


def grid(group: pd.DataFrame, out: Path, path: Path, samples: int = 6) -> None:
    """original | attempt 1..K | brightness change 1..K | colour change 1..K, one row per sample: the panels laid
    into one picture drawn once (a subplot per panel costs seconds per grid)."""
    k = int(group["attempt"].max())
    rows, titles = [], []
    for sample in list(dict.fromkeys(group["sample"]))[:samples]:
        attempts = group[group["sample"] == sample].sort_values("attempt")
        names = [attempts.iloc[0]["original"], *attempts["counterfactual"], *attempts["difference"]]
        pictures = [change_maps.read(out / rel) for rel in names]
        pictures += [change_maps.colour_change(pictures[0], cf) for cf in pictures[1 : 1 + len(attempts)]]
        rows.append(pictures)
        titles.append(
            ["original"]
            + [
                f"a{r.attempt} p={r.p_target_after:.2f}{'' if r.success else ' x'}"
                for r in attempts.itertuples()
            ]
            + [f"change a{r.attempt}" for r in attempts.itertuples()]
            + [f"colour a{r.attempt}" for r in attempts.itertuples()]
        )
    h, w = rows[0][0].shape[:2]
    gap_x, gap_y = max(2, w // 8), max(10, h // 3)  # room between panels and for each panel's title
    columns = 1 + 3 * k
    mosaic = np.full((len(rows) * (h + gap_y), columns * (w + gap_x), 3), 255, np.uint8)
    fig = plt.figure(figsize=(columns * 1.3, len(rows) * 1.4 + 0.3))
    ax = fig.add_axes((0, 0, 1, 1 - 0.3 / (len(rows) * 1.4 + 0.3)))
    for i, (pictures, names) in enumerate(zip(rows, titles)):
        for j, (picture, title) in enumerate(zip(pictures, names)):
            top, left = i * (h + gap_y) + gap_y, j * (w + gap_x)
            mosaic[top : top + h, left : left + w] = picture
            ax.text(left + w / 2, top - 2, title, fontsize=7, ha="center", va="bottom")
    ax.imshow(mosaic, interpolation="nearest")
    ax.axis("off")
    first = group.iloc[0]
    fig.suptitle(f"{first['source_class']} -> {first['target_class']}", fontsize=9)
    fig.savefig(path, dpi=80)
    plt.close(fig)
