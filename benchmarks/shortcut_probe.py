"""Would a probe of shortcut reliance rank a run's classifiers better than their own feedback accuracy?

For each classifier k of a finished multi-round run: how often the counterfactuals the teacher judged spurious
(and, for comparison, true) still flip it, on their own images, counting only the rounds whose edits were neither
searched on k nor trained into it (rounds k + 2 onwards: round j explains classifier j - 1, and classifier k learnt
the verdicts of rounds 1..k). A classifier that ignores the shortcut should flip on the spurious edits less often.
The last classifier has no such round. Test worst-group accuracy is listed beside it, never used.

    .venv/bin/python benchmarks/shortcut_probe.py RUN_DIR [RUN_DIR ...] [--out FILE]

Writes benchmarks/results/shortcut-probe.json (or --out).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
import torch
from PIL import Image

from pipeline import feedback, manifest, models

HERE = Path(__file__).resolve().parent


def judged(run: Path, round: int, verdict: str) -> pd.DataFrame:
    """The round's counterfactuals the teacher gave ``verdict``, with their paths and target classes."""
    table = manifest.read_round(run, round)
    verdicts = feedback.read_verdicts(run, round)
    chosen = verdicts.loc[verdicts["label"] == verdict, "cf_id"]
    return table[table["id"].isin(chosen)]


@torch.no_grad()
def flips(model, card, folder: Path, table: pd.DataFrame) -> int:
    """How many of the counterfactuals in ``table`` the classifier (on pixels) assigns to their target class."""
    if table.empty:
        return 0
    transform = models.pixel_transform(card)
    images = []
    for rel in table["counterfactual"]:
        with Image.open(folder / rel) as image:
            images.append(transform(image))
    predicted = model(torch.stack(images)).argmax(1).tolist()
    return sum(card.classes[p] == t for p, t in zip(predicted, table["target_class"]))


def probe(run: Path) -> list[dict]:
    metrics = json.loads((run / "metrics.json").read_text())
    names = ["classifier", *(r["model"] for r in metrics["rounds"])]
    worst = [
        metrics["classifier"]["worst_group_accuracy"],
        *(r["worst_group_accuracy"] for r in metrics["rounds"]),
    ]
    judged_rounds = len(metrics["rounds"]) + (1 if metrics.get("closing") else 0)
    # round 1 explained the first classifier, so no classifier is probed with it
    tables = {(j, v): judged(run, j, v) for j in range(2, judged_rounds + 1) for v in ("spurious", "true")}
    rows = []
    for k, name in enumerate(names):
        model, card = models.load(run / name)
        model = models.OnPixels(model.eval(), card)
        row = {"classifier": name, "worst_group": worst[k]}
        for verdict in ("spurious", "true"):
            later = range(k + 2, judged_rounds + 1)
            n = sum(len(tables[j, verdict]) for j in later)
            hits = sum(flips(model, card, run / manifest.folder(j), tables[j, verdict]) for j in later)
            row[verdict] = {"counterfactuals": n, "flip_rate": round(hits / n, 3) if n else None}
        rows.append(row)
    return rows


def probe_choice(rows: list[dict]) -> dict | None:
    """The classifier the probe would keep: the fewest flips on spurious edits (the earliest of a tie)."""
    probed = [r for r in rows if r["spurious"]["flip_rate"] is not None]
    return min(probed, key=lambda r: r["spurious"]["flip_rate"]) if probed else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", default=str(HERE / "results" / "shortcut-probe.json"))
    args = parser.parse_args()
    found = {}
    for run in args.runs:
        found[run.name] = probe(run)
        print(run.name)
        for row in found[run.name]:
            print(
                f"  {row['classifier']:10s} worst group {row['worst_group']:.3f}",
                row["spurious"],
                row["true"],
            )
    picks = {name: probe_choice(rows) for name, rows in found.items()}
    picks = {name: pick for name, pick in picks.items() if pick is not None}
    selected = {
        name: json.loads((run / "metrics.json").read_text())["selected"]["worst_group_accuracy"]
        for run in args.runs
        if (name := run.name) in picks
    }
    n = max(len(picks), 1)
    summary = {
        "runs": len(picks),
        "probe_keeps_the_first_classifier": sum(p["classifier"] == "classifier" for p in picks.values()),
        "mean_worst_group_probe_choice": round(sum(p["worst_group"] for p in picks.values()) / n, 4),
        "mean_worst_group_selected_today": round(sum(selected.values()) / n, 4),
    }
    print(json.dumps(summary))
    Path(args.out).write_text(json.dumps({"summary": summary, "runs": found}, indent=1) + "\n")


if __name__ == "__main__":
    main()
