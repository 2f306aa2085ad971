"""CFKD on the embedded default (Square, fully confounded): the whole `cfkd run` from an empty run directory,
once with the mask oracle and once with the model oracle, each in its own process (wall time and peak memory
of the process tree). The DFR-style baseline and the reference come from the same runs.

Writes benchmarks/results/cfkd.json (with --tag T: cfkd-T.json, a variant given by --config).

    .venv/bin/python benchmarks/cfkd.py [--teachers mask model] [--keep] [--config FILE --tag T]
    .venv/bin/python benchmarks/cfkd.py --teachers mask --explain-seed 1 --tag explain-seed-1

--explain-seed N runs the same config with explain.seed N: every round explains other training images, which measures
how much the result depends on which images were explained.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from pipeline import config as cfg
from pipeline.rounds import judged

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def run(teacher: str, keep: bool, config: str | None = None, tag: str = "") -> dict:
    run_dir = ROOT / "runs" / (f"bench-cfkd-{tag}-{teacher}" if tag else f"bench-cfkd-{teacher}")
    if not keep:
        shutil.rmtree(run_dir, ignore_errors=True)
    command = [sys.executable, "-m", "pipeline.cli", "run", "--teacher", teacher, "--run-dir", str(run_dir)]
    command += ["--config", config] if config else []
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB, the largest child so far
    metrics = json.loads((run_dir / "metrics.json").read_text())
    rounds = metrics.get("rounds", [])
    closing = metrics.get("closing")
    # the run's result: the label-free choice (distil.select), else the last round's classifier
    result = metrics.get("selected") or (rounds[-1] if rounds else {})
    fa = [r["feedback_accuracy"] for r in judged(metrics)]
    acc = [metrics["classifier"]["accuracy"], *(r["test_accuracy"] for r in rounds)][: len(fa)]
    return {
        "teacher": teacher,
        "wall_seconds": round(seconds, 1),
        "peak_rss_gb": round(max(peak, before) / 2**20, 2),
        "before": {k: metrics["classifier"][k] for k in ("accuracy", "worst_group_accuracy")},
        "reference": {k: metrics["reference"][k] for k in ("accuracy", "worst_group_accuracy")},
        "dfr": {k: metrics["dfr"][k] for k in ("accuracy", "worst_group_accuracy", "gain")},
        "rounds": [
            {
                k: r[k]
                for k in (
                    "round",
                    "flip_rate",
                    "feedback_accuracy",
                    "labels",
                    "test_accuracy",
                    "worst_group_accuracy",
                    "gain",
                )
            }
            | {"counterfactuals_train": r["training"].get("counterfactuals_train", 0)}
            for r in rounds
        ],
        "closing_feedback_accuracy": closing["feedback_accuracy"] if closing else None,
        "selected": metrics.get("selected"),
        "best_round_by_test_accuracy": max(
            (r["round"] for r in rounds), key=lambda n: rounds[n - 1]["test_accuracy"], default=None
        ),
        # feedback accuracy of a round judges the classifier that round explained (the one before it)
        "feedback_accuracy_vs_test_accuracy": list(zip(fa, acc)),
        "acceptance": {
            "test_accuracy_ge_0.95": result.get("test_accuracy", 0) >= 0.95,
            "worst_group_ge_0.85": result.get("worst_group_accuracy", 0) >= 0.85,
            "within_15_minutes": seconds <= 900,
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teachers", nargs="+", default=["mask", "model"])
    parser.add_argument("--keep", action="store_true", help="reuse finished stages of earlier benchmark runs")
    parser.add_argument("--config", help="a run config instead of the embedded default (a variant)")
    parser.add_argument("--tag", default="", help="names the variant's run folders and result file")
    parser.add_argument("--explain-seed", type=int, help="the config with this explain.seed (other images)")
    args = parser.parse_args()
    if (args.config or args.explain_seed is not None) and not args.tag:
        parser.error("--config and --explain-seed need --tag (the default's results stay in cfkd.json)")
    if args.explain_seed is not None:
        config = cfg.load(args.config)
        config = replace(config, explain=replace(config.explain, seed=args.explain_seed))
        (ROOT / "runs").mkdir(exist_ok=True)
        args.config = str(ROOT / "runs" / f"bench-cfkd-{args.tag}.yaml")
        cfg.dump(config, Path(args.config))
    results = {
        "benchmark": "cfkd: whole default run per simulated teacher",
        "config": args.config,
        "explain_seed": args.explain_seed,
        "runs": [],
    }
    for teacher in args.teachers:
        results["runs"].append(run(teacher, args.keep, args.config, args.tag))
        print(json.dumps(results["runs"][-1], indent=1), flush=True)
    (HERE / "results").mkdir(exist_ok=True)
    name = f"cfkd-{args.tag}.json" if args.tag else "cfkd.json"
    (HERE / "results" / name).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
