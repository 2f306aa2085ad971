"""Replay finished suite runs' distil stages under other rules for what the erase spares (benchmarks/suite.py runs).

Every round of a run is distilled again from the run's own counterfactuals and verdicts (the classifiers it
explained stay as they were, so the rules are compared on the same inputs: a paired comparison without the
search's run-to-run noise). What each round erases, by rule:

- ``spare``: the spurious edits' principal direction less its part in what the edits judged true moved (a direction
  lying mostly there is kept unless ``erase_vote`` says otherwise), in every round;
- ``own`` (the library's rule): the same, except in the erase-alone round, whose features are those of the
  classifier the edits were searched on: there the direction is erased whole;
- ``never``: the direction erased whole in every round;
- ``contrast``: the direction along which spurious edits move most relative to the true ones (generalised
  eigenvector of the two second-moment matrices, the true one shrunk toward the identity by ``--shrink``).

    .venv/bin/python benchmarks/erase_rules.py --tag 3r-today [--only stamp-partial] [--rounds 1]

Writes benchmarks/results/erase-rules-TAG.json, after every round (a rerun adds what it lacks): accuracy and worst
group of every round under every rule, and per run how much of the round-1 edits' main direction lies in the
explained classifier's decision subspace (``decision_share``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import scipy.linalg
from suite import tagged_runs

from pipeline import config as cfg
from pipeline import distil, erase, models, quiet, rounds
from pipeline.data import load_folder
from pipeline.evaluate import evaluate

HERE = Path(__file__).resolve().parent
RULES = ("spare", "own", "never", "contrast")


def contrast_directions(shrink: float):
    """A spurious_directions() that returns the generalised eigenvector of (spurious, true + shrink * I)."""
    library = erase.spurious_directions

    def directions(model, card, table, folder, k, evidence=None, vote=False):
        if evidence is None or len(evidence) < 2:
            return library(model, card, table, folder, k)
        moved = erase.feature_change(model, card, table[table["verdict"] == "spurious"], folder)
        true = erase.feature_change(model, card, evidence, folder)
        spurious_moment, true_moment = moved.T @ moved / len(moved), true.T @ true / len(true)
        scale = shrink * np.trace(spurious_moment) / len(spurious_moment)
        _, vectors = scipy.linalg.eigh(spurious_moment, true_moment + scale * np.eye(len(true_moment)))
        top = vectors[:, ::-1][:, :k].T
        return erase.orthonormal(top / np.linalg.norm(top, axis=1, keepdims=True))

    return directions


def decision_share(run_dir: Path) -> dict:
    """How much of the round-1 edits' principal direction, per verdict, lies in the explained classifier's decision
    subspace (the span of its head's centred class rows): the norm of its projection there (a random direction of d
    features: about sqrt((classes - 1) / d))."""
    model, card = models.load(run_dir / "classifier")
    model.eval()
    rows = model.get_submodule(models.last_linear(model)).weight.detach().double().numpy()
    basis = np.linalg.qr((rows - rows.mean(0)).T)[0][:, : len(card.classes) - 1]
    labelled = distil.training_data(run_dir, [1], use_true=True)
    out = {"random": round(float(np.sqrt(basis.shape[1] / basis.shape[0])), 3)}
    for verdict in ("spurious", "true"):
        edits = labelled[labelled["verdict"] == verdict]
        if len(edits) >= 2:
            change = erase.feature_change(model, card, edits, run_dir)
            top = np.linalg.svd(change, full_matrices=False)[2][0]
            out[verdict] = round(float(np.linalg.norm(top @ basis)), 3)
    return out


def with_evidence(directions, evidence):
    """A spurious_directions() that is handed ``evidence`` (or None) whatever the distil stage would pass."""

    def patched(model, card, table, folder, k, _=None, vote=False):
        return directions(model, card, table, folder, k, evidence, vote)

    return patched


def replay(run_dir: Path, r: int, rule: str, shrink: float) -> dict:
    """Round r of the run distilled again by the library's distil stage, its erase rule replaced by ``rule`` (``own``
    is the stage as it is): accuracy, worst group, directions erased."""
    config = cfg.load(run_dir / "config.yaml")
    explained = "classifier" if r == 1 else f"distil_r{r - 1}"
    taught = rounds.taught(config.distil, r)
    true = distil.training_data(run_dir, taught, use_true=True).query("verdict == 'true'")
    patched = {
        "spare": with_evidence(erase.spurious_directions, true),
        "never": with_evidence(erase.spurious_directions, None),
        "contrast": with_evidence(contrast_directions(shrink), true),
    }
    data = load_folder(Path(config.data.root))
    library = erase.spurious_directions
    erase.spurious_directions = patched.get(rule, library)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            start = run_dir / rounds.start(config.distil, explained)
            distil.stage(run_dir, taught, start, run_dir / explained, data, config.distil, out)
            model, card = models.load(out)
            tested, _ = evaluate(model.eval(), card, data)
    finally:
        erase.spurious_directions = library
    if "skipped" in card.metrics:
        return {"skipped": card.metrics["skipped"]}
    return {
        "accuracy": round(tested["accuracy"], 4),
        "worst_group_accuracy": round(tested["worst_group_accuracy"], 4),
        "erased_directions": card.metrics.get("erased_directions", 0),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tag", required=True, help="the suite runs' tag (runs/suite/suite-NAME-TEACHER-TAG)")
    p.add_argument("--only", nargs="*", help="datasets (default: every run with that tag)")
    p.add_argument("--rounds", nargs="*", type=int, default=[1, 2, 3])
    p.add_argument("--rules", nargs="*", default=list(RULES), choices=RULES)
    p.add_argument("--shrink", type=float, default=1.0, help="contrast: identity added to the true moment")
    args = p.parse_args()
    quiet.configure(False)
    out = HERE / "results" / f"erase-rules-{args.tag}.json"
    # written after every round and merged on a rerun: an interrupted replay keeps what it measured
    results = json.loads(out.read_text()) if out.exists() else {"tag": args.tag, "shrink": args.shrink}
    results.setdefault("runs", {})
    for name, run_dir in tagged_runs(args.tag, args.only):
        if name not in results.setdefault("decision_share", {}):
            results["decision_share"][name] = decision_share(run_dir)
            out.write_text(json.dumps(results, indent=2) + "\n")
        for r in args.rounds:
            done = results["runs"].get(name, {}).get(str(r), {})
            if not (run_dir / f"distil_r{r}").is_dir() or set(args.rules) <= set(done):
                continue  # no such round, or measured by an earlier (interrupted) replay
            row = done | {rule: replay(run_dir, r, rule, args.shrink) for rule in args.rules}
            results["runs"].setdefault(name, {})[str(r)] = row
            out.write_text(json.dumps(results, indent=2) + "\n")
            print(name, r, json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
