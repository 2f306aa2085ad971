"""The CFKD round policy: which classifier each round explains and fine-tunes, which verdicts it learns from,
when a round has nothing new to teach, the closing judgement, the choice of the result (label-free, or on a labelled
set the user trusts), and the gain.

Round r: explain the classifier of round r - 1 -> the teacher's verdicts -> distil -> evaluate. The runner owns
the stages and their fingerprints; this module only decides what flows between them.
"""

from __future__ import annotations

from pipeline import models
from pipeline.config import DistilConfig
from pipeline.data import FolderData
from pipeline.rundir import read_json, write_json


def taught(config: DistilConfig, round: int) -> list[int]:
    """The rounds whose verdicts round ``round`` trains on: all so far (a verdict stays valid) or its own."""
    return list(range(1, round + 1)) if config.accumulate else [round]


def start(config: DistilConfig, explained: str) -> str:
    """The classifier a round fine-tunes: the one it explained (latest) or the run's first (initial)."""
    return explained if config.start == "latest" else "classifier"


def run(r, data: FolderData, metrics: dict) -> bool:
    """Every round, then with distil.select the closing judgement and the result; False while experts label."""
    metrics["rounds"], model = [], "classifier"
    for n in range(1, r.config.distil.rounds + 1):
        described = r.explain(data, n, model)
        if not r.feedback(data, n):
            return False
        model = r.distil(data, n, model)
        metrics["rounds"].append(round_metrics(r, n, described, metrics))
        write_json(r.dir.root / "metrics.json", metrics)
    if not r.config.distil.select:
        return True
    if r.trusted is not None:  # labels the user trusts decide; no closing judgement needed
        chosen = select_trusted(metrics, r.score_on_trusted(candidates(metrics)), r.config.distil)
        score = chosen["trusted"]["scores"][chosen["model"]]["worst_group_accuracy"]
        r.log(f"[select] {chosen['model']}: worst group {score:.2f} on the trusted set's val images")
        metrics["selected"] = chosen
        return True
    metrics["closing"] = closing(r, data, metrics["rounds"])
    if metrics["closing"] is None:
        return False
    metrics["selected"] = select(metrics)
    return True


def closing(r, data: FolderData, done: list[dict]) -> dict | None:
    """Explain and judge the last classifier once more (a round without distil); None while experts label it.
    A closing round without verdicts (nothing flipped) is recorded, not an error: it judges, it does not teach."""
    n = len(done) + 1
    described = r.explain(data, n, done[-1]["model"])
    if not r.feedback(data, n, require=False):
        return None
    fed = read_json(r.dir.path(f"feedback_r{n}") / "summary.json")
    return {
        "round": n,
        "explained": done[-1]["model"],
        "flip_rate": described["validity"],
        "realism": described.get("realism"),
        **fed,
    }


def round_metrics(r, n: int, described: dict, before: dict) -> dict:
    tested = read_json(r.dir.path(f"distil_r{n}") / "evaluation" / "metrics.json")
    fed = read_json(r.dir.path(f"feedback_r{n}") / "summary.json")
    return {
        "round": n,
        "model": f"distil_r{n}",
        "explained": "classifier" if n == 1 else f"distil_r{n - 1}",
        "flip_rate": described["validity"],
        "realism": described.get("realism"),
        **fed,
        "training": r.card_metrics(f"distil_r{n}"),
        "weights": models.weights_digest(r.dir.path(f"distil_r{n}")),
        "test_accuracy": tested["accuracy"],
        "worst_group_accuracy": tested["worst_group_accuracy"],
        "worst_group": tested["worst_group"],
        "per_group": {g: v["accuracy"] for g, v in tested["per_group"].items()},
        "gain": gain(tested, before),
    }


def gain(after: dict, before: dict) -> dict | None:
    """Share of the gap between the biased and the reference classifier that a correction closes."""
    if "reference" not in before:
        return None
    out = {}
    for key in ("accuracy", "worst_group_accuracy"):
        gap = before["reference"][key] - before["classifier"][key]
        out[key] = (after[key] - before["classifier"][key]) / gap if abs(gap) > 1e-9 else None
    return out


def judged(metrics: dict) -> list[dict]:
    """Every round's feedback, plus the closing judgement of the last classifier (distil.select)."""
    return [*metrics.get("rounds", []), *([metrics["closing"]] if metrics.get("closing") else [])]


def shortcut_rate(judgement: dict) -> float:
    """The share of a classifier's explained images whose counterfactual the teacher called spurious: how often
    a shortcut flips it."""
    return judgement["labels"]["spurious"] / max(judgement["counterfactuals"], 1)


def pooled(judgements: list[dict]) -> dict:
    """Several judgements of one classifier (on different images) as one: the counts added up."""
    if len(judgements) == 1:
        return judgements[0]
    labels = {k: sum(j["labels"].get(k, 0) for j in judgements) for k in ("true", "spurious", "unsure")}
    judged = labels["true"] + labels["spurious"]
    return {
        "labels": labels,
        "counterfactuals": sum(j["counterfactuals"] for j in judgements),
        "feedback_accuracy": labels["true"] / judged if judged else None,
    }


def same_classifier(tested: list[dict], i: int, n: int) -> list[int]:
    """Of the first ``n`` candidates, those with candidate ``i``'s weights digest (``i`` alone without one: runs
    recorded before digests)."""
    digest = tested[i].get("weights")
    return [k for k in range(n) if k == i or (digest and tested[k].get("weights") == digest)]


def scored(judgement: dict) -> dict | None:
    """The judgement as the selection ranks it, None when the teacher judged none of the classifier's edits. Edits
    judged, all of them unsure, score a feedback accuracy of 0 (no edit judged true) with no shortcut flip: where
    the teacher never says true (a feature mask over most of the image), the fewest spurious verdicts decide, and
    none is fewest."""
    if judgement.get("feedback_accuracy") is not None:
        return judgement
    return judgement | {"feedback_accuracy": 0.0} if judgement["labels"].get("unsure", 0) > 0 else None


def preference(judgement: dict, i: int) -> tuple:
    """How much ``select`` prefers candidate ``i`` (0: the run's first classifier) with this judgement: the larger
    the better."""
    return (i > 0, judgement["feedback_accuracy"], -shortcut_rate(judgement), -i)


def select(metrics: dict, key=preference) -> dict:
    """Of the corrected classifiers (the rounds' distilled weights), the one whose counterfactuals the teacher
    judged true most often (feedback accuracy, which needs no test labels); the run's first classifier only when no
    round changed it. A round that left its classifier as it was (the same weights) is the same classifier judged
    on other images: its judgements count together, and it goes by its first name. A tie goes to the classifier a
    shortcut flips least often (where the teacher finds only shortcut edits, every feedback accuracy is 0 and the
    count of spurious edits per image is what still tells the classifiers apart; a classifier whose edits were all
    judged unsure competes too, with none: ``scored``), then to the earliest round (as
    good a judgement with less fine-tuning drift). The first classifier competes on no score: a biased classifier
    that also reads real evidence gets many of its edits judged true, so its feedback accuracy can top classifiers
    that no longer read the shortcut. Its test figures come along for the report only. ``key`` ranks the
    candidates (``preference``; benchmarks/selection.py replays other rules on finished runs)."""
    judgements = judged(metrics)
    tested = [metrics["classifier"], *metrics["rounds"]]
    names = ["classifier", *(r["model"] for r in metrics["rounds"])]
    n = min(len(judgements), len(names))
    groups = [same_classifier(tested, i, n) for i in range(n)]
    judgement = [pooled([judgements[k] for k in group]) for group in groups]
    ranked = [scored(j) for j in judgement]
    scores = [
        (key(j, i), i) for i, (j, group) in enumerate(zip(ranked, groups)) if j is not None and group[0] == i
    ]
    best = max(scores)[1] if scores else len(names) - 1
    chosen = tested[best]
    return {
        "model": names[best],
        "round": best,
        "by": "feedback",
        "feedback_accuracy": judgement[best].get("feedback_accuracy") if best < len(judgement) else None,
        "test_accuracy": chosen.get("accuracy", chosen.get("test_accuracy")),
        "worst_group_accuracy": chosen["worst_group_accuracy"],
    }


def candidates(metrics: dict) -> list[str]:
    """The classifiers a trusted set chooses from: the run's first and each round's, one name per weights."""
    tested = [metrics["classifier"], *metrics["rounds"]]
    names = ["classifier", *(r["model"] for r in metrics["rounds"])]
    return [name for i, name in enumerate(names) if same_classifier(tested, i, len(names))[0] == i]


def trusted_preference(score: dict, i: int) -> tuple:
    """How much ``select_trusted`` prefers candidate ``i`` scoring ``score`` on the trusted set: worst group,
    then accuracy, then the earliest (as good with less fine-tuning drift)."""
    return (score["worst_group_accuracy"], score["accuracy"], -i)


def select_trusted(metrics: dict, scores: dict[str, dict], config: DistilConfig) -> dict:
    """The classifier with the best worst-group accuracy on the trusted set (``scores``: its evaluation of each
    candidate). Unlike the label-free rule the run's first classifier competes: labels can say that no round
    did better than it."""
    names = ["classifier", *(r["model"] for r in metrics["rounds"])]
    tested = [metrics["classifier"], *metrics["rounds"]]
    best = max((trusted_preference(scores[name], i), i) for i, name in enumerate(names) if name in scores)[1]
    chosen = tested[best]
    return {
        "model": names[best],
        "round": best,
        "by": "trusted",
        "trusted": {"root": config.trusted, "images": scores[names[best]]["n"], "scores": scores},
        "test_accuracy": chosen.get("accuracy", chosen.get("test_accuracy")),
        "worst_group_accuracy": chosen["worst_group_accuracy"],
    }
