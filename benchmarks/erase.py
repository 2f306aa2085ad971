"""Probe: erase the spurious directions from the classifier's head instead of (or after) fine-tuning on them.

For each suite dataset, the spurious counterfactuals of round 1 give feature differences f(counterfactual) -
f(original) at the classifier's last linear layer; their top principal directions span what the edits moved. The
head W becomes W (I - V V^T): no logit reads those directions, for every image, not only the edited ones. Variants:
from the biased classifier or from the round-1 fine-tune, with or without refitting the head (logistic regression on
projected, class-balanced training features). Needs the suite's runs (benchmarks/suite.py).

    .venv/bin/python benchmarks/erase.py [--only square stain] [--k 1 2 4]
    .venv/bin/python benchmarks/erase.py --erase-first --tag order   # erase, then fine-tune

Writes benchmarks/results/erase.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from pipeline import distil, erase, models, quiet
from pipeline.config import DistilConfig
from pipeline.data import load_folder
from pipeline.evaluate import evaluate

HERE = Path(__file__).resolve().parent
WORK = HERE.parent / "runs" / "suite"


def directions(diff: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    """The top k right singular vectors of the differences (k, d), and the share of their squared norm they hold."""
    _, s, vt = np.linalg.svd(diff, full_matrices=False)
    return vt[:k], float(np.sum(s[:k] ** 2) / np.sum(s**2))


def erased(model, v: np.ndarray, refit: bool, data=None, card=None):
    """A copy of ``model`` with ``v`` projected out of its head: as is, or refitted by the library's erase."""
    out = copy.deepcopy(model)
    if refit:
        erase.project_out(out, card, data, v)
        return out
    head = out.get_submodule(models.last_linear(out))
    with torch.no_grad():
        head.weight.copy_(head.weight @ (torch.eye(v.shape[1]) - torch.from_numpy(v.T @ v).float()))
    return out


def score(model, card, data) -> dict:
    m, _ = evaluate(model, card, data)
    return {"accuracy": round(m["accuracy"], 3), "worst_group_accuracy": round(m["worst_group_accuracy"], 3)}


def probe(name: str, ks: list[int]) -> dict:
    run_dir = WORK / f"suite-{name}-mask"
    data = load_folder(WORK / "data" / name)
    table = distil.training_data(run_dir, [1], False)
    spurious = table[table["verdict"] == "spurious"]
    result = {"spurious": len(spurious)}
    for start in ("classifier", "distil_r1"):
        model, card = models.load(run_dir / start)
        model.eval()
        result[start] = {"as_is": score(model, card, data)}
        if spurious.empty:
            continue
        change = erase.feature_change(model, card, spurious, run_dir)
        none = np.zeros((0, change.shape[1]), np.float32)
        result[start]["refit_only"] = score(erased(model, none, True, data, card), card, data)
        for k in ks:
            v, held = directions(change, k)
            result[start][f"erase_{k}"] = score(erased(model, v, False), card, data) | {
                "energy": round(held, 3)
            }
            result[start][f"erase_{k}_refit"] = score(erased(model, v, True, data, card), card, data)
        print(name, start, json.dumps(result[start]), flush=True)
    return result


def erase_first(name: str) -> dict:
    """The other order: the library's erase (true-edit rule included) on the explained classifier, then the
    library's fine-tune from the erased weights, against the default order (fine-tune, then erase)."""
    run_dir = WORK / f"suite-{name}-mask"
    data = load_folder(WORK / "data" / name)
    table = distil.training_data(run_dir, [1], False)
    both = distil.training_data(run_dir, [1], True)
    evidence = both[both["verdict"] == "true"]
    model, card = models.load(run_dir / "classifier")
    v = erase.spurious_directions(model.eval(), card, table, run_dir, 1, evidence)
    if len(v):
        erase.project_out(model, card, data, v)
    erased_only = score(model, card, data)
    with tempfile.TemporaryDirectory() as out:
        distil.fine_tune(model, card, data, table, table.iloc[:0], run_dir, DistilConfig(erase=0), Path(out))
    result = {"erased": len(v), "erase": erased_only, "erase_then_fine_tune": score(model.eval(), card, data)}
    print(name, json.dumps(result), flush=True)
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="*", default=["square", "shapes", "stamp", "stain", "stamp-partial"])
    p.add_argument("--k", nargs="*", type=int, default=[1, 2, 4])
    p.add_argument("--tag", default="")
    p.add_argument("--erase-first", action="store_true", help="only the erase-then-fine-tune order")
    args = p.parse_args()
    quiet.configure(False)
    run = erase_first if args.erase_first else lambda name: probe(name, args.k)
    out = {name: run(name) for name in args.only if (WORK / f"suite-{name}-mask").is_dir()}
    path = HERE / "results" / (f"erase-{args.tag}.json" if args.tag else "erase.json")
    path.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
