"""Where do the counterfactuals of each explain-benchmark variant change the image? Recomputed from the saved
images and the dataset's feature masks with the density criterion (mean |change| on the feature over mean
|change| elsewhere > 1), without rerunning the search.

It also measures the ceiling any explainer faces: ground-truth interventions on correctly classified validation
images (the red square set to the other class's extreme, or the background brightness mirrored, noise kept) and
how often each flips the biased and the reference classifier. A later attempt can only find the square strategy
in images where the square can flip the classifier at all.

    .venv/bin/python benchmarks/where_changed.py [--run-dir runs/bench-explain]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from pipeline import desiderata, models
from pipeline.manifest import read as read_manifest
from pipeline.regions import dilate

HERE = Path(__file__).resolve().parent


def tensor(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), np.float32) / 127.5 - 1).permute(
        2, 0, 1
    )[None]


def interventions(run: Path, classifier: str, limit: int = 200) -> dict:
    """Flip rates of ground-truth edits: only the square, only the background."""
    model, _ = models.load(run / classifier)
    model.eval()
    meta = pd.read_csv(run / "data" / "metadata.csv")
    flips: dict[str, list[bool]] = {"square": [], "background": []}
    for row in meta[meta["split"] == "val"].head(limit).itertuples():
        x = np.asarray(Image.open(run / "data" / row.path), np.float32)
        square = np.asarray(Image.open(run / "data" / row.feature_mask)) > 127
        around = (
            dilate(torch.from_numpy(square)[None, None].float(), 0.03)[0, 0].numpy() > 0
        )  # the patch's rim
        target = 1 - int(row.label)
        with torch.no_grad():
            if model(as_input(x)).argmax(1).item() != row.label:
                continue
            edited = x.copy()
            edited[square, 0] = 255.0 if target else 0.0
            flips["square"].append(model(as_input(edited)).argmax(1).item() == target)
            edited = x.copy()
            edited[~around] += 255.0 - 2 * row.background  # b -> 255 - b, the pixel noise unchanged
            flips["background"].append(model(as_input(edited)).argmax(1).item() == target)
    return {k: float(np.mean(v)) for k, v in flips.items()} | {"n": len(flips["square"])}


def as_input(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.clip(image, 0, 255) / 127.5 - 1).permute(2, 0, 1)[None].float()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default="runs/bench-explain")
    args = parser.parse_args()
    run = Path(args.run_dir)
    meta = pd.read_csv(run / "data" / "metadata.csv", dtype=str, keep_default_na=False).set_index("path")
    result = {}
    for folder in sorted((run / "bench").iterdir()):
        manifest = read_manifest(folder / "manifest.csv")
        valid = manifest[manifest["success"]]
        densities = []
        for row in valid.itertuples():
            mask = torch.from_numpy(
                np.asarray(Image.open(run / "data" / meta.loc[row.source_path, "feature_mask"])) > 127
            )
            stats = desiderata.per_counterfactual(
                tensor(folder / row.original), tensor(folder / row.counterfactual), mask[None, None].float()
            )
            densities.append(float(stats["feature_density"][0]))
        valid = valid.assign(feature_density=densities)
        result[folder.name] = {
            int(a): {
                "n_valid": int(len(g)),
                "feature": float((g["feature_density"] > 1).mean()),
                "background": float((g["feature_density"] <= 1).mean()),
                "median_density": float(g["feature_density"].median()),
            }
            for a, g in valid.groupby("attempt")
        }
    result["intervention_flip_rate"] = {
        name: interventions(run, name) for name in ("classifier", "reference") if (run / name).is_dir()
    }
    (HERE / "results" / "explain_where_changed.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
