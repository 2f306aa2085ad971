"""How well a small trusted labelled set chooses a run's result (`distil.trusted`), from finished suite runs.

The selection never feeds back into training, so replaying it on a finished run is that run's exact result with
`distil.trusted` set. The trusted set here is the validation split of each dataset's unconfounded draw (the data
the reference classifier trains on; never the test split the figures come from), whole and as random draws of a
few dozen images, the size a user might label by hand. Every candidate is evaluated once; a draw's choice is
`rounds.select_trusted` on that draw's figures. Compared with the label-free choice the run made
(`distil.select`), the last round, and the best classifier of the run (which only test labels can name).

    .venv/bin/python benchmarks/select_trusted.py --runs 'suite-*-seed100' 'suite-*-seed200' 'suite-*-mask-speed'

Writes benchmarks/results/select-trusted.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import sys
import zlib
from pathlib import Path

import numpy as np
import yaml

from pipeline import models, quiet, rounds
from pipeline.config import DistilConfig
from pipeline.data import load_folder
from pipeline.evaluate import evaluate, metrics_from_predictions

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SIZES = (60, 24)  # images in a drawn trusted set
DRAWS = 20  # random draws per size


def _local(path: str) -> Path:
    """A run's recorded data path, read where it lies now (suites run from a snapshot of the tree)."""
    path = Path(path)
    return path if path.exists() else ROOT / "runs" / Path(*path.parts[path.parts.index("runs") + 1 :])


def matched_runs(patterns: list[str]) -> list[Path]:
    """Run folders under runs/suite matching any of the patterns, each once, in name order."""
    return sorted({d for pattern in patterns for d in (ROOT / "runs" / "suite").glob(pattern)})


def predictions(run_dir: Path, names: list[str], trusted) -> dict:
    """Each candidate's predictions on the trusted set's val split (a table per candidate)."""
    tables = {}
    for name in names:
        model, card = models.load(run_dir / name)
        _, tables[name] = evaluate(model, card, trusted, "val")
    return tables


def choose(metrics: dict, tables: dict, classes: list[str], rows: np.ndarray | None) -> str:
    """The product's trusted choice on these rows of the trusted set (all rows when None)."""
    scores = {}
    for name, table in tables.items():
        part = table if rows is None else table.iloc[rows]
        scores[name] = metrics_from_predictions(part.reset_index(drop=True), classes)
    return rounds.select_trusted(metrics, scores, DistilConfig(trusted="replay"))["model"]


def replay(run_dir: Path, seed: int) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    trusted = load_folder(_local(config["reference"]["root"]))
    names = rounds.candidates(metrics)
    tables = predictions(run_dir, names, trusted)
    classes = models.load_card(run_dir / "classifier").classes
    test = {"classifier": metrics["classifier"]["worst_group_accuracy"]}
    test |= {r["model"]: r["worst_group_accuracy"] for r in metrics["rounds"]}
    corrected = [r["model"] for r in metrics["rounds"]]
    n = len(next(iter(tables.values())))
    rng = np.random.default_rng(seed)
    out = {
        "trusted_images": n,
        "worst_group": test,
        "label_free": test[metrics["selected"]["model"]],
        "last_round": test[corrected[-1]],
        "best_of_run": max(test[m] for m in corrected),
        "trusted_all": test[choose(metrics, tables, classes, None)],
    }
    for size in SIZES:
        picks = [choose(metrics, tables, classes, rng.choice(n, size, replace=False)) for _ in range(DRAWS)]
        out[f"trusted_{size}"] = float(np.mean([test[p] for p in picks]))
    return out


def summary(runs: dict) -> dict:
    keys = ["label_free", "last_round", "best_of_run", "trusted_all", *(f"trusted_{s}" for s in SIZES)]
    teachers = {t: [r for name, r in runs.items() if f"-{t}-" in name] for t in ("mask", "model")}
    return {
        t: {"runs": len(rs), **{k: round(float(np.mean([r[k] for r in rs])), 4) for k in keys}}
        for t, rs in teachers.items()
        if rs
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", required=True, help="run folder patterns under runs/suite")
    parser.add_argument("--out", default=str(HERE / "results" / "select-trusted.json"))
    args = parser.parse_args(argv)
    quiet.configure()
    runs = {}
    for run_dir in matched_runs(args.runs):
        if "selected" not in json.loads((run_dir / "metrics.json").read_text()):
            continue  # unfinished
        runs[run_dir.name] = replay(run_dir, seed=zlib.crc32(run_dir.name.encode()))  # draws fixed per run
        print(run_dir.name, {k: round(v, 3) for k, v in runs[run_dir.name].items() if k != "worst_group"})
    result = {
        "runs_matched": args.runs,
        "sizes": SIZES,
        "draws": DRAWS,
        "summary": summary(runs),
        "runs": runs,
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
