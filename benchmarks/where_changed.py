"""Where do the counterfactuals of each explain-benchmark variant change the image? Recomputed from the saved
images and the dataset's feature masks with the density criterion (mean |change| on the feature over mean
|change| elsewhere > 1), without rerunning the search.

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

from pipeline import desiderata
from pipeline.explain import read_manifest

HERE = Path(__file__).resolve().parent


def tensor(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), np.float32) / 127.5 - 1).permute(
        2, 0, 1
    )[None]


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
    (HERE / "results" / "explain_where_changed.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
