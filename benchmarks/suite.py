"""The benchmark suite: one method, the library's defaults, on confounded datasets of different kinds.

For every dataset only the data, the image size and the classifier architecture vary; every method setting is the
library default (pipeline/config.py). Per dataset: the biased classifier and the unbiased reference (trained on a
fresh unconfounded draw), the DFR-style baseline, the explain desiderata with the **shortcut share** (change mass
inside the generator's ``shortcut_mask`` over all change mass, valid counterfactuals) and the feature share, and
CFKD with the mask oracle and with the model oracle; gap closed = (after - before) / (reference - before).

    .venv/bin/python benchmarks/suite.py                       # everything: benchmarks/results/suite.json
    .venv/bin/python benchmarks/suite.py --only stamp stain    # some datasets
    .venv/bin/python benchmarks/suite.py --classifiers-only    # biased vs reference only (minutes)
    .venv/bin/python benchmarks/suite.py --explain-only --tag edges --set explain.search.tv_edges=true

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
import yaml
from PIL import Image

from pipeline import config as cfg
from pipeline import manifest, quiet, runner
from pipeline.data import load_mask
from pipeline.errors import Interrupted, stop_on_signals
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
    # 2,000 images: with 900 the unconfounded reference underfits the textures (0.83 / 0.55)
    "stamp": Case("stamp", 1.0, 1 / 3, n=2000),
    "stain": Case("stain", 1.0, 0.5),
    "stamp-partial": Case("stamp", 0.9, 1 / 3, n=2000),  # partly confounded: evidence and shortcut both pay
    # the texture faint: the biased classifier reads the watermark alone (unconfounded test accuracy near a third),
    # so the smallest edit that flips it is the glyph's
    "stamp-alone": Case("stamp", 1.0, 1 / 3, n=2000, extra={"contrast": 0.15}),
    # a shortcut present or absent (not one of several values), anywhere along the edge
    "ruler": Case("ruler", 1.0, 0.5),
}


def tagged_runs(tag: str, only: list[str] | None = None):
    """(dataset-teacher, run dir) of every finished or partial suite run with this tag (of the ``only`` datasets)."""
    for run_dir in sorted((ROOT / "runs" / "suite").glob(f"suite-*-{tag}")):
        name = run_dir.name.removeprefix("suite-").removesuffix(f"-{tag}")
        if not only or name.rsplit("-", 1)[0] in only:
            yield name, run_dir


def generate(case: Case, out: Path, poison: float, seed: int) -> None:
    if not out.exists():
        config_class, write, _ = GENERATORS[case.kind]
        write(out, config_class(n=case.n, poison=poison, seed=seed, **case.extra))


def run_config(
    name: str, case: Case, data: Path, reference: Path, teacher: str, explain: bool, overrides: dict
) -> cfg.RunConfig:
    raw: dict = {
        "name": f"suite-{name}-{teacher}",
        "data": {"root": str(data), "image_size": case.image_size},
        "classifier": {"arch": case.arch},
        "reference": {"root": str(reference)},
        "feedback": {"teacher": teacher},
        "explain": {"enabled": explain},
    }
    for key, value in overrides.items():  # the same method change for every dataset (an ablation)
        *sections, leaf = key.split(".")
        node = raw
        for section in sections:
            node = node.setdefault(section, {})
        node[leaf] = value
    return cfg.from_dict(raw)


def parse_overrides(pairs: list[str]) -> dict:
    """--set explain.search.tv=0 feedback.oracle=intervention: values parsed as YAML scalars."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set {pair}: expected KEY=VALUE")
        out[key] = yaml.safe_load(value)
    return out


SHARED = ("data", "classifier", "reference", "evaluate", "dfr", "explain")  # stages an ablation may reuse


def seed_from(base: Path, run_dir: Path) -> None:
    """A new run (another teacher, an ablation's tag) starts from the dataset's first run's stages up to the first
    explain: the runner keeps those whose fingerprint still matches the new config and redoes the rest."""
    if run_dir.exists() or run_dir == base or not base.is_dir():
        return
    run_dir.mkdir(parents=True)
    for name in SHARED:
        if (base / name).is_dir():
            shutil.copytree(base / name, run_dir / name)


def changes(folder: Path, rows: pd.DataFrame):
    """Per manifest row, the row and its counterfactual's absolute change (H, W), summed over channels, as saved."""
    for row in rows.itertuples():
        cf, original = (
            np.asarray(Image.open(folder / p).convert("RGB"), float)
            for p in (row.counterfactual, row.original)
        )
        yield row, np.abs(cf - original).sum(-1)


def shares(run_dir: Path, data_root: Path, resize: str) -> dict:
    """Shortcut share and feature share of the valid counterfactuals of every round: the mean over all attempts
    and the median over first attempts (the acceptance figure: the first attempt is the smallest edit)."""
    table = pd.read_csv(data_root / "metadata.csv", dtype=str, keep_default_na=False).set_index("path")
    out = {}
    for r, folder in manifest.rounds(run_dir).items():
        valid = manifest.flipped(manifest.read(folder / manifest.NAME))
        values = {"shortcut": [], "feature": []}
        first = {"shortcut": [], "feature": []}
        by_attempt: dict[int, list] = {}
        for row, change in changes(folder, valid):
            total = change.sum()
            if total <= 0:
                continue
            for key, column in (("shortcut", "shortcut_mask"), ("feature", "feature_mask")):
                rel = table.loc[row.source_path, column]
                mask = load_mask(data_root / rel, list(change.shape), resize)
                share = float((change * mask).sum() / total)
                values[key].append(share)
                if int(row.attempt) == 1:
                    first[key].append(share)
                if key == "shortcut":
                    by_attempt.setdefault(int(row.attempt), []).append(share)
        mean = {k: round(float(np.mean(v)), 3) if v else None for k, v in values.items()}
        median = {f"{k}_median_a1": round(float(np.median(v)), 3) if v else None for k, v in first.items()}
        attempts = {str(a): round(float(np.median(v)), 3) for a, v in sorted(by_attempt.items())}
        out[f"round_{r}"] = mean | median | {"shortcut_median_by_attempt": attempts, "valid": int(len(valid))}
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
        keys = (
            "validity",
            "validity_by_attempt",
            "realism",
            "counterfactuals",
            "evaluations_per_counterfactual",
        )
        result["explain"] = {k: metrics["explain"].get(k) for k in keys}
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
    p.add_argument("--explain-only", action="store_true", help="classifiers and round 1's explain, no CFKD")
    p.add_argument("--tag", default="")
    p.add_argument(
        "--set",
        nargs="*",
        action="extend",  # --set a=1 --set b=2 keeps both (a plain store would keep only the last)
        default=[],
        metavar="KEY=VALUE",
        help="method change for every dataset",
    )
    args = p.parse_args()
    quiet.configure(False)
    work = ROOT / "runs" / "suite"
    overrides = parse_overrides(args.set) | ({"distil.enabled": False} if args.explain_only else {})
    results = {"classifiers_only": args.classifiers_only, "overrides": overrides, "datasets": {}}
    started = time.perf_counter()
    try:
        with stop_on_signals():
            run_cases(args, overrides, results, work)
    except Interrupted as stop:
        print(f"interrupted ({stop}); rerun with --keep to resume", file=sys.stderr)
        return stop.exit_code
    results["wall_seconds"] = round(time.perf_counter() - started, 1)
    out = HERE / "results" / (f"suite-{args.tag}.json" if args.tag else "suite.json")
    out.write_text(json.dumps(results, indent=2) + "\n")
    if not args.classifiers_only:
        plot(results, out.with_suffix(".png"))
    print(table(results))
    return 0


def run_cases(args, overrides: dict, results: dict, work: Path) -> None:
    """Every dataset and teacher the arguments name, one run each, summaries into ``results``."""
    teachers = args.teachers[:1] if args.classifiers_only else args.teachers
    for name in args.only or list(CASES):
        case = CASES[name]
        data, reference = work / "data" / name, work / "data" / f"{name}-unconfounded"
        generate(case, data, case.poison, seed=0)
        generate(case, reference, case.unconfounded, seed=1)
        for teacher in teachers:
            config = run_config(name, case, data, reference, teacher, not args.classifiers_only, overrides)
            run_dir = work / (f"{config.name}-{args.tag}" if args.tag else config.name)
            if not args.keep:
                shutil.rmtree(run_dir, ignore_errors=True)
            # the first run of this dataset in this suite (another teacher's) shares its round-1 explain, else the
            # dataset's first suite run its classifiers
            first = work / (
                f"suite-{name}-{teachers[0]}-{args.tag}" if args.tag else f"suite-{name}-{teachers[0]}"
            )
            seed_from(first if first.is_dir() else work / f"suite-{name}-mask", run_dir)
            begun = time.perf_counter()
            prefix = f"[{name}/{teacher}]"
            runner.run(config, run_dir, log=lambda line, prefix=prefix: print(prefix, line, flush=True))
            metrics = json.loads((run_dir / "metrics.json").read_text())
            summary = summarise(name, metrics, run_dir, data, config) | {
                "seconds": round(time.perf_counter() - begun, 1)
            }
            results["datasets"].setdefault(name, {})[teacher] = summary


def plot(results: dict, path: Path) -> None:
    """Worst-group accuracy per dataset: biased, DFR-style baseline, CFKD per teacher, reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["datasets"])
    bars = ["before", "dfr", *(f"cfkd {t}" for t in ("mask", "model")), "reference"]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(names) + 2), 3.4))
    width = 0.8 / len(bars)
    for j, bar in enumerate(bars):
        values = []
        for name in names:
            by_teacher = results["datasets"][name]
            first = next(iter(by_teacher.values()))
            if bar.startswith("cfkd"):
                got = (by_teacher.get(bar.split()[1]) or {}).get("cfkd")
            else:
                got = first.get(bar)
            values.append(got["worst_group_accuracy"] if got else np.nan)
        ax.bar(np.arange(len(names)) + (j - len(bars) / 2 + 0.5) * width, values, width, label=bar)
    ax.set_xticks(np.arange(len(names)), names)
    ax.set_ylabel("worst-group accuracy")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7, ncol=len(bars), loc="upper center", bbox_to_anchor=(0.5, 1.16), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(results: dict) -> str:
    head = (
        "| dataset | teacher | before | reference | DFR | CFKD | gap closed (worst group) | validity a1 | "
        "shortcut share a1 (median) | evaluations / CF |"
    )
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    fmt = lambda m: f"{m['accuracy']:.3f} / {m['worst_group_accuracy']:.3f}" if m else "-"  # noqa: E731
    for name, by_teacher in results["datasets"].items():
        for teacher, r in by_teacher.items():
            share = (r.get("shares") or {}).get("round_1", {}).get("shortcut_median_a1")
            ex = r.get("explain") or {}
            valid = (ex.get("validity_by_attempt") or {}).get("1")
            cells = [
                name,
                teacher,
                fmt(r["before"]),
                fmt(r["reference"]),
                fmt(r.get("dfr")),
                fmt(r.get("cfkd")),
                (r.get("cfkd") or {}).get("gap_closed_worst_group", "-"),
                f"{valid:.2f}" if valid is not None else "-",
                share if share is not None else "-",
                f"{ex['evaluations_per_counterfactual']:.0f}"
                if ex.get("evaluations_per_counterfactual")
                else "-",
            ]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
