"""Why CFKD does not yet fix the embedded default: what the biased classifier responds to, how far a flip must move
the background, which kinds of counterfactual the distil stage can learn from, and what round 1's counterfactuals
actually change. Square only (it reads the generator's ground truth: square intensity a, background b).

Needs a finished default run (benchmarks/cfkd.py leaves runs/bench-cfkd-mask). Writes
benchmarks/results/cfkd_limits.json.

    .venv/bin/python benchmarks/cfkd_limits.py [--run-dir runs/bench-cfkd-mask]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from scipy.ndimage import binary_dilation

from pipeline import config, distil, feedback, manifest, models, quiet
from pipeline.data import load_folder
from pipeline.evaluate import evaluate

HERE = Path(__file__).resolve().parent


def load(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path), np.float32)


def regions(data, row) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The red square, the 12x12 patch around it, and the background at least 6 pixels away from the square."""
    inner = load(data.root / row.feature_mask) > 127
    return inner, binary_dilation(inner, iterations=2), ~binary_dilation(inner, iterations=6)


def p_target(model, images: list[np.ndarray], target: int) -> np.ndarray:
    x = torch.tensor(np.clip(np.stack(images), 0, 255)).permute(0, 3, 1, 2) / 127.5 - 1
    with torch.no_grad():
        return torch.softmax(model(x), -1)[:, target].numpy()


def what_flips(data, meta, models_, n: int = 128) -> dict:
    """p(target) and flip rate when only the square, only the background, or both take the other class's value."""
    rows = data.split("train").sample(n, random_state=0)
    out = {name: {"square": [], "background": [], "both": []} for name in models_}
    for row in rows.itertuples():
        x = load(data.root / row.path)
        inner, patch, _ = regions(data, row)
        a, b = meta.loc[row.path, ["foreground", "background"]]
        square, background = x.copy(), x.copy()
        square[inner, 0] += 255 - 2 * a
        background[~patch] += 255 - 2 * b
        both = square.copy()
        both[~patch] += 255 - 2 * b
        for name, model in models_.items():
            p = p_target(model, [square, background, both], 1 - int(row.label))
            for key, value in zip(("square", "background", "both"), p):
                out[name][key].append(value)
    return {
        name: {
            k: {
                "p_target": round(float(np.mean(v)), 3),
                "flip_rate": round(float(np.mean(np.array(v) > 0.5)), 3),
            }
            for k, v in parts.items()
        }
        for name, parts in out.items()
    }


def shift_needed(data, meta, model, n: int = 64) -> dict:
    """The smallest uniform background move that reaches each goal: distance of the new background from 128."""
    rows = data.split("train").sample(n, random_state=0)
    levels = np.arange(0, 256, 4)
    found = {0.9: [], 0.99: [], 0.999: []}
    for row in rows.itertuples():
        x = load(data.root / row.path)
        _, patch, _ = regions(data, row)
        b, target = meta.loc[row.path, "background"], 1 - int(row.label)
        moved = []
        for level in levels:
            image = x.copy()
            image[~patch] += level - b
            moved.append(image)
        p = p_target(model, moved, target)
        for goal in found:
            ok = levels[p >= goal]
            found[goal].append(abs((ok.min() if target == 1 else ok.max()) - 128) if ok.size else np.nan)
    return {
        str(goal): {
            "reachable": round(float(np.mean(~np.isnan(v))), 3),
            "mean_distance_from_128": round(float(np.nanmean(v)), 1),
        }
        for goal, v in ((g, np.array(v, float)) for g, v in found.items())
    }


def synthetic(data, meta, kind: str, n: int, folder: Path, seed: int = 0) -> pd.DataFrame:
    """Ground-truth 'spurious' counterfactuals of n training images (half per class) with the source label:
    mirror = background b -> 255 - b; near = just past the boundary (128 +- 5..35); halo = near, but the
    background within 5 pixels of the square keeps its original value."""
    rng = np.random.default_rng(seed)
    train = data.split("train")
    picks = pd.concat(
        [train[train.label.astype(str) == c].sample(n // 2, random_state=seed) for c in ("0", "1")]
    )
    (folder / kind).mkdir(parents=True, exist_ok=True)
    rows = []
    for row in picks.itertuples():
        x = load(data.root / row.path)
        inner, patch, _ = regions(data, row)
        b = meta.loc[row.path, "background"]
        new = 255 - b if kind == "mirror" else 128 + rng.uniform(5, 35) * (1 if b < 128 else -1)
        moved = ~binary_dilation(inner, iterations=5) if kind == "halo" else ~patch
        x[moved] += new - b
        cf_id = f"train-{row.Index:05d}-to-{1 - int(row.label)}-a1"
        Image.fromarray(np.clip(x, 0, 255).astype(np.uint8)).save(folder / kind / f"{cf_id}.png")
        shutil.copyfile(data.root / row.path, folder / kind / f"{cf_id}-original.png")  # for distil.stretch
        rows.append(
            {
                "id": cf_id,
                "sample": f"train-{row.Index:05d}",
                "counterfactual": f"{kind}/{cf_id}.png",
                "original": f"{kind}/{cf_id}-original.png",
                "verdict": "spurious",
                "label": str(row.label),
            }
        )
    return pd.DataFrame(rows)


def distil_once(run: Path, data, table: pd.DataFrame, folder: Path, settings, out: Path) -> dict:
    fit, held = distil.split_holdout(table, settings.holdout, settings.seed)
    distil.run(run / "classifier", data, fit, held, folder, settings, out)
    metrics, _ = evaluate(*models.load(out), data)
    return {
        "counterfactuals": len(fit),
        "test_accuracy": round(metrics["accuracy"], 4),
        "worst_group_accuracy": round(metrics["worst_group_accuracy"], 4),
    }


def what_round_one_changes(run: Path, data, meta, reference) -> dict:
    """Mean change (0-255) of round 1's valid counterfactuals on the square's red channel and the far background,
    and the share that also flips the unbiased reference."""
    table = manifest.read_round(run, 1)
    rows = table[table["success"] & (table["attempt"] == 1)]
    square, far, flips = [], [], []
    for row in rows.itertuples():
        x = load(data.root / row.source_path)
        delta = load(run / manifest.folder(1) / row.counterfactual) - x
        inner, _, far_away = regions(data, meta.loc[row.source_path])
        square.append(abs(delta[inner, 0].mean()))
        far.append(abs(delta[far_away].mean()))
        flips.append(p_target(reference, [x + delta], int(row.target_class))[0] > 0.5)
    return {
        "counterfactuals": len(rows),
        "square_red_change": round(float(np.mean(square)), 1),
        "far_background_change": round(float(np.mean(far)), 1),
        "reference_flips": round(float(np.mean(flips)), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default="runs/bench-cfkd-mask")
    args = parser.parse_args()
    quiet.configure(verbose=False)
    run = Path(args.run_dir)
    if not feedback.verdicts_path(run, 1).exists():
        print(f"error: {run} has no finished round 1; run benchmarks/cfkd.py first", file=sys.stderr)
        sys.exit(2)
    data = load_folder(run / "data")
    meta = pd.read_csv(data.root / "metadata.csv").set_index("path")  # the generator's ground truth
    biased, _ = models.load(run / "classifier")
    reference, _ = models.load(run / "reference")
    settings = config.load(run / "config.yaml").distil
    result = {
        "benchmark": "cfkd limits on the embedded default",
        "run": str(run),
        "what_flips": what_flips(data, meta, {"biased": biased.eval(), "reference": reference.eval()}),
        "background_shift_needed_by_goal": shift_needed(data, meta, biased.eval()),
        "round_1_changes": what_round_one_changes(run, data, meta, reference.eval()),
        "distil_one_round": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for kind, n in (("mirror", 16), ("near", 16), ("halo", 16), ("near", 48)):
            table = synthetic(data, meta, kind, n, tmp / str(n))
            result["distil_one_round"][f"{kind}_{n}"] = distil_once(
                run, data, table, tmp / str(n), settings, tmp / f"m-{kind}-{n}"
            )
        result["distil_one_round"]["round_1_counterfactuals"] = distil_once(
            run, data, distil.training_data(run, [1], use_true=False), run, settings, tmp / "m-real"
        )
    path = HERE / "results" / "cfkd_limits.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
