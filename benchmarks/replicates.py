"""How much does one suite run vary? The same defaults run more than once (another explain seed, so each round
explains other images, and another distil seed), dataset by dataset and teacher by teacher: the selected
classifier's worst group, the gap closed, attempt-1 validity, the median shortcut share of valid first attempts and
the network evaluations per counterfactual, per replicate, with their mean and range, and the acceptance targets
each replicate meets.

A replicate is one or more suite JSONs of the same defaults; a later file fills in the (dataset, teacher) runs the
earlier ones lack:

    .venv/bin/python benchmarks/suite.py --set explain.seed=100 distil.seed=1 --tag seed100
    .venv/bin/python benchmarks/replicates.py --replicate seed0 suite-a.json suite-b.json \\
        --replicate seed100 suite-seed100.json --out replicates.json

Writes the JSON named by --out into benchmarks/results/ and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from statistics import mean

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
# the acceptance: share of the worst-group gap closed per teacher, and attempt-1 validity
GAP_TARGET = {"mask": 0.8, "model": 0.7}
VALIDITY_TARGET = 0.95


def merged(files: list[str]) -> dict:
    """(dataset, teacher) -> that run's summary, the first file that has it winning."""
    runs = {}
    for name in files:
        path = Path(name) if Path(name).is_file() else RESULTS / name
        for dataset, teachers in json.loads(path.read_text())["datasets"].items():
            for teacher, summary in teachers.items():
                if "cfkd" in summary:
                    runs.setdefault((dataset, teacher), summary | {"file": path.name})
    return runs


def row(summary: dict) -> dict:
    """The figures of one run that the acceptance names."""
    cfkd, explain = summary["cfkd"], summary.get("explain", {})
    first = summary.get("shares", {}).get("round_1", {})
    return {
        "file": summary["file"],
        "rounds": [round(r["worst_group_accuracy"], 3) for r in cfkd.get("rounds", [])],
        "selected": cfkd.get("model"),
        "worst_group": round(cfkd["worst_group_accuracy"], 3),
        "gap_closed": cfkd.get("gap_closed_worst_group"),
        "validity_a1": explain.get("validity_by_attempt", {}).get("1"),
        "shortcut_median_a1": first.get("shortcut_median_a1"),
        "evaluations": round(explain["evaluations_per_counterfactual"], 1)
        if "evaluations_per_counterfactual" in explain
        else None,
    }


def spread(values: list) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {}
    return {"mean": round(mean(values), 3), "min": min(values), "max": max(values)}


def summarise(replicates: dict[str, dict]) -> dict:
    # teacher by teacher, the datasets in the order the files first list them (the suite's own)
    order = list(dict.fromkeys(dataset for runs in replicates.values() for dataset, _ in runs))
    keys = sorted({k for runs in replicates.values() for k in runs}, key=lambda k: (k[1], order.index(k[0])))
    table = {}
    for dataset, teacher in keys:
        per = {
            name: row(runs[(dataset, teacher)])
            for name, runs in replicates.items()
            if (dataset, teacher) in runs
        }
        table.setdefault(teacher, {})[dataset] = {
            "replicates": per,
            "worst_group": spread([r["worst_group"] for r in per.values()]),
            "gap_closed": spread([r["gap_closed"] for r in per.values()]),
        }
    acceptance = {}
    for teacher, datasets in table.items():
        for name in replicates:
            rows = [d["replicates"][name] for d in datasets.values() if name in d["replicates"]]
            acceptance.setdefault(teacher, {})[name] = {
                "datasets": len(rows),
                "mean_worst_group": round(mean(r["worst_group"] for r in rows), 3) if rows else None,
                "gap_target_met": sum((r["gap_closed"] or 0) >= GAP_TARGET[teacher] for r in rows),
                "validity_target_met": sum((r["validity_a1"] or 0) >= VALIDITY_TARGET for r in rows),
            }
    targets = {"gap_closed": GAP_TARGET, "validity_a1": VALIDITY_TARGET}
    return {"targets": targets, "teachers": table, "acceptance": acceptance}


def cell(r: dict | None) -> str:
    """One replicate's rounds -> selected (gap closed); the suite leaves the gap out where there was none."""
    if r is None:
        return "-"
    gap = "-" if r["gap_closed"] is None else f"{r['gap_closed']:.2f}"
    return f"{', '.join(f'{w:.2f}' for w in r['rounds'])} -> {r['worst_group']:.2f} ({gap})"


def markdown(summary: dict, names: list[str]) -> str:
    lines = [
        "| dataset | teacher | "
        + " | ".join(f"{n}: rounds -> selected (gap closed)" for n in names)
        + " | mean |",
        "|---|---|" + "---|" * (len(names) + 1),
    ]
    for teacher, datasets in summary["teachers"].items():
        for dataset, d in datasets.items():
            cells = [cell(d["replicates"].get(name)) for name in names]
            lines.append(
                f"| {dataset} | {teacher} | "
                + " | ".join(cells)
                + f" | {d['worst_group'].get('mean', '-')} |"
            )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--replicate",
        nargs="+",
        action="append",
        required=True,
        metavar=("NAME", "SUITE_JSON"),
        help="a replicate's name, then its suite JSONs (names in benchmarks/results or paths)",
    )
    p.add_argument("--out", default="replicates.json", help="file name in benchmarks/results")
    args = p.parse_args()
    if any(len(r) < 2 for r in args.replicate):
        p.error("--replicate needs a name and at least one suite JSON")
    replicates = {r[0]: merged(r[1:]) for r in args.replicate}
    summary = summarise(replicates) | {"sources": {r[0]: r[1:] for r in args.replicate}}
    (RESULTS / args.out).write_text(json.dumps(summary, indent=1) + "\n")
    print(markdown(summary, list(replicates)))
    for teacher, per in summary["acceptance"].items():
        for name, a in per.items():
            print(f"{teacher} {name}: {a}")


if __name__ == "__main__":
    main()
