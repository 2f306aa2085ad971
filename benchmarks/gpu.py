"""The demo's stages on one GPU: seconds per counterfactual (explain), distil seconds per epoch, peak GPU memory.

Runs the embedded default (`cfkd run`'s config, mask teacher) in this process with every stage on the GPU
(distil in bf16 where the GPU supports it), then explains round 1 once more with the same seed and counts the
counterfactuals whose bytes differ, and writes benchmarks/results/gpu.json. Without a CUDA GPU it says so and
writes nothing.

    .venv/bin/python benchmarks/gpu.py [--rounds 2] [--run-dir runs/bench-gpu]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from pipeline import config as cfg
from pipeline import explain, manifest, quiet, runner
from pipeline.data import load_folder
from pipeline.rundir import read_json

HERE = Path(__file__).resolve().parent


def on_gpu(rounds: int) -> cfg.RunConfig:
    raw = cfg.to_dict(cfg.load(None))
    for section in ("classifier", "explain", "distil"):
        raw[section] |= {"accelerator": "gpu", "devices": 1}
    raw["distil"] |= {"rounds": rounds, "select": False}
    return cfg.from_dict(raw)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2)  # 2: the erase round and a fine-tune round
    p.add_argument("--run-dir", default="runs/bench-gpu")
    p.add_argument("--out", default=str(HERE / "results" / "gpu.json"))
    args = p.parse_args()
    if not torch.cuda.is_available():
        print(
            "no CUDA GPU on this machine: benchmarks/gpu.py measures GPU runs only; skipped", file=sys.stderr
        )
        return 0
    quiet.configure(False)
    run_dir = Path(args.run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    runner.run(on_gpu(args.rounds), run_dir, log=lambda line: print(line, flush=True))
    wall = time.perf_counter() - started
    result = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "bf16": torch.cuda.is_bf16_supported(),
        "rounds": args.rounds,
        "wall_seconds": round(wall, 1),
        "fine_tune_precision": "bf16-mixed" if torch.cuda.is_bf16_supported() else "32-true",
        "peak_gpu_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 3),
    } | stages(run_dir, args.rounds)
    result["same_seed_again"] = explain_again(on_gpu(args.rounds), run_dir)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


def explain_again(config: cfg.RunConfig, run_dir: Path) -> dict:
    """Round 1's explain stage once more, same classifier and seed: how many counterfactuals differ in a byte."""
    first, again = run_dir / manifest.folder(1), run_dir / "explain_again"
    explain.run(
        run_dir / "classifier", load_folder(run_dir / "data"), config.explain, config.generator, again
    )
    table = manifest.read(first / "manifest.csv")
    differ = [
        rel for rel in table["counterfactual"] if (first / rel).read_bytes() != (again / rel).read_bytes()
    ]
    return {"counterfactuals": len(table), "differing": len(differ)}


def stages(run_dir: Path, rounds: int) -> dict:
    """What a finished run's directory says about its explain and distil stages and its accuracy."""
    explained = read_json(run_dir / "explain" / "desiderata.json")
    # staged distillation: round 1 erases in feature space, later rounds fine-tune every layer (epochs, bf16)
    distilled = [
        json.loads((run_dir / f"distil_r{r}" / "card.json").read_text())["metrics"]
        for r in range(1, rounds + 1)
    ]
    metrics = read_json(run_dir / "metrics.json")
    return {
        "explain": {
            "counterfactuals": explained["counterfactuals"],
            "seconds": explained["wall_seconds"],
            "seconds_per_counterfactual": round(explained["wall_seconds"] / explained["counterfactuals"], 4),
            "validity": explained["validity"],
        },
        "distil": [
            {
                "round": r,
                "seconds": m.get("seconds"),
                "epochs": m.get("epochs"),
                "seconds_per_epoch": round(m["seconds"] / m["epochs"], 2) if m.get("epochs") else None,
            }
            for r, m in enumerate(distilled, 1)
        ],
        "before": {k: metrics["classifier"][k] for k in ("accuracy", "worst_group_accuracy")},
        "after": [
            {k: r[k] for k in ("test_accuracy", "worst_group_accuracy")} for r in metrics["rounds"][:rounds]
        ],
    }


if __name__ == "__main__":
    sys.exit(main())
