"""What the colour-cast attempt (``explain.search.cast``) changes on stain, and what its edits teach.

For finished suite runs on stain: the mean log gain per channel of the valid cast attempts (signed so that a
warm-to-cool edit counts positive on blue), beside the generator's own difference between its two scanners; then
the distil stage run again from round 1's spurious edits, the cast attempts alone or every attempt, under distil
settings of choice. Together they separate what the edit is from what the fine-tune makes of it.

    .venv/bin/python benchmarks/cast_edits.py --runs suite-stain-model-cast-s1 suite-stain-model-cast-basis-s1 \
        --variant stretch=1,layers=all --variant stretch=1,layers=all,erase=0,epochs=12 --out cast-edits

Writes benchmarks/results/OUT.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from distil_replay import changed_distil
from distil_replay import settings as distil_changes
from PIL import Image
from suite import ROOT

from pipeline import config, distil, manifest, models, quiet
from pipeline.confounded import StainConfig
from pipeline.data import load_folder
from pipeline.evaluate import evaluate

HERE = Path(__file__).resolve().parent


def log_gains(run: Path, attempt: int) -> list[float]:
    """Mean over round 1's valid edits of one attempt of the per-channel mean log change, warm-to-cool positive."""
    table = manifest.read_round(run, 1)
    table = table[(table["attempt"] == attempt) & table["success"]]
    folder = run / manifest.folder(1)
    gains = []
    for row in table.itertuples():
        x, cf = (
            np.asarray(Image.open(folder / p).convert("RGB"), float) + 1
            for p in (row.original, row.counterfactual)
        )
        sign = 1 if row.source_class == "round" else -1  # round tiles carry the warm cast in training
        gains.append(sign * np.log(cf / x).reshape(-1, 3).mean(0))
    return np.round(np.mean(gains, 0), 3).tolist()


def distilled(run: Path, only_attempt: int | None, changes: dict) -> dict:
    """Accuracy and worst group after distilling round 1's spurious edits (of one attempt, or all) from the run's
    biased classifier under the run's distil settings changed by ``changes``."""
    run_config = config.load(run / "config.yaml")
    d = changed_distil(run_config, changes)
    table = distil.training_data(run, [1], d.use_true)
    table = table[table["verdict"] == "spurious"]
    if only_attempt:
        table = table[table["id"].str.contains(f"-a{only_attempt}-")]
    data = load_folder(Path(run_config.data.root))
    with tempfile.TemporaryDirectory() as tmp:
        fit, held = distil.split_holdout(table, d.holdout, d.seed)
        distil.run(run / "classifier", data, fit, held, run, d, Path(tmp))
        tested, _ = evaluate(*models.load(Path(tmp)), data)
    return {
        "edits": len(table),
        "accuracy": round(tested["accuracy"], 4),
        "worst_group_accuracy": round(tested["worst_group_accuracy"], 4),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", required=True, help="run folders under runs/suite (stain, cast on)")
    p.add_argument("--variant", action="append", default=[], help="distil settings, KEY=VALUE,...")
    p.add_argument("--out", required=True, help="results file name, without .json")
    args = p.parse_args()
    quiet.configure(False)
    c = StainConfig.cast
    results = {
        "generator": np.round(np.log([(1 - c) / (1 + c), 1, (1 + c) / (1 - c)]), 3).tolist(),
        "runs": {},
    }
    for name in args.runs:
        run = ROOT / "runs" / "suite" / name
        attempts = manifest.read_round(run, 1)["attempt"].max()
        row = {"log_gains": {f"attempt {a}": log_gains(run, a) for a in range(1, attempts + 1)}}
        for variant in args.variant:
            changes = distil_changes(variant)
            row[variant] = {
                "cast attempts": distilled(run, attempts, changes),
                "every attempt": distilled(run, None, changes),
            }
        results["runs"][name] = row
        print(name, json.dumps(row), flush=True)
    (HERE / "results" / f"{args.out}.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
