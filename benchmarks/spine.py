"""Benchmark of the spine: run the embedded default end to end and check the shortcut is really taken.

Writes benchmarks/results/spine.json: wall time, peak memory, the classifiers' numbers and the acceptance checks
(biased: train acc >= 0.95, unbiased test acc >= 25 points below the reference, worst-group <= 0.3;
reference: unbiased test acc >= 0.95).

    .venv/bin/python benchmarks/spine.py [--run-dir runs/bench-spine]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default="runs/bench-spine")
    parser.add_argument("--out", default=str(HERE / "results" / "spine.json"))
    args = parser.parse_args()
    run_dir = Path(args.run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)

    started = time.perf_counter()
    cfkd = Path(sys.executable).with_name("cfkd")
    subprocess.run([str(cfkd), "run", "--run-dir", str(run_dir)], check=True)
    wall = time.perf_counter() - started
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # Linux reports KiB

    metrics = json.loads((run_dir / "metrics.json").read_text())
    biased, reference = metrics["classifier"], metrics["reference"]
    gap = reference["accuracy"] - biased["accuracy"]
    checks = {
        "biased_train_accuracy_ge_0.95": biased["training"]["train_acc"] >= 0.95,
        "biased_test_accuracy_25_points_below_reference": gap >= 0.25,
        "biased_worst_group_le_0.3": biased["worst_group_accuracy"] <= 0.3,
        "reference_test_accuracy_ge_0.95": reference["accuracy"] >= 0.95,
    }
    result = {
        "benchmark": "spine: cfkd run on the embedded default",
        "machine": {
            "cpus": torch.get_num_threads(),
            "platform": platform.platform(),
            "torch": torch.__version__,
        },
        "wall_seconds": round(wall, 1),
        "peak_rss_mib": round(peak_mib),
        "stage_seconds": {
            name: metrics[name]["training"].get("seconds") for name in ("classifier", "reference")
        },
        "biased": {
            "train_accuracy": biased["training"]["train_acc"],
            "val_accuracy": biased["training"]["val_acc"],
            "test_accuracy": biased["accuracy"],
            "worst_group": biased["worst_group"],
            "worst_group_accuracy": biased["worst_group_accuracy"],
        },
        "reference": {
            "train_accuracy": reference["training"]["train_acc"],
            "test_accuracy": reference["accuracy"],
            "worst_group_accuracy": reference["worst_group_accuracy"],
        },
        "gap_points": round(100 * gap, 1),
        "checks": checks,
        "passed": all(checks.values()),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
