"""The path a user takes with their own data and classifier, measured end to end.

1. Shapes (greyscale, 48 x 64, three classes, a corner tag confounded with the class in 90 % of train/val images)
   and an unconfounded copy for the reference;
2. a 1-channel torchvision resnet18 trained with plain PyTorch (its own loop, its own normalisation), saved as a
   state_dict, and its own accuracy on the test split;
3. `cfkd import --mean --std`, `cfkd evaluate` (must agree with 2. within 0.5 points) and a short `cfkd run`.

Writes benchmarks/results/own_data.json.

    .venv/bin/python benchmarks/own_data.py [--epochs 6]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torchvision
import yaml
from PIL import Image

from pipeline import feedback, shapes

ROOT = Path(__file__).resolve().parent.parent
MEAN, STD = 0.25, 0.3  # the user's own normalisation


def inputs(root: Path, rows: pd.DataFrame) -> torch.Tensor:
    images = [np.asarray(Image.open(root / p), dtype=np.float32) / 255 for p in rows["path"]]
    return (torch.from_numpy(np.stack(images))[:, None] - MEAN) / STD


def plain_training(root: Path, epochs: int, seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor, list[str]]:
    """The user's code: torchvision resnet18 with a 1-channel stem, Adam, no cfkd; (model, test predictions as
    class indices into the sorted class names, classes)."""
    table = pd.read_csv(root / "metadata.csv", keep_default_na=False)
    classes = sorted(table["label"].unique())
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=len(classes))
    model.conv1 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    train = table[table["split"] == "train"]
    x, y = inputs(root, train), torch.tensor([classes.index(v) for v in train["label"]])
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(len(x)).split(32):
            loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    test = table[table["split"] == "test"]
    with torch.no_grad():
        pred = model(inputs(root, test)).argmax(1)
    return model, pred, classes


def cfkd(*argv: str) -> str:
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", *argv], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"cfkd {' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "own_data.json"))
    args = parser.parse_args()
    work = ROOT / "runs" / "bench-own-data"
    shutil.rmtree(work, ignore_errors=True)
    started = time.perf_counter()
    shapes.generate(work / "data", shapes.ShapesConfig(poison=0.9, seed=0))
    shapes.generate(work / "reference", shapes.ShapesConfig(poison=1 / 3, seed=1))
    model, plain_pred, classes = plain_training(work / "data", args.epochs)
    test = pd.read_csv(work / "data" / "metadata.csv", keep_default_na=False).query("split == 'test'")
    truth = torch.tensor([classes.index(v) for v in test["label"]])
    plain_accuracy = float((plain_pred == truth).float().mean())
    torch.save(model.state_dict(), work / "model.pt")
    trained = time.perf_counter()

    size = ["--image-size", "48,64", "--mean", str(MEAN), "--std", str(STD)]
    cfkd(
        "import",
        "--weights",
        str(work / "model.pt"),
        "--arch",
        "resnet18",
        "--data",
        str(work / "data"),
        *size,
        "--out",
        str(work / "imported"),
    )
    cfkd("evaluate", "--checkpoint", str(work / "imported"), "--data", str(work / "data"))
    evaluated = json.loads((work / "imported" / "eval_test" / "metrics.json").read_text())
    ours = pd.read_csv(work / "imported" / "eval_test" / "predictions.csv", keep_default_na=False)
    agreement = float((torch.tensor(ours["pred"].to_numpy()) == plain_pred).float().mean())

    config = {
        "name": "own-data",
        "data": {"root": str(work / "data"), "image_size": [48, 64]},
        "classifier": {"arch": "resnet18", "weights": str(work / "model.pt"), "mean": [MEAN], "std": [STD]},
        "reference": {"root": str(work / "reference")},
        "explain": {"split": "train", "per_pair": 4},
        "feedback": {"teacher": "mask"},
        "distil": {"rounds": 1},
    }
    (work / "run.yaml").write_text(yaml.safe_dump(config))
    before_run = time.perf_counter()
    cfkd("run", "--config", str(work / "run.yaml"), "--run-dir", str(work / "run"))
    metrics = json.loads((work / "run" / "metrics.json").read_text())
    verdicts = feedback.read_verdicts(work / "run", 1)
    result = {
        "dataset": "Shapes: greyscale 48x64, 3 classes, corner tag confounded in 90 % of train/val",
        "plain_test_accuracy": plain_accuracy,
        "cfkd_evaluate_accuracy": evaluated["accuracy"],
        "difference_points": round(100 * abs(plain_accuracy - evaluated["accuracy"]), 3),
        "within_half_a_point": abs(plain_accuracy - evaluated["accuracy"]) <= 0.005,
        "same_prediction_per_image": agreement,
        "classes": classes,
        "run_status": metrics["status"],
        "verdicts": int(len(verdicts)),
        "verdict_counts": metrics["rounds"][0]["labels"],
        "not_flipped": metrics["rounds"][0]["not_flipped"],
        "abstained": metrics["rounds"][0]["abstained"],
        "before": {k: metrics["classifier"][k] for k in ("accuracy", "worst_group_accuracy")},
        "after_round_1": {k: metrics["rounds"][0][k] for k in ("test_accuracy", "worst_group_accuracy")},
        "feedback_accuracy": {
            "before": metrics["rounds"][0]["feedback_accuracy"],
            "after_round_1": metrics["closing"]["feedback_accuracy"],
        },
        "selected": metrics["selected"]["model"],
        "reference": {k: metrics["reference"][k] for k in ("accuracy", "worst_group_accuracy")},
        "report": (work / "run" / "report.html").exists(),
        "seconds": {
            "plain_training": round(trained - started, 1),
            "cfkd_run": round(time.perf_counter() - before_run, 1),
        },
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
