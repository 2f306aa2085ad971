"""The benchmark suite: one method, the library's defaults, on confounded datasets of different kinds.

For every dataset only the data, the image size and the classifier architecture vary; every method setting is the
library default (pipeline/config.py). Per dataset: the biased classifier and the unbiased reference (trained on a
fresh unconfounded draw), the DFR-style baseline, the explain desiderata with the **shortcut share** (change mass
inside the generator's ``shortcut_mask`` over all change mass, valid counterfactuals) and the feature share, and
CFKD with the mask oracle and with the model oracle; gap closed = (after - before) / (reference - before).

    .venv/bin/python benchmarks/suite.py                       # everything: benchmarks/results/suite.json
    .venv/bin/python benchmarks/suite.py --only stamp stain    # some datasets
    .venv/bin/python benchmarks/suite.py --classifiers-only    # biased vs reference only (minutes)

Writes benchmarks/results/suite.json (with --tag T: suite-T.json) and prints a markdown table for RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from pipeline import config as cfg
from pipeline import manifest, quiet, runner
from pipeline.data import load_mask
from pipeline.generators import GENERATORS

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


@dataclass(frozen=True)
class Case:
    """A dataset of the suite: how to generate it, and the only settings that may differ per dataset."""

    kind: str
    poison: float
    unconfounded: float  # the reference's poison (1 / number of confounder values)
    image_size: int | list = 64
    arch: str = "small_cnn"
    n: int = 900
    extra: dict = field(default_factory=dict)


CASES = {
    "square": Case("square", 1.0, 0.5, n=2000),
    # the object at a third of Shapes' default brightness: subtle enough that a classifier prefers the tag
    "shapes": Case("shapes", 1.0, 1 / 3, image_size=[48, 64], extra={"contrast": 0.35}),
    "stamp": Case("stamp", 1.0, 1 / 3),
    "stain": Case("stain", 1.0, 0.5),
    "stamp-partial": Case("stamp", 0.9, 1 / 3),  # partly confounded: evidence and shortcut both pay
}


def generate(case: Case, out: Path, poison: float, seed: int) -> None:
    if not out.exists():
        config_class, write, _ = GENERATORS[case.kind]
        write(out, config_class(n=case.n, poison=poison, seed=seed, **case.extra))


def run_config(
    name: str, case: Case, data: Path, reference: Path, teacher: str, explain: bool
) -> cfg.RunConfig:
    raw = {
        "name": f"suite-{name}-{teacher}",
        "data": {"root": str(data), "image_size": case.image_size},
        "classifier": {"arch": case.arch},
        "reference": {"root": str(reference)},
        "feedback": {"teacher": teacher},
        "explain": {"enabled": explain},
    }
    return cfg.from_dict(raw)


def shares(run_dir: Path, data_root: Path, resize: str) -> dict:
    """Mean shortcut share and feature share of the valid counterfactuals of every round."""
    table = pd.read_csv(data_root / "metadata.csv", dtype=str, keep_default_na=False).set_index("path")
    out = {}
    for r, folder in manifest.rounds(run_dir).items():
        valid = manifest.flipped(manifest.read(folder / manifest.NAME))
        values = {"shortcut": [], "feature": []}
        for row in valid.itertuples():
            cf, original = (
                np.asarray(Image.open(folder / p).convert("RGB"), float)
                for p in (row.counterfactual, row.original)
            )
            change = np.abs(cf - original).sum(-1)
            total = change.sum()
            if total <= 0:
                continue
            for key, column in (("shortcut", "shortcut_mask"), ("feature", "feature_mask")):
                rel = table.loc[row.source_path, column]
                mask = load_mask(data_root / rel, list(change.shape), resize)
                values[key].append(float((change * mask).sum() / total))
        out[f"round_{r}"] = {k: round(float(np.mean(v)), 3) if v else None for k, v in values.items()} | {
            "valid": int(len(valid))
        }
    return out


def summarise(name: str, metrics: dict, run_dir: Path, data: Path, config: cfg.RunConfig) -> dict:
    pick = lambda m: {k: m[k] for k in ("accuracy", "worst_group_accuracy")}  # noqa: E731
    result = {"before": pick(metrics["classifier"]), "reference": pick(metrics["reference"])}
    if metrics.get("dfr"):
        result["dfr"] = pick(metrics["dfr"]) | {"gain": metrics["dfr"].get("gain")}
    if metrics.get("rounds"):
        chosen = metrics.get("selected") or metrics["rounds"][-1]
        result["cfkd"] = {
            "model": chosen["model"],
            "accuracy": chosen["test_accuracy"],
            "worst_group_accuracy": chosen["worst_group_accuracy"],
            "rounds": [
                {k: r[k] for k in ("test_accuracy", "worst_group_accuracy", "labels", "feedback_accuracy")}
                for r in metrics["rounds"]
            ],
        }
        gap = metrics["reference"]["worst_group_accuracy"] - metrics["classifier"]["worst_group_accuracy"]
        gain = chosen["worst_group_accuracy"] - metrics["classifier"]["worst_group_accuracy"]
        result["cfkd"]["gap_closed_worst_group"] = round(gain / gap, 3) if abs(gap) > 1e-9 else None
    if metrics.get("explain"):
        result["explain"] = {k: metrics["explain"].get(k) for k in ("validity", "realism", "counterfactuals")}
        result["shares"] = shares(run_dir, data, config.data.resize)
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="*", choices=list(CASES), help="datasets (default: all)")
    p.add_argument("--teachers", nargs="*", default=["mask", "model"], choices=["mask", "model"])
    p.add_argument(
        "--classifiers-only", action="store_true", help="no explain, no CFKD: before and reference"
    )
    p.add_argument("--keep", action="store_true", help="reuse finished stages of earlier suite runs")
    p.add_argument("--tag", default="")
    args = p.parse_args()
    quiet.configure(False)
    work = ROOT / "runs" / "suite"
    results = {"classifiers_only": args.classifiers_only, "datasets": {}}
    started = time.perf_counter()
    teachers = args.teachers[:1] if args.classifiers_only else args.teachers
    for name in args.only or list(CASES):
        case = CASES[name]
        data, reference = work / "data" / name, work / "data" / f"{name}-unconfounded"
        generate(case, data, case.poison, seed=0)
        generate(case, reference, case.unconfounded, seed=1)
        for teacher in teachers:
            config = run_config(name, case, data, reference, teacher, not args.classifiers_only)
            run_dir = work / config.name
            if not args.keep:
                shutil.rmtree(run_dir, ignore_errors=True)
            begun = time.perf_counter()
            prefix = f"[{name}/{teacher}]"
            runner.run(config, run_dir, log=lambda line, prefix=prefix: print(prefix, line, flush=True))
            metrics = json.loads((run_dir / "metrics.json").read_text())
            summary = summarise(name, metrics, run_dir, data, config) | {
                "seconds": round(time.perf_counter() - begun, 1)
            }
            results["datasets"].setdefault(name, {})[teacher] = summary
    results["wall_seconds"] = round(time.perf_counter() - started, 1)
    out = HERE / "results" / (f"suite-{args.tag}.json" if args.tag else "suite.json")
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    return 0


def table(results: dict) -> str:
    lines = [
        "| dataset | teacher | before | reference | DFR | CFKD | gap closed (worst group) | shortcut share r1 |"
    ]
    lines.append("|---|---|---|---|---|---|---|---|")
    fmt = lambda m: f"{m['accuracy']:.3f} / {m['worst_group_accuracy']:.3f}" if m else "-"  # noqa: E731
    for name, by_teacher in results["datasets"].items():
        for teacher, r in by_teacher.items():
            share = (r.get("shares") or {}).get("round_1", {}).get("shortcut")
            lines.append(
                f"| {name} | {teacher} | {fmt(r['before'])} | {fmt(r['reference'])} | {fmt(r.get('dfr'))} | "
                f"{fmt(r.get('cfkd'))} | {(r.get('cfkd') or {}).get('gap_closed_worst_group', '-')} | "
                f"{share if share is not None else '-'} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
