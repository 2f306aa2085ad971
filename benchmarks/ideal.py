"""What generalises a verdict: the distil stage given *ideal* spurious counterfactuals on the suite's datasets.

An ideal counterfactual of a training image swaps the shortcut and changes nothing else, labelled with the source
class ("this change must not flip you"). On the local-shortcut datasets it takes the shortcut region (the
generator's ``shortcut_mask``, its own and a donor's) from a training image of another class; on stain, whose
shortcut is a global colour cast, it divides the image by its scanner's nominal channel gains and multiplies it by
the other scanner's. Distillation then runs with the library's defaults from the suite's biased classifier, so the
only question left is whether the verdict reaches the images it was not given on. Needs the suite's runs
(benchmarks/suite.py leaves runs/suite/suite-NAME-mask[-TAG]).

    .venv/bin/python benchmarks/ideal.py [--only shapes stamp stain] [--sizes 32 96] [--tag 3r-today] [--epochs 12]

Writes benchmarks/results/ideal.json (the datasets measured; the others' figures stay).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from distil_replay import changed_distil
from distil_replay import settings as distil_changes
from PIL import Image

from pipeline import config, distil, models, quiet
from pipeline.confounded import CASTS, StainConfig
from pipeline.data import load_folder, load_mask
from pipeline.evaluate import evaluate

HERE = Path(__file__).resolve().parent
# shortcut regions of a few per cent of the image
LOCAL = ("shapes", "stamp", "stamp-partial", "stamp-alone", "ruler")
GLOBAL = ("stain",)  # a colour cast over the whole image


def pixels(path: Path, card: models.ModelCard) -> np.ndarray:
    """An image at the classifier's geometry as (H, W, 3) on the 0-255 scale."""
    with Image.open(path) as image:
        x = models.pixel_transform(card)(image)
    return ((x.permute(1, 2, 0).numpy() + 1) * 127.5).astype(np.float32)


def region_swap(data, card: models.ModelCard, row, donor) -> tuple[np.ndarray, np.ndarray]:
    """The original and its shortcut region (its own and the donor's) taken from the donor. A region over a third
    of the image marks where a shortcut could lie in an image without one (ruler's edge band), not where one is."""
    masks = [load_mask(data.root / r.shortcut_mask, card.image_size, card.resize) for r in (row, donor)]
    region = np.any([m for m in masks if m.mean() < 1 / 3] or [np.zeros_like(masks[0])], axis=0)
    x, cf = pixels(data.root / row.path, card), pixels(data.root / row.path, card)
    cf[region] = pixels(data.root / donor.path, card)[region]
    return x, cf


def cast_swap(data, card: models.ModelCard, row, donor) -> tuple[np.ndarray, np.ndarray]:
    """The original and the same tile under the other scanner's cast (the generator's nominal gains; each image's
    own gain varied by up to 20 % around them, so a little of the old cast may stay)."""
    gains = {
        name: 1 + sign * StainConfig.cast * np.array([1.0, 0.0, -1.0], np.float32)
        for name, sign in zip(CASTS, (1, -1), strict=True)
    }
    other = next(name for name in CASTS if name != row.group)
    x = pixels(data.root / row.path, card)
    return x, x / gains[row.group] * gains[other]


def ideal(
    data, card: models.ModelCard, n: int, folder: Path, edit=region_swap, seed: int = 0
) -> pd.DataFrame:
    """n ideal spurious counterfactuals of training images, an equal share per class."""
    rng = np.random.default_rng(seed)
    train = data.split("train")
    per_class = -(-n // len(data.classes))
    picks = pd.concat(
        [train[train.label.astype(str) == c].sample(per_class, random_state=seed) for c in data.classes]
    ).head(n)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for row in picks.itertuples():
        others = train[train.label.astype(str) != str(row.label)]
        donor = others.iloc[int(rng.integers(len(others)))]
        x, cf = edit(data, card, row, donor)
        cf_id = f"train-{row.Index:05d}-ideal"
        for name, image in ((f"{cf_id}.png", cf), (f"{cf_id}-original.png", x)):
            Image.fromarray(np.clip(image, 0, 255).round().astype(np.uint8)).save(folder / name)
        rows.append(
            {
                "id": cf_id,
                "sample": f"train-{row.Index:05d}",
                "counterfactual": f"{cf_id}.png",
                "original": f"{cf_id}-original.png",
                "verdict": "spurious",
                "label": str(row.label),
            }
        )
    return pd.DataFrame(rows)


def flip_rate(model, card: models.ModelCard, table: pd.DataFrame, folder: Path) -> float:
    """Share of ideal counterfactuals the biased classifier no longer assigns to their source class."""
    transform = models.input_transform(card)
    with torch.no_grad():
        x = torch.stack([transform(Image.open(folder / p).convert("RGB")) for p in table["counterfactual"]])
        predicted = model(x).argmax(-1).numpy()
    source = np.array([card.classes.index(label) for label in table["label"]])
    return round(float(np.mean(predicted != source)), 3)


def measure(run: Path, sizes: list[int], changes: dict, edit=region_swap) -> dict:
    settings = config.load(run / "config.yaml")
    if changes:  # distil settings other than the run's own (a longer fine-tune, no stretch, ...)
        settings = dataclasses.replace(settings, distil=changed_distil(settings, changes))
    data = load_folder(settings.data.root)
    model, card = models.load(run / "classifier")
    before, _ = evaluate(model, card, data)
    settings = settings.distil
    out = {
        "before": {k: round(before[k], 4) for k in ("accuracy", "worst_group_accuracy")},
        "shortcut_pixels": None,
        "distil": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for n in sizes:
            table = ideal(data, card, n, tmp / str(n), edit)
            out["distil"][f"n{n}_biased_flip_rate"] = flip_rate(model.eval(), card, table, tmp / str(n))
            fit, held = distil.split_holdout(table, settings.holdout, settings.seed)
            target = tmp / f"m-{n}"
            distil.run(run / "classifier", data, fit, held, tmp / str(n), settings, target)
            after, _ = evaluate(*models.load(target), data)
            out["distil"][f"n{n}"] = {
                "accuracy": round(after["accuracy"], 4),
                "worst_group_accuracy": round(after["worst_group_accuracy"], 4),
            }
            print(run.name, n, out["distil"][f"n{n}"], flush=True)
    masks = [
        load_mask(data.root / p, card.image_size, card.resize).mean()
        for p in data.split("train").shortcut_mask[:64]
    ]
    out["shortcut_pixels"] = round(float(np.mean(masks)), 4)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", default=[*LOCAL, *GLOBAL], choices=[*LOCAL, *GLOBAL])
    parser.add_argument("--sizes", nargs="+", type=int, default=[32, 96])
    parser.add_argument("--suite", default="runs/suite")
    parser.add_argument("--tag", default="", help="the suite runs' tag (runs/suite/suite-NAME-mask-TAG)")
    parser.add_argument(
        "--epochs", type=int, help="fine-tune epochs (default: the run's); writes ideal-eN.json"
    )
    parser.add_argument(
        "--distil", default="", help="other distil settings, KEY=VALUE,...; with --out NAME writes NAME.json"
    )
    parser.add_argument("--out", help="results file name, without .json")
    args = parser.parse_args()
    quiet.configure(verbose=False)
    changes = distil_changes(args.distil) | ({"epochs": args.epochs} if args.epochs else {})
    stem = args.out or (f"ideal-e{args.epochs}" if args.epochs else "ideal")
    path = HERE / "results" / f"{stem}.json"
    result = {"benchmark": "distillation from ideal spurious counterfactuals", "datasets": {}}
    if path.exists():  # other datasets' figures stay
        result["datasets"] = json.loads(path.read_text())["datasets"]
    for name in args.only:
        run = Path(args.suite) / (f"suite-{name}-mask-{args.tag}" if args.tag else f"suite-{name}-mask")
        if not (run / "classifier" / "model.safetensors").exists():
            print(
                f"error: {run} has no biased classifier; run benchmarks/suite.py --only {name} first",
                file=sys.stderr,
            )
            sys.exit(2)
        edit = cast_swap if name in GLOBAL else region_swap
        result["datasets"][name] = measure(run, args.sizes, changes, edit)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
