"""How well the label-free choice of a run's result (`distil.select`) does, from finished multi-round runs.

The selection sees only the teacher's judgements of each classifier's counterfactuals; the test split's worst-group
accuracy, which it never sees, says how good its choice was. For every finished run (the closing judgement done)
under the folder: the classifier chosen, the best one the run made, and their worst-group accuracies. The choice is
recomputed with today's rule from the judgements the run recorded, so a change of the rule is measured on every
run at once without rerunning any; `RULES` holds other label-free rules, each replayed the same way (the
selection never feeds back into training, so a replay is the run's exact result under that rule).

    .venv/bin/python benchmarks/selection.py [--runs runs/suite] [--tag 3r-fast] [--out FILE]

Writes benchmarks/results/selection.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from pipeline import models, rounds

HERE = Path(__file__).resolve().parent


def _true_rate(judgement: dict) -> float:
    return judgement["labels"]["true"] / max(judgement["counterfactuals"], 1)


def _wilson_lower(judgement: dict, z: float = 1.0) -> float:
    """The lower end of the Wilson interval of feedback accuracy: a rate from few verdicts counts for less."""
    true, n = judgement["labels"]["true"], judgement["labels"]["true"] + judgement["labels"]["spurious"]
    if n == 0:
        return 0.0
    p = true / n
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (p + z * z / (2 * n) - spread) / (1 + z * z / n)


# label-free rules the selection could use instead of today's (rounds.preference): larger is preferred
RULES = {
    "today": rounds.preference,
    # the rule before 2026-12-05 (evening): a classifier whose judged edits were all unsure did not compete
    "all_unsure_left_out": lambda j, i: (
        j["labels"]["true"] + j["labels"]["spurious"] > 0,
        *rounds.preference(j, i),
    ),
    "fewest_spurious_first": lambda j, i: (-rounds.shortcut_rate(j), j["feedback_accuracy"], i > 0, -i),
    "wilson_lower_bound": lambda j, i: (_wilson_lower(j), -rounds.shortcut_rate(j), i > 0, -i),
    "feedback_first": lambda j, i: (j["feedback_accuracy"], -rounds.shortcut_rate(j), i > 0, -i),
    "true_minus_spurious": lambda j, i: (_true_rate(j) - rounds.shortcut_rate(j), i > 0, -i),
    "round_1": lambda j, i: (i == 1,),
    "last_round": lambda j, i: (i,),
}


def candidates(metrics: dict) -> dict[str, float]:
    """Worst-group test accuracy of every classifier the selection chooses from."""
    found = {"classifier": metrics["classifier"]["worst_group_accuracy"]}
    return found | {r["model"]: r["worst_group_accuracy"] for r in metrics["rounds"]}


def measure(run_dir: Path) -> dict | None:
    path = run_dir / "metrics.json"
    metrics = json.loads(path.read_text()) if path.exists() else {}
    if not metrics.get("closing") or not metrics.get("rounds"):
        return None  # not a finished multi-round run with its closing judgement
    worst = candidates(metrics)
    for judged in [metrics["classifier"], *metrics["rounds"]]:  # runs recorded before weights digests
        judged.setdefault("weights", models.weights_digest(run_dir / judged.get("model", "classifier")))
    picks = {name: rounds.select(metrics, key)["model"] for name, key in RULES.items()}
    chosen, best = picks["today"], max(worst, key=worst.get)
    return {
        "chosen": chosen,
        "chosen_worst_group": worst[chosen],
        "best": best,
        "best_worst_group": worst[best],
        "worst_group": worst,
        "by_rule": {name: worst[model] for name, model in picks.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="runs/suite", help="folder holding run directories")
    parser.add_argument("--tag", default="", help="only runs whose name ends with this")
    parser.add_argument("--out", default=str(HERE / "results" / "selection.json"))
    args = parser.parse_args()
    runs = {}
    for run_dir in sorted(Path(args.runs).iterdir()):
        # a link names a run already listed under its own name
        if run_dir.is_dir() and not run_dir.is_symlink() and run_dir.name.endswith(args.tag):
            found = measure(run_dir)
            if found is not None:
                runs[run_dir.name] = found
    n = len(runs)
    summary = {
        "runs": n,
        "best_chosen": sum(r["chosen_worst_group"] == r["best_worst_group"] for r in runs.values()),
        "mean_chosen_worst_group": round(sum(r["chosen_worst_group"] for r in runs.values()) / max(n, 1), 4),
        "mean_best_worst_group": round(sum(r["best_worst_group"] for r in runs.values()) / max(n, 1), 4),
        "rules": {
            name: {
                "mean_worst_group": round(sum(r["by_rule"][name] for r in runs.values()) / max(n, 1), 4),
                "best_chosen": sum(r["by_rule"][name] == r["best_worst_group"] for r in runs.values()),
            }
            for name in RULES
        },
    }
    for name, r in runs.items():
        print(
            f"{name:45s} chose {r['chosen']:10s} {r['chosen_worst_group']:.3f}   best {r['best']:10s} "
            f"{r['best_worst_group']:.3f}"
        )
    print(json.dumps(summary))
    out = Path(args.out)
    out.write_text(json.dumps({"summary": summary, "runs": runs}, indent=1) + "\n")


if __name__ == "__main__":
    main()
