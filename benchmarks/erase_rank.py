"""How many directions round 1's erase needs, from finished suite runs: a sweep of the erase's rank.

Round 1 erases alone in the explained classifier's own features (`distil.layers: staged`). For k = 1..8 principal
directions of the round's spurious edits, the head is refitted as `pipeline/erase.py` does, and three figures are
taken: the worst group on the test split, the share of the spurious edits the refitted head keeps at their source
label (what `distil.erase: hold` asks for), and the share of the edits judged true that still reach their target.
Also the ranks `hold` and `verdicts` (which also keeps the true edits' reach) would choose. Only the head changes,
so this is exact for round 1 and says nothing of later rounds (their counterfactuals were searched on the run's own
classifiers).

    .venv/bin/python benchmarks/erase_rank.py --runs 'suite-*-seed100' 'suite-*-seed200'
    .venv/bin/python benchmarks/erase_rank.py --again benchmarks/results/erase-rank-r1.json  # choices only

Writes benchmarks/results/erase-rank-r1.json (or --out); ``--again`` recomputes the choices and sums of a file
it wrote, in place, without sweeping.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

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
    wanted = erase.class_indices(judged, card)
    is_spurious = (judged["verdict"] == "spurious").to_numpy()
    x_train, y_train = erase.training_features(model, card, data)
    test = ImageDataset(data, "test", card.classes, transform)
    x_test = features(model, test)
    out = {"true": int((~is_spurious).sum()), "spurious": int(is_spurious.sum()), "cap": most, "ranks": {}}
    for k in RANKS:
        directions = erase.orthonormal(erase.principal(change, spurious, k))
        fit = erase.refit(x_train, y_train, directions, config.distil.seed)
        agree = fit.predict(erase.without(x_judged, directions)) == wanted
        tested = metrics_from_predictions(
            test.rows.assign(pred=fit.predict(erase.without(x_test, directions))), card.classes
        )
        out["ranks"][str(k)] = {
            "worst_group": round(tested["worst_group_accuracy"], 4),
            "spurious_held": round(float(agree[is_spurious].mean()), 4),
            "true_reached": round(float(agree[~is_spurious].mean()), 4) if (~is_spurious).any() else None,
        }
    return out


def chooses(found: dict) -> dict[str, int]:
    """The rank each rule takes from a run's sweep: ``hold`` the smallest holding ``erase.HOLD`` of the spurious
    edits (else the cap); ``verdicts`` the smallest that also keeps ``erase.KEEP`` of the true edits' reach with
    one direction (else one direction, or the cap where no edit was judged true)."""
    ranks = {int(k): v for k, v in found["ranks"].items() if int(k) <= found["cap"]}
    held = [k for k, v in ranks.items() if v["spurious_held"] >= erase.HOLD]
    if not found["true"]:
        return {"hold": held[0] if held else found["cap"], "verdicts": held[0] if held else found["cap"]}
    keep = erase.KEEP * ranks[1]["true_reached"]
    both = [k for k in held if ranks[k]["true_reached"] >= keep]
    return {"hold": held[0] if held else found["cap"], "verdicts": both[0] if both else 1}


def summary(runs: dict) -> dict:
    for found in runs.values():
        found |= {f"{rule}_chooses": k for rule, k in chooses(found).items()}
    out = {
        "sum_worst_group": {
            k: round(sum(r["ranks"][str(k)]["worst_group"] for r in runs.values()), 3) for k in RANKS
        }
    }
    for rule in ("hold", "verdicts"):
        out[f"sum_worst_group_{rule}"] = round(
            sum(r["ranks"][str(r[f"{rule}_chooses"])]["worst_group"] for r in runs.values()), 3
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", help="run folder patterns under runs/suite")
    parser.add_argument("--out", default=str(HERE / "results" / "erase-rank-r1.json"))
    parser.add_argument("--again", help="a file this script wrote: recompute its choices and sums only")
    args = parser.parse_args(argv)
    if args.again:
        result = json.loads(Path(args.again).read_text())
        result |= summary(result["runs"])
        Path(args.again).write_text(json.dumps(result, indent=1))
        print(json.dumps({k: v for k, v in result.items() if k != "runs"}))
        return 0
    if not args.runs:
        parser.error("--runs or --again is required")
    quiet.configure()
    runs = {}
    for run_dir in matched_runs(args.runs):
        if (run_dir / "distil_r1").is_dir() and (found := sweep(run_dir)) is not None:
            runs[run_dir.name] = found
            print(run_dir.name, {k: v["worst_group"] for k, v in found["ranks"].items()})
    result = {"runs_matched": args.runs, **summary(runs), "runs": runs}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
