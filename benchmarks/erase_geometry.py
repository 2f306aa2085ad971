"""How much of the shortcut the erase after a fine-tune removes, and how much the true edits' sparing keeps.

For finished suite runs: in the features of round N's fine-tuned classifier (the erase changes only the head, so
the saved weights have the same features), the spurious edits' feature changes (those the round trained on), the
subspace of what the edits judged true changed (the part the erase spares), the principal spurious directions
(one per round), how much of each is left after the sparing, and the share of the spurious edits' change that
stays readable after erasing the directions as the run did (spared) and whole (``distil.erase_spare: false``).

    .venv/bin/python benchmarks/erase_geometry.py --tag blockmodel --only stamp-alone --round 2 --out FILE

Writes benchmarks/results/FILE.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
from suite import tagged_runs

from pipeline import config as cfg
from pipeline import distil, erase, models, quiet

HERE = Path(__file__).resolve().parent


def residual(change: np.ndarray, directions: np.ndarray) -> float:
    """The share of ``change``'s energy left after projecting ``directions`` (orthonormal rows) out."""
    left = erase.without(change, directions) if len(directions) else change
    return float(np.linalg.norm(left) ** 2 / max(np.linalg.norm(change) ** 2, 1e-12))


def geometry(run_dir: Path, n: int) -> dict:
    config = cfg.load(run_dir / "config.yaml")
    stage = run_dir / f"distil_r{n}"
    backbone, card = models.load(stage)
    table = pd.read_csv(stage / "training_set.csv", dtype={"label": str})
    spurious = table[(table["use"] == "train") & (table["verdict"] == "spurious")]
    cast_attempt = config.explain.search.cast_attempt
    labelled = distil.taught_verdicts(run_dir, list(range(1, n + 1)), config.distil, cast_attempt)
    true = labelled[labelled["verdict"] == "true"]
    change = erase.feature_change(backbone.eval(), card, spurious, run_dir)
    top = erase.principal(change, spurious, 1)
    whole = erase.orthonormal(top)
    out = {"spurious": len(spurious), "true": len(true), "directions": len(top)}
    spared = erase.spurious_directions(
        backbone, card, spurious, run_dir, 1, true if len(true) else None, True
    )
    if len(true):
        real = erase.evidence_directions(erase.feature_change(backbone, card, true, run_dir))
        out |= {
            "evidence_dimensions": len(real),
            "spurious_share_in_evidence": 1.0 - residual(change, erase.orthonormal(real)),
            "left_after_sparing": np.linalg.norm(erase.without(top, real), axis=1).round(3).tolist(),
        }
    out |= {
        "readable_after_spared_erase": residual(change, spared),
        "readable_after_whole_erase": residual(change, whole),
    }
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tag", required=True, help="the suite runs' tag (runs/suite/suite-NAME-TEACHER-TAG)")
    p.add_argument("--only", nargs="*", help="datasets (default: every run with that tag)")
    p.add_argument("--round", type=int, default=2)
    p.add_argument("--out", required=True, help="results file name, without .json")
    args = p.parse_args()
    quiet.configure(False)
    results = {}
    for name, run_dir in tagged_runs(args.tag, args.only):
        if (run_dir / f"distil_r{args.round}" / "training_set.csv").is_file():
            results[name] = geometry(run_dir, args.round)
            print(name, results[name], flush=True)
    out = HERE / "results" / f"{args.out}.json"
    out.write_text(json.dumps({"tag": args.tag, "round": args.round, "runs": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
