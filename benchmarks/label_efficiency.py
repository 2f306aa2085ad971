"""Label efficiency: the CFKD demo (`cfkd run`, the embedded default) with experts labelling in the store, simulated
by the mask oracle's verdicts, under three review strategies:

- all: every card of every round gets a verdict (one key press each);
- clusters: only one representative per cluster of similar changes (the app's cluster-first queue, its clusters
  chosen from the data), each verdict then given to the whole cluster with one more key press;
- random: as many cards, picked at random, as the clusters strategy spent key presses in the same round.

Each run waits for feedback as a run with experts does (`feedback.teacher: human`, `min_labels: 1`): the script
labels the round it waits on, then runs `cfkd run` again. Records per round the expert actions (key presses that
set a verdict), the verdicts, and unbiased test / worst-group accuracy. Runs start from the stages of the demo's
mask-teacher run (benchmarks/cfkd.py leaves runs/bench-cfkd-mask) when it is there.

    .venv/bin/python benchmarks/label_efficiency.py [--strategies all clusters random] [--keep]

Writes benchmarks/results/label_efficiency.json and .png.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from annotation_app import services  # noqa: E402
from pipeline import config as cfg  # noqa: E402
from pipeline import manifest, quiet, runner, teach  # noqa: E402
from pipeline.errors import Interrupted, stop_on_signals  # noqa: E402
from pipeline.rundir import data_root, read_json  # noqa: E402
from pipeline.store import FeedbackStore  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
EXPERT = "simulated-expert"
STRATEGIES = ("all", "clusters", "random")
SHARED = runner.STAGES[: runner.STAGES.index("explain") + 1]  # the same for every strategy: up to round 1


def expert_verdicts(run_dir: Path, round: int, conf: cfg.RunConfig) -> pd.Series:
    """What the simulated expert would say of each flipped card of the round: the mask oracle's verdict."""
    folder = run_dir / manifest.folder(round)
    table = manifest.flipped(manifest.read(folder))
    return teach.mask_verdicts(
        table, folder, data_root(run_dir, conf.data.root), conf.feedback.band, conf.data.resize
    )


def label_round(run_dir: Path, round: int, strategy: str, conf, budget: int | None, seed: int) -> dict:
    """Give the round's verdicts by the strategy; returns the actions spent and the cards labelled."""
    truth = expert_verdicts(run_dir, round, conf)
    store = FeedbackStore(run_dir / "feedback.sqlite")

    def give(ids):
        store.add_many({"cf_id": i, "annotator": EXPERT, "label": truth[i], "round": round} for i in ids)

    if strategy == "clusters":
        groups = services.change_clusters(services.load_round(run_dir, round).manifest)
        actions = 0
        for representative in groups.index[groups["representative"]]:
            if representative not in truth:  # no feature mask: the expert cannot judge it either
                continue
            give([representative])
            actions += 1
            actions += (
                services.apply_to_cluster(store, groups, representative, EXPERT, truth[representative], round)
                > 0
            )
        return {"actions": int(actions), "clusters": int(groups["cluster"].nunique())}
    ids = list(truth.index)
    if strategy == "random":
        ids = list(np.random.default_rng(seed + round).permutation(ids)[: min(budget or len(ids), len(ids))])
    give(ids)
    return {"actions": len(ids)}


def waiting_round(run_dir: Path) -> int:
    """The round whose verdicts the run waits for: the latest explained round without a feedback snapshot."""
    return max(r for r in manifest.rounds(run_dir) if not (run_dir / f"feedback_r{r}").is_dir())


def run_strategy(strategy: str, conf, base: Path, budgets: dict, keep: bool, seed: int = 0) -> dict:
    run_dir = ROOT / "runs" / f"label-efficiency-{strategy}"
    if not keep:
        shutil.rmtree(run_dir, ignore_errors=True)
    if not run_dir.exists() and base.is_dir():
        run_dir.mkdir(parents=True)
        for name in SHARED:
            if (base / name).is_dir():
                shutil.copytree(base / name, run_dir / name)
    spent, started = {}, time.perf_counter()
    while True:
        runner.run(conf, run_dir, log=lambda *a, **k: None)
        metrics = read_json(run_dir / "metrics.json")
        if metrics.get("status") == "complete":
            break
        r = waiting_round(run_dir)
        spent[r] = label_round(run_dir, r, strategy, conf, budgets.get(r), seed)
        if spent[r]["actions"] == 0:
            raise RuntimeError(f"{strategy}: round {r} got no verdict; the run would wait for ever")
        print(f"{strategy}: round {r}: {spent[r]}", flush=True)
    return summarise(strategy, metrics, spent, time.perf_counter() - started)


def summarise(strategy: str, metrics: dict, spent: dict, seconds: float) -> dict:
    rounds, total = [], 0
    for r in metrics["rounds"]:
        total += spent.get(r["round"], {}).get("actions", 0)
        rounds.append(
            {
                "round": r["round"],
                "expert_actions": spent.get(r["round"], {}).get("actions", 0),
                "actions_so_far": total,
                "verdicts": r["labels"],
                "test_accuracy": r["test_accuracy"],
                "worst_group_accuracy": r["worst_group_accuracy"],
            }
        )
    closing = metrics.get("closing") or {}
    closing_actions = spent.get(closing.get("round"), {}).get("actions", 0)
    selected = metrics.get("selected") or {}
    return {
        "strategy": strategy,
        "before": {k: metrics["classifier"][k] for k in ("accuracy", "worst_group_accuracy")},
        "rounds": rounds,
        "closing_judgement_actions": closing_actions,
        "expert_actions_total": total + closing_actions,
        "actions_by_round": {int(r): a["actions"] for r, a in spent.items()},
        "selected": selected,
        "seconds": round(seconds, 1),
    }


def plot(results: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, result in results.items():
        x = [0, *(r["actions_so_far"] for r in result["rounds"])]
        y = [result["before"]["worst_group_accuracy"], *(r["worst_group_accuracy"] for r in result["rounds"])]
        ax.plot(x, y, "o-", label=name)
    ax.set(xlabel="expert actions (verdict key presses)", ylabel="worst-group accuracy", ylim=(0, 1.02))
    ax.set_xscale("symlog", linthresh=10)
    ax.axhline(0.85, ls=":", c="grey", label="target 0.85")
    ax.legend(fontsize=8)
    ax.set_title("CFKD on the demo: correction against expert time", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument("--base", default="runs/bench-cfkd-mask", help="a finished demo run to start from")
    parser.add_argument("--keep", action="store_true", help="resume the strategies' run directories")
    args = parser.parse_args()
    quiet.configure(verbose=False)
    conf = cfg.load(None)
    conf = cfg.from_dict(cfg.to_dict(conf) | {"feedback": cfg.to_dict(conf.feedback) | {"teacher": "human"}})
    # random needs the clusters strategy's budget, so clusters runs first
    order = [s for s in ("clusters", "all", "random") if s in args.strategies]
    results, budgets, code = {}, {}, 0
    try:
        with stop_on_signals():
            for strategy in order:
                base = ROOT / args.base if not results else ROOT / "runs" / f"label-efficiency-{order[0]}"
                results[strategy] = run_strategy(strategy, conf, base, budgets, args.keep)
                if strategy == "clusters":
                    budgets = results[strategy]["actions_by_round"]
                write(results)  # what is finished is kept, whatever happens to the rest
    except Interrupted as exc:
        print(f"interrupted ({exc}); rerun with --keep to resume", file=sys.stderr)
        code = exc.exit_code
    for name, result in results.items():
        chosen = result["selected"]
        print(
            f"{name}: {result['expert_actions_total']} actions; selected round {chosen.get('round')}: "
            f"{chosen.get('test_accuracy')} / {chosen.get('worst_group_accuracy')}"
        )
    return code


def write(results: dict) -> None:
    out = HERE / "results" / "label_efficiency.json"
    out.write_text(json.dumps({"benchmark": "label efficiency on the demo", "strategies": results}, indent=1))
    plot(results, out.with_suffix(".png"))


if __name__ == "__main__":
    sys.exit(main())
