"""Why the first attempt misses a shortcut of presence: how sure the biased classifier is of a real mark, and what
the donor windows paste.

For a finished suite run: (1) the biased classifier's probability of the class the shortcut points to, on the test
images of every (label, group) cell (quantiles): where a real mark leaves it short of ``explain.search.goal``, the
smallest *valid* edit cannot be the mark alone; (2) on training images of every class but that one, the best donor
paste the explain stage would try (`pipeline/donors.py`, the run's own settings and with other window sizes): its
target probability, share of the way to the goal, whether it flips, and the pasted window's area.

    .venv/bin/python benchmarks/presence_probe.py runs/suite/suite-ruler-mask-ruler --target irregular

Writes benchmarks/results/presence-probe.json (or --out).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline import config as cfg
from pipeline import donors, models, quiet
from pipeline.counterfactual import way
from pipeline.data import load_folder
from pipeline.explain import build_explainer

HERE = Path(__file__).resolve().parent
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


def images(data, rows, transform) -> torch.Tensor:
    return torch.stack([transform(Image.open(data.root / p).convert("RGB")) for p in rows["path"]])


@torch.no_grad()
def cell_confidence(model, card, data, target: int) -> dict:
    """Per test cell (label / group), quantiles of the biased classifier's probability of ``target``."""
    test, out = data.split("test"), {}
    for (label, group), rows in test.groupby(["label", "group"]):
        p = torch.softmax(model(images(data, rows, models.input_transform(card))), -1)[:, target].numpy()
        out[f"{label} / {group}"] = [round(float(q), 3) for q in np.quantile(p, QUANTILES)]
    return out


def pastes(explainer, x: torch.Tensor, target: int, goal: float) -> dict:
    """The donor search's chosen paste per image: target probability, share of the way, flips, area."""
    found = donors.search(explainer, x, torch.full((len(x),), target))
    area = ((found["x_cf"] - x).abs().sum(1) > 0).flatten(1).float().mean(1)
    return {
        "p_target": [round(float(v), 3) for v in found["p_after"]],
        "way": [round(float(v), 3) for v in way(found, goal)],
        "flips": int(found["success"].sum()),
        "area_median": round(float(area.median()), 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--target", required=True, help="the class the shortcut points to")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--windows", nargs="*", type=float, default=[0.375])
    parser.add_argument("--out", default=str(HERE / "results" / "presence-probe.json"))
    args = parser.parse_args()
    quiet.configure()
    config = cfg.load(args.run / "config.yaml")
    data = load_folder(config.data.root)
    model, card = models.load(args.run / "classifier")
    model.eval()
    target = card.classes.index(args.target)
    explainer, _ = build_explainer(model, card, data, config.explain, config.generator)
    train = data.split("train")
    rows = train[train["label"].astype(str) != args.target].head(args.images)
    x = images(data, rows, models.pixel_transform(card))
    search = config.explain.search
    result = {
        "run": args.run.name,
        "target": args.target,
        "goal": search.goal,
        "test_p_target_quantiles": {
            "quantiles": list(QUANTILES),
            **cell_confidence(model, card, data, target),
        },
        "pastes": {str(search.window): pastes(explainer, x, target, search.goal)},
    }
    for window in args.windows:
        explainer.settings = dataclasses.replace(search, window=window)
        result["pastes"][str(window)] = pastes(explainer, x, target, search.goal)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
