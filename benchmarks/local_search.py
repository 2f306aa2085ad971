"""Does the search find a local shortcut when the classifier reads nothing else? (stamp-alone of the suite)

On stamp-alone the biased classifier reads the watermark's glyph and hardly the faint texture, so the smallest edit
that flips it is a change of the glyph. Three measurements on that classifier:

- the ceiling: the same texture and noise under each of the three glyphs (same corner, same place); how often its
  prediction follows the glyph (1 = a glyph swap alone flips it every time);
- the first-order view the search starts from: the share of the input gradient (towards another class) inside
  the watermark's square, and its strength per pixel against the rest;
- (``--ceilings``) the first two for the biased classifier of each watermark dataset of the suite (stamp,
  stamp-partial, stamp-alone): how far a faithful explanation can be the watermark at all;
- the search (round-1 explain, attempt 1 and 2) with the library defaults and with search variants: validity,
  the median shortcut share of valid first attempts (change mass in the watermark square), the share within a
  margin of the square (``near``), the share of local first attempts (changed area below 0.3), evaluations.

    .venv/bin/python benchmarks/suite.py --only stamp-alone --tag 3r-alone    # first: the classifiers
    .venv/bin/python benchmarks/local_search.py [--only default window04]
    .venv/bin/python benchmarks/local_search.py --ceilings    # after a suite run with the defaults

Writes benchmarks/results/local_search.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import suite
import torch
from PIL import Image

from pipeline import confounded, manifest, models, quiet, runner
from pipeline.data import load_mask
from pipeline.regions import dilate

HERE = Path(__file__).resolve().parent
WORK = HERE.parent / "runs" / "suite"
NAME = "stamp-alone"
# tag -> explain.search overrides (every other setting the library default); the search variants were measured
# before donor windows were the default, so they name donors: 0 ("default" is the default before donor windows)
BEFORE_DONORS = {"donors": 0}
VARIANTS = {
    "default": BEFORE_DONORS,
    "tv0": {"tv": 0.0} | BEFORE_DONORS,
    "tv-edges": {"tv_edges": True} | BEFORE_DONORS,
    "l1x10": {"l1": 5.0} | BEFORE_DONORS,
    "l1x40": {"l1": 20.0} | BEFORE_DONORS,
    "windows2": {"windows": 2} | BEFORE_DONORS,
    "window04": {"windows": 1, "window": 0.4} | BEFORE_DONORS,
    "window04-tv0": {"windows": 1, "window": 0.4, "tv": 0.0} | BEFORE_DONORS,
    "donors4": {"donors": 4},
}


def net(run: Path):
    model, card = models.load(run / "classifier")
    return models.OnPixels(model, card).eval(), models.pixel_transform(card), card


@torch.no_grad()
def glyph_ceiling(run: Path, images: int = 90, seed: int = 5, name: str = NAME) -> float:
    """Share of (texture, glyph) renderings whose prediction is the glyph's class (1/3 = chance)."""
    model, transform, card = net(run)
    c = suite.CASES[name]
    c = confounded.StampConfig(n=c.n, **c.extra)
    rng, textures = np.random.default_rng(seed), confounded._textures()
    side = max(4, round(c.glyph * c.size))
    follows = []
    for i in range(images):
        label = i % len(confounded.TEXTURES)
        base = confounded._crop(textures[confounded.TEXTURES[label]], c.size, c.contrast, rng)
        corner, noise = int(rng.integers(4)), rng.normal(0, c.noise, base.shape)
        batch = []
        for mark in range(len(confounded.GLYPHS)):
            glyph = confounded._glyph(mark, c.size, side, corner, np.random.default_rng(i))
            image = base.copy()
            image[glyph] = (1 - c.opacity) * image[glyph] + c.opacity
            pixels = (np.clip(image + noise, 0, 1) * 255).round().astype(np.uint8)
            batch.append(transform(Image.fromarray(pixels)))
        predicted = model(torch.stack(batch)).argmax(1).tolist()
        follows += [p == card.classes.index(confounded.TEXTURES[k]) for k, p in enumerate(predicted)]
    return float(np.mean(follows))


def gradient_share(run: Path, data: Path, images: int = 48) -> dict:
    """Input-gradient mass of the log-odds towards the next class inside the watermark square."""
    model, transform, card = net(run)
    table = pd.read_csv(data / "metadata.csv")
    table = table[table.split == "train"].head(images)
    x = torch.stack([transform(Image.open(data / p).convert("RGB")) for p in table.path]).requires_grad_(True)
    box = torch.stack(
        [
            torch.from_numpy(load_mask(data / m, list(x.shape[-2:]), "pad")).float()
            for m in table.shortcut_mask
        ]
    )
    logits = model(x)
    own = logits.argmax(1)
    other = (own + 1) % logits.shape[1]
    (grad,) = torch.autograd.grad(
        (logits.gather(1, other[:, None]) - logits.gather(1, own[:, None])).sum(), x
    )
    mass = grad.abs().sum(1)
    inside = float((mass * box).sum() / mass.sum())
    area = float(box.mean())
    return {
        "inside": round(inside, 3),
        "area": round(area, 3),
        "per_pixel_ratio": round(inside / area / ((1 - inside) / (1 - area)), 2),
    }


def where(run: Path, data: Path, margin: float = 0.1) -> dict:
    """Of the valid first attempts: median share in the square and near it (``margin`` of the side), local share."""
    table = pd.read_csv(data / "metadata.csv", dtype=str, keep_default_na=False).set_index("path")
    folder = run / "explain"
    valid = manifest.flipped(manifest.read(folder / manifest.NAME))
    first = valid[valid.attempt.astype(int) == 1]
    inside, close = [], []
    for row, change in suite.changes(folder, first):
        box = load_mask(data / table.loc[row.source_path, "shortcut_mask"], list(change.shape), "pad")
        around = dilate(torch.from_numpy(box).float()[None, None], margin)[0, 0].numpy()
        inside.append((change * box).sum() / change.sum())
        close.append((change * around).sum() / change.sum())
    return {
        "shortcut_median_a1": round(float(np.median(inside)), 3),
        "near_median_a1": round(float(np.median(close)), 3),
        "local_a1": round(float((first.changed_area.astype(float) < 0.3).mean()), 3),
    }


def variant(tag: str, search: dict, base: Path) -> dict:
    """Round 1's explain with these search overrides, on the classifiers of the suite's stamp-alone run."""
    case, data = suite.CASES[NAME], WORK / "data" / NAME
    overrides = {f"explain.search.{k}": v for k, v in search.items()} | {"distil.enabled": False}
    config = suite.run_config(
        NAME, case, data, WORK / "data" / f"{NAME}-unconfounded", "mask", True, overrides
    )
    run_dir = WORK / f"{config.name}-search-{tag}"
    suite.seed_from(base, run_dir)  # the classifiers; an explain with other settings is redone
    runner.run(config, run_dir, log=lambda line: print(f"[{tag}]", line, flush=True))
    described = json.loads((run_dir / "metrics.json").read_text())["explain"]
    return {
        "search": search,
        "validity_by_attempt": described["validity_by_attempt"],
        "evaluations_per_counterfactual": round(described["evaluations_per_counterfactual"], 1),
        **where(run_dir, data),
    }


def ceilings() -> dict:
    """Per watermark dataset, on the biased classifier of the suite's default run: how often a glyph swap alone
    decides its prediction, and the input gradient's share in the watermark's square."""
    out = {}
    for name in ("stamp", "stamp-partial", "stamp-alone"):
        run = WORK / f"suite-{name}-mask"
        if not (run / "classifier" / models.CARD).is_file():
            print(f"error: {run} has no biased classifier; run benchmarks/suite.py first", file=sys.stderr)
            sys.exit(2)
        out[name] = {
            "glyph_swap_follows": round(glyph_ceiling(run, name=name), 3),
            "gradient": gradient_share(run, WORK / "data" / name),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=str(WORK / f"suite-{NAME}-mask-3r-alone"), help="the suite's run")
    parser.add_argument("--only", nargs="*", choices=list(VARIANTS), help="variants (default: all)")
    parser.add_argument(
        "--ceilings", action="store_true", help="glyph ceilings of the three watermark datasets"
    )
    args = parser.parse_args()
    quiet.configure(False)
    out = HERE / "results" / "local_search.json"
    results = json.loads(out.read_text()) if out.exists() else {}
    if args.ceilings:
        results["ceilings"] = ceilings()
        out.write_text(json.dumps(results, indent=2) + "\n")
        print(json.dumps(results["ceilings"], indent=2))
        return
    base, data = Path(args.base), WORK / "data" / NAME
    if not (base / "classifier" / models.CARD).is_file():
        print(
            f"error: {base} has no biased classifier; run benchmarks/suite.py --only {NAME} --tag 3r-alone",
            file=sys.stderr,
        )
        sys.exit(2)
    results["glyph_swap_follows"] = glyph_ceiling(base)
    results["gradient"] = gradient_share(base, data)
    results.setdefault("variants", {})
    for tag in args.only or list(VARIANTS):
        results["variants"][tag] = variant(tag, VARIANTS[tag], base)
        out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
