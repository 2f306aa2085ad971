"""Replay one round's distil stage of finished suite runs under other distil settings: a paired comparison.

The round is distilled again from the run's own counterfactuals and verdicts, once with the run's own settings (a
setting its config.yaml predates takes today's default) and once per variant, so only the distil settings differ
(no search noise: the counterfactuals and the classifier they were searched on are the run's). Later rounds cannot
be replayed this way (their counterfactuals were searched on the run's own classifiers), so a variant that wins here
still needs a suite run.

    .venv/bin/python benchmarks/distil_replay.py --tag donors --round 2 \
        --variant start=latest,originals=explained,erase_finetuned=false --out refine-replay

``--fine-tuned`` replays variants that change only the erase (``distil.erase*``) from the round's own fine-tuned
layers (the run's distil_rR weights) instead of fine-tuning again: the erase refits only the head, so the result is
the run's exact result under the variant, in seconds instead of minutes.

``--run DIR`` replays one run directory of any kind instead (a ``cfkd run`` of the demo, whose data the run made
itself), named by its folder.

With ``--first-attempts`` one more variant, ``first_attempts``, keeps the run's settings but teaches only the
verdicts given on first attempts: a diagnosis of what the diversified attempts' verdicts do, not a setting. The
run's verdicts per attempt and round are written beside it. ``--without-casts`` likewise teaches every verdict but
those on the colour-cast attempt (``explain.search.cast``).

Writes benchmarks/results/OUT.json after every replay (a rerun adds what it lacks): per run, accuracy and worst
group of the round as run (``as_is``) and under each variant.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path
from unittest import mock

import yaml
from suite import tagged_runs

from pipeline import config as cfg
from pipeline import distil, feedback, manifest, models, quiet, rounds
from pipeline.data import load_folder
from pipeline.evaluate import evaluate
from pipeline.rundir import data_root

HERE = Path(__file__).resolve().parent


def settings(variant: str) -> dict:
    """start=latest,erase_finetuned=false -> {"start": "latest", "erase_finetuned": False} (YAML scalars)."""
    pairs = [part.partition("=") for part in variant.split(",") if part]
    if any(not sep for _, sep, _ in pairs):
        raise SystemExit(f"--variant {variant}: expected KEY=VALUE[,KEY=VALUE...] of distil settings")
    return {key: yaml.safe_load(value) for key, _, value in pairs}


def changed_distil(config: cfg.RunConfig, changes: dict) -> cfg.DistilConfig:
    """The run's distil settings with ``changes`` applied, checked as a config file's are."""
    return cfg.from_dict(cfg.to_dict(config) | {"distil": cfg.to_dict(config.distil) | changes}).distil


def attempts_only(keep):
    """While open, the distil stage sees only the verdicts given on the attempts ``keep`` (attempt -> bool) keeps."""
    every = distil.training_set

    def kept(table, consensus, use_true):
        return every(table[table["attempt"].astype(int).map(keep)], consensus, use_true)

    return mock.patch.object(distil, "training_set", kept)


def erase_only(changes: dict) -> bool:
    """Whether ``changes`` touch only what the erase does (``--fine-tuned`` can replay those exactly)."""
    return all(key.startswith("erase") for key in changes)


def fine_tuned_from(weights: Path):
    """While open, the distil stage's fine-tune loads the layers saved at ``weights`` instead of training: the
    features the erase works in are the run's own (its refit of the head starts afresh either way)."""

    def loaded(backbone, *args, **kwargs) -> dict:
        backbone.load_state_dict(models.load(weights)[0].state_dict())
        return {}

    return mock.patch.object(distil, "fine_tune", loaded)


def only_attempts(label: str, run_dir: Path):
    """The verdicts a diagnostic variant teaches: first attempts only, all but the cast's, or all."""
    if label == "first_attempts":
        return attempts_only(lambda a: a == 1)
    if label == "without_casts":
        cast = cfg.load(run_dir / "config.yaml").explain.search.cast_attempt
        if cast is None:
            raise SystemExit(f"{run_dir}: no cast attempt (explain.search.cast is off)")
        return attempts_only(lambda a: a != cast)
    return contextlib.nullcontext()


def verdicts_by_attempt(run_dir: Path, r: int) -> dict:
    """{attempt: {verdict: count}} of the counterfactuals of round r that got a verdict."""
    table = manifest.read_round(run_dir, r)
    verdicts = feedback.read_verdicts(run_dir, r)
    table = table.merge(
        verdicts.rename(columns={"cf_id": "id", "label": "verdict"})[["id", "verdict"]], on="id"
    )
    counts = table.groupby(["attempt", "verdict"]).size()
    return {str(a): {v: int(n) for (_, v), n in group.items()} for a, group in counts.groupby(level=0)}


def replay(run_dir: Path, r: int, changes: dict, fine_tuned: bool = False) -> dict:
    """Round r of the run distilled again with its distil settings changed by ``changes`` (``fine_tuned``: from
    the round's own fine-tuned layers)."""
    config = cfg.load(run_dir / "config.yaml")
    distil_config = changed_distil(config, changes)
    explained = "classifier" if r == 1 else f"distil_r{r - 1}"
    data = load_folder(data_root(run_dir, config.data.root))  # no data.root: the demo's run made its own
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        start = run_dir / rounds.start(distil_config, explained)
        taught = rounds.taught(distil_config, r)
        cast_attempt = config.explain.search.cast_attempt  # as the runner passes it
        reused = fine_tuned_from(run_dir / f"distil_r{r}") if fine_tuned else contextlib.nullcontext()
        with reused:
            distil.stage(
                run_dir, taught, start, run_dir / explained, data, distil_config, out, False, cast_attempt
            )
        model, card = models.load(out)
        tested, _ = evaluate(model.eval(), card, data)
    return {
        "accuracy": round(tested["accuracy"], 4),
        "worst_group_accuracy": round(tested["worst_group_accuracy"], 4),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--tag", help="the suite runs' tag (runs/suite/suite-NAME-TEACHER-TAG)")
    which.add_argument("--run", type=Path, help="one run directory instead (a cfkd run of the demo, say)")
    p.add_argument("--round", type=int, default=2)
    p.add_argument("--variant", action="append", default=[], help="distil settings, KEY=VALUE,...")
    p.add_argument("--only", nargs="*", help="datasets (default: every run with that tag)")
    p.add_argument("--out", required=True, help="results file name, without .json")
    p.add_argument(
        "--first-attempts", action="store_true", help="also replay teaching first attempts' verdicts only"
    )
    p.add_argument(
        "--without-casts",
        action="store_true",
        help="also replay without the verdicts on the colour-cast attempt (explain.search.cast: the last one)",
    )
    p.add_argument(
        "--fine-tuned",
        action="store_true",
        help="erase-only variants: reuse the round's own fine-tuned layers instead of fine-tuning again",
    )
    args = p.parse_args()
    variants = {"as_is": {}} | {v: settings(v) for v in args.variant}
    if args.fine_tuned and (
        args.first_attempts or args.without_casts or not all(map(erase_only, variants.values()))
    ):  # other verdicts taught or other fine-tune settings would have fine-tuned other layers
        raise SystemExit("--fine-tuned replays only variants of the distil.erase* settings")
    if args.first_attempts:
        variants["first_attempts"] = {}
    if args.without_casts:
        variants["without_casts"] = {}
    quiet.configure(False)
    out = HERE / "results" / f"{args.out}.json"
    source = {"tag": args.tag} if args.tag else {"run": str(args.run)}
    results = json.loads(out.read_text()) if out.exists() else source | {"round": args.round}
    results.setdefault("runs", {})
    runs = tagged_runs(args.tag, args.only) if args.tag else [(args.run.name, args.run)]
    for name, run_dir in runs:
        if not (run_dir / f"distil_r{args.round}").is_dir():
            continue
        row = results["runs"].setdefault(name, {})
        for label, changes in variants.items():
            if label not in row:
                with only_attempts(label, run_dir):
                    row[label] = replay(run_dir, args.round, changes, args.fine_tuned)
                out.write_text(json.dumps(results, indent=2) + "\n")
        if (args.first_attempts or args.without_casts) and "verdicts_by_attempt" not in row:
            row["verdicts_by_attempt"] = {
                r: verdicts_by_attempt(run_dir, r) for r in range(1, args.round + 1)
            }
            out.write_text(json.dumps(results, indent=2) + "\n")
        print(name, json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
