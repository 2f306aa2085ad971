"""How many directions round 1's erase needs, from finished suite runs: a sweep of the erase's rank.

Round 1 erases alone in the explained classifier's own features (`distil.layers: staged`). For k = 1..8 principal
directions of the round's spurious edits, the head is refitted as `pipeline/erase.py` does, and three figures are
taken: the worst group on the test split, the share of the spurious edits the refitted head keeps at their source
label (what `distil.erase: hold` asks for), and the share of the edits judged true that still reach their target.
Also the rank `hold` would choose. Only the head changes, so this is exact for round 1 and says nothing of later
rounds (their counterfactuals were searched on the run's own classifiers).

    .venv/bin/python benchmarks/erase_rank.py --runs 'suite-*-seed100' 'suite-*-seed200'

Writes benchmarks/results/erase-rank-r1.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from select_trusted import _local, matched_runs

from pipeline import config as cfg
from pipeline import distil, erase, models, quiet
from pipeline.data import Counterfactuals, ImageDataset, load_folder
from pipeline.dfr import features
from pipeline.evaluate import metrics_from_predictions

HERE = Path(__file__).resolve().parent
RANKS = range(1, 9)


def sweep(run_dir: Path) -> dict | None:
    config = cfg.load(run_dir / "config.yaml")
    data = load_folder(_local(config.data.root))
    model, card = models.load(run_dir / "classifier")
    judged = distil.taught_verdicts(run_dir, [1], config.distil, config.explain.search.cast_attempt)
    spurious = judged[judged["verdict"] == "spurious"]
    if len(spurious) < 2:
        return None
    transform = models.input_transform(card)
    change = erase.feature_change(model, card, spurious, run_dir)
    most = erase.most_directions(change)
    x_judged = features(model, Counterfactuals(judged, run_dir, card.classes, transform))
    wanted = np.array([card.classes.index(str(label)) for label in judged["label"]])
    is_spurious = (judged["verdict"] == "spurious").to_numpy()
    x_train, y_train = erase.training_features(model, card, data)
    test = ImageDataset(data, "test", card.classes, transform)
    x_test = features(model, test)
    out = {"true": int((~is_spurious).sum()), "spurious": int(is_spurious.sum()), "cap": most, "ranks": {}}
    for k in RANKS:
        directions = erase.orthonormal(erase.principal(change, spurious, k))
        fit = erase.refit(x_train, y_train, directions, config.distil.seed)
        agree = fit.predict(x_judged - (x_judged @ directions.T) @ directions) == wanted
        tested = metrics_from_predictions(
            test.rows.assign(pred=fit.predict(x_test - (x_test @ directions.T) @ directions)), card.classes
        )
        out["ranks"][k] = {
            "worst_group": round(tested["worst_group_accuracy"], 4),
            "spurious_held": round(float(agree[is_spurious].mean()), 4),
            "true_reached": round(float(agree[~is_spurious].mean()), 4) if (~is_spurious).any() else None,
        }
    held = [k for k in RANKS if k <= most and out["ranks"][k]["spurious_held"] >= erase.HOLD]
    out["hold_chooses"] = held[0] if held else most
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", required=True, help="run folder patterns under runs/suite")
    parser.add_argument("--out", default=str(HERE / "results" / "erase-rank-r1.json"))
    args = parser.parse_args(argv)
    quiet.configure()
    runs = {}
    for run_dir in matched_runs(args.runs):
        if (run_dir / "distil_r1").is_dir() and (found := sweep(run_dir)) is not None:
            runs[run_dir.name] = found
            print(
                run_dir.name, found["hold_chooses"], {k: v["worst_group"] for k, v in found["ranks"].items()}
            )
    totals = {k: round(sum(r["ranks"][k]["worst_group"] for r in runs.values()), 3) for k in RANKS}
    chosen = round(sum(r["ranks"][r["hold_chooses"]]["worst_group"] for r in runs.values()), 3)
    result = {
        "runs_matched": args.runs,
        "sum_worst_group": totals,
        "sum_worst_group_hold": chosen,
        "runs": runs,
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
