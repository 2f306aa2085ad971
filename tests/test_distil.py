"""CFKD: the training set built from verdicts, a distil round that removes the shortcut, rounds in a run (resume
after an interruption, the human teacher's pause), the metrics schema and the DFR baseline."""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import tiny_config
from PIL import Image

from pipeline import dfr, distil, erase, feedback, models, rounds, runner
from pipeline import manifest as manifest_module
from pipeline.config import BaselineConfig, DistilConfig
from pipeline.data import Counterfactuals, ImageDataset, load_folder, make_transform
from pipeline.evaluate import evaluate
from pipeline.store import FeedbackStore


def _manifest(rows):
    base = {"success": True, "attempt": 1, "source_class": "0", "target_class": "1"}
    return pd.DataFrame([{**base, "original": f"orig/{r['sample']}.png", **r} for r in rows])


def test_training_set_follows_the_verdicts():
    manifest = _manifest(
        [
            {"id": "a-to-1-a1", "sample": "a", "counterfactual": "cf/a1.png"},
            {"id": "b-to-1-a1", "sample": "b", "counterfactual": "cf/b1.png"},
            {"id": "c-to-1-a1", "sample": "c", "counterfactual": "cf/c1.png"},
            {"id": "d-to-0-a1", "sample": "d", "counterfactual": "cf/d1.png", "source_class": "1",
             "target_class": "0"},
            {"id": "e-to-1-a1", "sample": "e", "counterfactual": "cf/e1.png", "success": False},
            {"id": "f-to-1-a1", "sample": "f", "counterfactual": "cf/f1.png", "success": False},
            {"id": "g-to-1-a1", "sample": "g", "counterfactual": "cf/g1.png", "success": False},
        ]
    )  # fmt: skip
    # e and f fell short of the goal and were judged (feedback.partial); g got no verdict
    verdicts = pd.DataFrame(
        {
            "cf_id": ["a-to-1-a1", "b-to-1-a1", "c-to-1-a1", "d-to-0-a1", "e-to-1-a1", "f-to-1-a1"],
            "label": ["spurious", "true", "unsure", "spurious", "spurious", "true"],
        }
    )
    plain = distil.training_set(manifest, verdicts, use_true=False)
    # source labels; a spurious near-flip must not move the decision either
    assert dict(zip(plain["id"], plain["label"])) == {"a-to-1-a1": "0", "d-to-0-a1": "1", "e-to-1-a1": "0"}
    assert plain["original"].tolist() == [
        "orig/a.png",
        "orig/d.png",
        "orig/e.png",
    ]  # distil.stretch needs them
    both = distil.training_set(manifest, verdicts, use_true=True)
    # a true near-flip does not show the target class: never trained with the target's label
    assert dict(zip(both["id"], both["label"])) == {
        "a-to-1-a1": "0", "b-to-1-a1": "1", "d-to-0-a1": "1", "e-to-1-a1": "0"
    }  # fmt: skip


def test_holdout_keeps_an_images_attempts_together():
    # class names that once broke the id parsing: the sample is a column, the id never parsed
    table = pd.DataFrame(
        {
            "sample": [f"train-{i:05d}" for i in range(10) for t in ("a-to-b", "c/d")],
            "id": [f"train-{i:05d}-t{t}-a1-0123456789ab" for i in range(10) for t in (0, 1)],
        }
    )
    fit, held = distil.split_holdout(table, 0.2, seed=0)
    assert len(held) == 4 and len(fit) == 16
    assert not set(fit["sample"]) & set(held["sample"])


def _swap_background(data, split: str, n: int, out):
    """Ground-truth counterfactuals of the confounder: background brightness b -> 255 - b, square and noise kept.
    Training on them must teach a shortcut classifier to ignore the background (the distil stage's job)."""
    background = pd.read_csv(data.root / "metadata.csv").set_index("path")["background"]

    def swap(x, square, row):
        x[~square] += 255.0 - 2 * background[row.path]

    return _edited(data, data.split(split).head(n), split, out, swap, "spurious")


def _swap_square(data, split: str, n: int, out):
    """Counterfactuals of the real evidence, judged true: the last ``n`` images' red square a -> 255 - a."""

    def swap(x, square, row):
        x[square, 0] = 255.0 - x[square, 0]

    return _edited(data, data.split(split).tail(n), split, out, swap, "true").assign(round=1)


def _edited(data, rows, split: str, out, edit, verdict: str) -> pd.DataFrame:
    """Counterfactuals of ``rows`` made by ``edit(x, square_mask, row)`` in place, saved with their originals (for
    stretch) under out/counterfactuals; a spurious verdict keeps the source label, a true one teaches the target."""
    (out / "counterfactuals").mkdir(parents=True, exist_ok=True)
    table = []
    for row in rows.itertuples():
        x = np.asarray(Image.open(data.root / row.path), np.float32)
        edit(x, np.asarray(Image.open(data.root / row.feature_mask)) > 127, row)
        target = str(1 - int(row.label))
        cf_id = f"{split}-{row.Index:05d}-to-{target}-a{1 if verdict == 'spurious' else 2}"
        Image.fromarray(np.clip(x, 0, 255).astype(np.uint8)).save(out / "counterfactuals" / f"{cf_id}.png")
        Image.open(data.root / row.path).save(out / "counterfactuals" / f"{cf_id}-original.png")
        table.append(
            {
                "id": cf_id,
                "sample": f"{split}-{row.Index:05d}",
                "counterfactual": f"counterfactuals/{cf_id}.png",
                "original": f"counterfactuals/{cf_id}-original.png",
                "source_class": row.label,
                "target_class": target,
                "label": row.label if verdict == "spurious" else target,
                "verdict": verdict,
            }
        )
    return pd.DataFrame(table)


def test_a_distil_round_raises_worst_group_accuracy(tiny_biased, tmp_path):
    ckpt, data = tiny_biased
    before, _ = evaluate(*models.load(ckpt), data)
    cfs = _swap_background(data, "train", 40, tmp_path / "explain")
    fit, held = distil.split_holdout(cfs, 0.2, seed=0)
    config = DistilConfig(epochs=12, passes=0, batch_size=32, lr=1e-3)
    result = distil.run(ckpt, data, fit, held, tmp_path / "explain", config, tmp_path / "out")
    after, _ = evaluate(*models.load(tmp_path / "out"), data)
    assert before["worst_group_accuracy"] < 0.3  # the shortcut: one background group fails
    assert after["worst_group_accuracy"] >= before["worst_group_accuracy"] + 0.4
    assert result.card.source == "distilled:ckpt" and result.train_cfs == len(fit)
    assert (tmp_path / "out" / "logs" / "metrics.csv").exists()
    with pytest.raises(Exception, match="nothing to distil"):
        distil.run(ckpt, data, fit.iloc[:0], held, tmp_path / "explain", config, tmp_path / "none")


def _accuracy_on(model, table: pd.DataFrame, folder, classes) -> float:
    images = Counterfactuals(table, folder, classes, make_transform(32))
    x = torch.stack([images[i][0] for i in range(len(images))])
    with torch.no_grad():
        return float((model.eval()(x).argmax(1).numpy() == np.array(images.targets)).mean())


def test_a_head_only_round_moves_only_the_last_layer(tiny_biased, tmp_path):
    """layers: head reweights the frozen features (DFR-style); on this tiny classifier they hold little of the
    square, so the check is that held-out verdicts are learned, not the test accuracy."""
    ckpt, data = tiny_biased
    cfs = _swap_background(data, "train", 40, tmp_path / "explain")
    fit, held = distil.split_holdout(cfs, 0.2, seed=0)
    config = DistilConfig(
        epochs=12,
        passes=0,
        batch_size=32,
        lr=0.05,
        weight_decay=0.0,
        layers="head",
        keep="best",
        stretch=1.0,
        erase=0,
    )  # erase would refit this head on the training images alone
    distil.run(ckpt, data, fit, held, tmp_path / "explain", config, tmp_path / "out")
    (start, card), model = models.load(ckpt), models.load(tmp_path / "out")[0]
    changed = [n for n, p in model.state_dict().items() if not torch.equal(p, start.state_dict()[n])]
    assert changed and all(n.startswith(dfr.last_linear(model)) for n in changed)  # batch-norm stats too
    before = _accuracy_on(start, held, tmp_path / "explain", card.classes)
    assert _accuracy_on(model, held, tmp_path / "explain", card.classes) >= before + 0.3


def test_keep_best_can_return_the_starting_weights_keep_last_never_does(tiny_biased, tmp_path):
    ckpt, data = tiny_biased
    cfs = _swap_background(data, "train", 20, tmp_path / "explain")
    fit, held = cfs, cfs.iloc[:0]  # selection on validation accuracy alone
    start = models.load(ckpt)[0].state_dict()
    same = {}
    # a wild learning rate wrecks the head: selection must fall back to the start
    for keep in ("best", "last"):
        config = DistilConfig(epochs=2, passes=0, batch_size=32, lr=500.0, layers="head", keep=keep, erase=0)
        card = distil.run(ckpt, data, fit, held, tmp_path / "explain", config, tmp_path / keep).card
        model = models.load(tmp_path / keep)[0]
        same[keep] = all(torch.equal(p, start[n]) for n, p in model.state_dict().items())
        assert card.metrics["kept"] == keep
    assert same == {"best": True, "last": False}


def test_dfr_head_matches_its_logistic_regression(tiny_biased, tmp_path):
    ckpt, data = tiny_biased
    reference = tmp_path / "ref"
    from pipeline import config, square

    square.generate(reference, config.SquareConfig(n=200, size=32, poison=0.5, seed=9))
    info = dfr.run(ckpt, data, load_folder(reference), BaselineConfig(subsets=3), tmp_path / "dfr")
    assert info["source"].startswith("val split of the reference") and info["groups"] == 4
    model, card = models.load(tmp_path / "dfr")
    before, after = models.load(ckpt)[0], model
    changed = [n for n, p in after.state_dict().items() if not np.allclose(p, before.state_dict()[n])]
    assert changed and all(n.startswith(dfr.last_linear(after)) for n in changed)  # only the head moved
    images = ImageDataset(load_folder(reference), "val", card.classes, make_transform(32))
    assert dfr.features(model, images).shape == (len(images), 128)
    with pytest.raises(dfr.NoGroups):
        dfr.run(ckpt, data, None, BaselineConfig(subsets=1), tmp_path / "none")


def _cfkd_config(codec, **extra):
    return tiny_config(
        **{
            "data.square.n": 160,
            "classifier.epochs": 3,
            "classifier.lr": 3e-3,
            "explain.enabled": True,
            "explain.split": "train",
            "explain.per_pair": 3,
            "explain.surrogate": False,
            "explain.search.steps": 30,
            "explain.search.goal": 0.6,
            "explain.search.l1": 0.1,
            "generator.source": str(codec),
            "distil.rounds": 2,
            "distil.epochs": 1,
            "distil.passes": 0,  # tests pin the fine-tune's length
            "distil.stretch": 2.0,  # the runner's training sets carry the originals it needs
            "distil.select": False,  # no closing round unless a test asks for one
            "baseline.subsets": 2,
            **extra,
        }
    )


def test_rounds_write_metrics_and_resume_after_an_interruption(tmp_path, tiny_codec, monkeypatch):
    root = tmp_path / "run"
    # the mask teacher: the tiny reference is at chance, so the model teacher would abstain on most edits
    config = _cfkd_config(tiny_codec, **{"feedback.teacher": "mask", "distil.select": True})
    real_run = distil.run

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(distil, "run", crash)
    with pytest.raises(KeyboardInterrupt):
        runner.run(config, root, log=lambda line: None)
    assert (
        (root / "explain").is_dir() and (root / "feedback_r1").is_dir() and not (root / "distil_r1").exists()
    )

    monkeypatch.setattr(distil, "run", real_run)
    lines = []
    runner.run(config, root, log=lines.append)
    assert "[explain] up to date, skipped" in lines and "[feedback_r1] up to date, skipped" in lines
    assert "[distil_r1] running" in lines and "[distil_r2] running" in lines
    metrics = json.loads((root / "metrics.json").read_text())
    assert metrics["status"] == "complete" and [r["round"] for r in metrics["rounds"]] == [1, 2]
    keys = {
        "flip_rate",
        "feedback_accuracy",
        "labels",
        "test_accuracy",
        "worst_group_accuracy",
        "gain",
        "realism",
    }
    for r in metrics["rounds"]:
        assert keys <= set(r) and set(r["labels"]) == {"true", "spurious", "unsure", "unrealistic"}
        assert r["expert_actions"] == 0 and r["unrealistic_share"] == 0  # a simulated teacher: no expert time
        assert sum(r["labels"].values()) + r["not_flipped"] + r["abstained"] == r["counterfactuals"]
        assert set(r["gain"]) == {"accuracy", "worst_group_accuracy"}
    assert {"accuracy", "worst_group_accuracy", "gain"} <= set(metrics["dfr"])
    # the default erase searched round 1's rank; round 2 reads it back from round 1's card
    assert metrics["rounds"][0]["training"]["erased_rank"] >= 1
    assert erase.searched_ranks(root, [1]) == {1: metrics["rounds"][0]["training"]["erased_rank"]}
    html = (root / "report.html").read_text()
    assert "CFKD rounds" in html and "DFR" in html and "feedback accuracy" in html
    assert "rejected as unrealistic" in html and "realism proxy" in html
    assert (root / "distil_r2" / "model.safetensors").exists() and (root / "explain_r2").is_dir()
    # distil.select: a closing explain + feedback judges the last classifier, the best judged one is the result
    assert metrics["closing"]["round"] == 3 and metrics["closing"]["explained"] == "distil_r2"
    assert (root / "explain_r3").is_dir() and not (root / "distil_r3").exists()
    assert metrics["selected"] == rounds.select(metrics) and "Result:" in html
    said = (
        "the corrected classifier" if metrics["selected"]["round"] else "the classifier the run started from"
    )
    assert said in html
    # distil.accumulate: round 2 trains on round 1's verdicts too; every path resolves inside the run
    first, second = (pd.read_csv(root / f"distil_r{r}" / "training_set.csv") for r in (1, 2))
    assert set(first["id"]) <= set(second["id"]) and set(second["round"]) <= {1, 2}
    assert len(second) == len(first) + (second["round"] == 2).sum()
    assert all((root / path).is_file() for path in second["counterfactual"])

    # distil.trusted: the same rounds, nothing retrained, the result chosen on labelled images the user trusts
    trusted = root / "data_reference"  # unconfounded Square: its val split
    lines.clear()
    runner.run(replace(config, distil=replace(config.distil, trusted=str(trusted))), root, log=lines.append)
    assert "[distil_r2] up to date, skipped" in lines and not any("running" in line for line in lines)
    assert any(line.startswith("[select] ") and "on the trusted set" in line for line in lines)
    metrics = json.loads((root / "metrics.json").read_text())
    chosen, order = metrics["selected"], ["classifier", "distil_r1", "distil_r2"]
    scores = chosen["trusted"]["scores"]
    assert chosen["by"] == "trusted" and "closing" not in metrics and "classifier" in scores
    for name, score in scores.items():  # the scores are the trusted val split's evaluation of each classifier
        tested, _ = evaluate(*models.load(root / name), load_folder(trusted), "val")
        assert score["worst_group_accuracy"] == tested["worst_group_accuracy"] and score["n"] == tested["n"]
    assert chosen["model"] == max(
        scores, key=lambda n: (scores[n]["worst_group_accuracy"], scores[n]["accuracy"], -order.index(n))
    )
    html = (root / "report.html").read_text()
    assert "worst group, trusted set" in html and "val images of the trusted set" in html


def test_select_trusted_prefers_worst_group_then_accuracy_and_lets_the_first_classifier_compete():
    metrics = {
        "classifier": {"accuracy": 0.5, "worst_group_accuracy": 0.1},
        "rounds": [
            {"model": f"distil_r{i}", "test_accuracy": 0.9, "worst_group_accuracy": 0.8} for i in (1, 2)
        ],
    }
    config = DistilConfig(trusted="/data/trusted")

    def score(worst, acc):
        return {"n": 40, "accuracy": acc, "worst_group_accuracy": worst, "worst_group": "label=0"}

    scores = {"classifier": score(0.2, 0.6), "distil_r1": score(0.7, 0.8), "distil_r2": score(0.7, 0.9)}
    chosen = rounds.select_trusted(metrics, scores, config)
    assert chosen["model"] == "distil_r2" and chosen["by"] == "trusted" and chosen["trusted"]["images"] == 40
    scores["distil_r2"] = score(0.7, 0.8)  # a full tie: the earlier round
    assert rounds.select_trusted(metrics, scores, config)["model"] == "distil_r1"
    scores["classifier"] = score(
        0.75, 0.5
    )  # no round beat the classifier on trusted labels: it is the result
    assert rounds.select_trusted(metrics, scores, config)["model"] == "classifier"
    # one classifier under two names (a round that changed nothing) is scored once, by its first name
    metrics["rounds"][1]["weights"] = metrics["rounds"][0]["weights"] = "same"
    assert rounds.candidates(metrics) == ["classifier", "distil_r1"]


def test_human_teacher_pauses_until_enough_labels(tmp_path, tiny_codec):
    root = tmp_path / "run"
    config = _cfkd_config(
        tiny_codec, **{"feedback.teacher": "human", "feedback.min_labels": 2, "distil.rounds": 1}
    )
    lines = []
    runner.run(config, root, log=lines.append)
    metrics = json.loads((root / "metrics.json").read_text())
    assert metrics["status"] == "waiting for feedback" and metrics["rounds"] == []
    assert any(f"cfkd annotate --run-dir {root}" in line for line in lines)
    assert not (root / "distil_r1").exists()

    manifest = pd.read_csv(root / "explain" / "manifest.csv", dtype=str)
    flipped = manifest[manifest["success"] == "True"]["id"].tolist()
    assert len(flipped) >= 2
    store = FeedbackStore(root / "feedback.sqlite")
    store.add(flipped[0], "ann", "spurious")
    runner.run(config, root, log=lines.append)  # one label of two: still waiting
    assert not (root / "distil_r1").exists()
    store.add(flipped[1], "ann", "spurious")
    lines.clear()
    runner.run(config, root, log=lines.append)
    assert "[explain] up to date, skipped" in lines and "[distil_r1] running" in lines
    metrics = json.loads((root / "metrics.json").read_text())
    assert metrics["status"] == "complete" and metrics["rounds"][0]["labels"]["spurious"] == 2


def _label(root, round: int, verdict: str) -> None:
    """Every flipped counterfactual of the round gets the same verdict from one annotator."""
    folder = "explain" if round == 1 else f"explain_r{round}"
    manifest = pd.read_csv(root / folder / "manifest.csv", dtype=str)
    flipped = manifest[manifest["success"] == "True"]["id"].tolist()
    assert len(flipped) >= 2
    FeedbackStore(root / "feedback.sqlite").add_many(
        {"cf_id": cf, "annotator": "ann", "label": verdict, "round": round} for cf in flipped
    )


def _two_human_rounds(config, root, verdicts: tuple[str, str]) -> dict:
    runner.run(config, root, log=lambda line: None)
    _label(root, 1, verdicts[0])
    runner.run(config, root, log=lambda line: None)  # round 1 distils, round 2 explains and waits
    _label(root, 2, verdicts[1])
    runner.run(config, root, log=lambda line: None)
    return json.loads((root / "metrics.json").read_text())


def test_a_round_with_nothing_new_to_teach_keeps_the_classifier(tmp_path, tiny_codec):
    root = tmp_path / "run"
    config = _cfkd_config(tiny_codec, **{"feedback.teacher": "human", "feedback.min_labels": 2})
    # every round-2 edit is real evidence: nothing to correct
    metrics = _two_human_rounds(config, root, ("spurious", "true"))
    assert metrics["status"] == "complete" and metrics["rounds"][1]["feedback_accuracy"] == 1.0
    first, second = (models.load(root / f"distil_r{r}") for r in (1, 2))
    assert "skipped" not in first[1].metrics and "no new usable verdicts" in second[1].metrics["skipped"]
    for a, b in zip(first[0].state_dict().values(), second[0].state_dict().values()):
        assert torch.equal(a, b)
    # the same classifier twice: one weights digest, and the report names the first
    assert (
        metrics["rounds"][1]["weights"] == metrics["rounds"][0]["weights"] != metrics["classifier"]["weights"]
    )
    assert "after round 2 (same weights as after round 1)" in (root / "report.html").read_text()


@pytest.mark.parametrize(
    "start, source", [("latest", "distilled:distil_r1"), ("initial", "distilled:classifier")]
)
def test_distil_start_picks_the_weights_each_round_fine_tunes(tmp_path, tiny_codec, start, source):
    root = tmp_path / "run"
    extra = {"feedback.teacher": "human", "feedback.min_labels": 2, "distil.start": start}
    metrics = _two_human_rounds(_cfkd_config(tiny_codec, **extra), root, ("spurious", "spurious"))
    assert metrics["status"] == "complete" and metrics["rounds"][1]["explained"] == "distil_r1"
    card = models.load_card(root / "distil_r2")
    assert card.source == source and card.metrics["counterfactuals_train"] > 0
    second = pd.read_csv(root / "distil_r2" / "training_set.csv")
    assert set(second["round"]) == {1, 2}  # both rounds' verdicts, whichever weights they start from


def test_originals_explained_fits_a_round_to_the_classifier_it_explained(tmp_path, tiny_codec):
    root = tmp_path / "run"
    extra = {"feedback.teacher": "human", "feedback.min_labels": 2, "distil.originals": "explained"}
    metrics = _two_human_rounds(_cfkd_config(tiny_codec, **extra), root, ("spurious", "spurious"))
    assert metrics["status"] == "complete"
    assert models.load_card(root / "distil_r2").metrics["originals"] == "distil_r1"


def test_staged_layers_erase_alone_in_round_one_and_fine_tune_after(tmp_path, tiny_codec):
    """distil.layers: staged: round 1 changes only the head (erase alone), round 2 fine-tunes every layer."""
    root = tmp_path / "run"
    extra = {"feedback.teacher": "human", "feedback.min_labels": 2, "distil.layers": "staged"}
    metrics = _two_human_rounds(_cfkd_config(tiny_codec, **extra), root, ("spurious", "spurious"))
    assert metrics["status"] == "complete"
    first = models.load(root / "classifier")[0]
    start, head = first.state_dict(), dfr.last_linear(first)
    for r, trained in ((1, False), (2, True)):
        model, card = models.load(root / f"distil_r{r}")
        changed = {n for n, p in model.state_dict().items() if not torch.equal(p, start[n])}
        assert ("epochs" in card.metrics) == trained
        assert changed and (all(n.startswith(head) for n in changed) != trained)


def test_select_takes_the_classifier_with_the_best_feedback_accuracy():
    def judged(fa, acc=0.5, spurious=1):
        return {
            "feedback_accuracy": fa,
            "labels": {"spurious": spurious},
            "counterfactuals": 10,
            "test_accuracy": acc,
            "worst_group_accuracy": acc / 2,
        }

    metrics = {
        "classifier": {"accuracy": 0.5, "worst_group_accuracy": 0.1},
        "rounds": [
            {**judged(0.0, 0.9), "model": "distil_r1"},  # judges the biased classifier
            {**judged(0.8, 0.8), "model": "distil_r2"},  # judges distil_r1
            {**judged(None, 0.7), "model": "distil_r3"},  # nothing labelled: no judgement of distil_r2
        ],
        "closing": judged(0.8),  # judges distil_r3: ties with distil_r1, and the earlier round wins
    }
    assert rounds.select(metrics) == {
        "model": "distil_r1",
        "round": 1,
        "by": "feedback",
        "feedback_accuracy": 0.8,
        "test_accuracy": 0.9,
        "worst_group_accuracy": 0.45,
    }
    metrics["closing"] = judged(0.9)
    chosen = rounds.select(metrics)
    assert chosen["model"] == "distil_r3" and chosen["test_accuracy"] == 0.7
    # the biased classifier's edits were mostly real evidence: still a corrected classifier is the result
    metrics["rounds"][0]["feedback_accuracy"] = 0.95
    assert rounds.select(metrics)["model"] == "distil_r3"
    # every judgement alike (one spurious edit each): the corrected classifier, not the one the run started from
    for judgement in (*metrics["rounds"], metrics["closing"]):
        judgement["feedback_accuracy"] = 0.0
    assert rounds.select(metrics)["model"] == "distil_r1"
    # ... unless a shortcut flips one of them less often: 1 spurious edit of 10 explained images against 4
    for judgement, spurious in zip((*metrics["rounds"], metrics["closing"]), (4, 4, 4, 1)):
        judgement["labels"]["spurious"] = spurious
    assert rounds.select(metrics)["model"] == "distil_r3"
    # a better feedback accuracy still comes first
    metrics["rounds"][1]["feedback_accuracy"] = 0.1
    assert rounds.select(metrics)["model"] == "distil_r1"
    # another rule (benchmarks/selection.py replays them): the fewest spurious edits per image first
    fewest = lambda j, i: (-rounds.shortcut_rate(j), j["feedback_accuracy"], -i)  # noqa: E731
    assert rounds.select(metrics, fewest)["model"] == "distil_r3"


def test_select_lets_a_classifier_whose_edits_were_all_judged_unsure_compete():
    """Where the teacher never says true (a feature mask over most of the image: every feedback accuracy 0), the
    classifier with the fewest spurious verdicts wins, and one whose edits were all unsure has none (numbers of a
    suite run, stamp with the mask teacher); a classifier none of whose edits was judged at all stays out."""

    def judged(true, spurious, unsure, **more):
        fa = true / (true + spurious) if true + spurious else None
        labels = {"true": true, "spurious": spurious, "unsure": unsure}
        return {"labels": labels, "counterfactuals": 192, "feedback_accuracy": fa, **more}

    def distilled(n, wg, true, spurious, unsure):
        return judged(true, spurious, unsure, model=f"distil_r{n}", test_accuracy=wg, worst_group_accuracy=wg)

    metrics = {
        "classifier": {"accuracy": 0.75, "worst_group_accuracy": 0.0},
        "rounds": [
            distilled(1, 0.0, 0, 34, 91),
            distilled(2, 0.24, 0, 34, 112),
            distilled(3, 0.87, 0, 6, 101),
        ],
        "closing": judged(0, 0, 98),  # distil_r3's edits: all unsure
    }
    chosen = rounds.select(metrics)
    assert chosen["model"] == "distil_r3" and chosen["feedback_accuracy"] is None  # reported as it was: none
    metrics["closing"] = judged(
        0, 0, 0
    )  # nothing of distil_r3's judged: no score, distil_r2 (6 spurious) wins
    assert rounds.select(metrics)["model"] == "distil_r2"
    metrics["closing"] = judged(0, 0, 98)
    metrics["rounds"][1]["labels"]["true"], metrics["rounds"][1]["feedback_accuracy"] = 1, 1 / 35
    assert rounds.select(metrics)["model"] == "distil_r1"  # an edit judged true still comes first


def test_select_counts_the_judgements_of_one_classifier_together():
    """A round that left its classifier unchanged (the same weights) gives the same classifier a second judgement
    on other images: the two count as one, under the classifier's first name (numbers of a suite run where round 1
    erased nothing)."""

    def judged(true, spurious, **more):
        fa = true / (true + spurious)
        return {
            "labels": {"true": true, "spurious": spurious},
            "counterfactuals": 192,
            "feedback_accuracy": fa,
            **more,
        }

    def distilled(n, wg, weights, true, spurious):
        return judged(
            true, spurious, model=f"distil_r{n}", test_accuracy=wg, worst_group_accuracy=wg, weights=weights
        )

    metrics = {
        "classifier": {"accuracy": 0.91, "worst_group_accuracy": 0.49, "weights": "a"},
        "rounds": [  # each round: the judgement of the classifier it explained, then what it distilled
            distilled(1, 0.49, "a", 91, 34),  # round 1 returned the classifier unchanged
            distilled(2, 0.84, "b", 92, 15),  # ... and round 2 judged it again: 0.86 on these images
            distilled(3, 0.94, "c", 73, 28),
        ],
        "closing": judged(
            74, 19
        ),  # distil_r3: 0.796, above the two judgements of the first classifier (0.789)
    }
    chosen = rounds.select(metrics)
    assert chosen["model"] == "distil_r3" and chosen["worst_group_accuracy"] == 0.94
    for r in metrics["rounds"]:  # a run recorded before weights digests: each judgement on its own
        r.pop("weights")
    assert rounds.select(metrics)["model"] == "distil_r1"
    # the first classifier's pooled judgement is best, but a corrected classifier is the result
    for r, weights in zip(metrics["rounds"], "abc"):
        r["weights"] = weights
    metrics["closing"] = judged(10, 90)
    assert rounds.select(metrics)["model"] == "distil_r2"
    # no round changed the classifier: it is the result, under its first name, with the pooled score
    for r in metrics["rounds"]:
        r["weights"] = "a"
    assert rounds.select(metrics) == {
        "model": "classifier",
        "round": 0,
        "by": "feedback",
        "feedback_accuracy": (91 + 92 + 73 + 10) / (125 + 107 + 101 + 100),
        "test_accuracy": 0.91,
        "worst_group_accuracy": 0.49,
    }


def test_stretched_counterfactuals_scale_the_change_within_the_image_range(tmp_path):
    """distil.stretch: each draw is original + a * (counterfactual - original), a ~ U(1, stretch), clipped."""
    original = np.full((8, 8, 3), 100, np.uint8)
    edited = original.copy()
    edited[:, :4] = 140  # the change: +40 on the left half
    Image.fromarray(original).save(tmp_path / "o.png")
    Image.fromarray(edited).save(tmp_path / "c.png")
    table = pd.DataFrame({"counterfactual": ["c.png"] * 64, "original": ["o.png"] * 64, "label": ["0"] * 64})
    scale = lambda x: (x * 127.5 + 127.5).round()  # noqa: E731  back to 0..255 from make_transform's [-1, 1]
    as_is = Counterfactuals(table, tmp_path, ["0", "1"], make_transform(8))
    assert torch.equal(scale(as_is[0][0]), torch.from_numpy(edited).permute(2, 0, 1).float())
    torch.manual_seed(0)
    stretched = Counterfactuals(table, tmp_path, ["0", "1"], make_transform(8), stretch=5.0)
    draws = torch.stack([scale(stretched[i][0]) for i in range(64)])
    left, right = draws[:, :, :, :4], draws[:, :, :, 4:]
    assert (right == 100).all()  # untouched pixels stay untouched
    assert (left == left[:, :1, :1, :1]).all()  # one factor per draw, over the whole change
    values = left[:, 0, 0, 0]
    assert values.min() >= 140 and values.max() == 255  # a in [1, 5]: +40 .. +200, clipped at white
    assert len(values.unique()) > 10


def test_stretch_within_stops_where_the_overall_colour_leaves_the_real_images(tmp_path):
    """distil.stretch_within: a whole-image cast is stretched only as far as real images' channel means go; a local
    edit, which barely moves them, keeps the whole stretch."""
    original = np.full((8, 8, 3), 100, np.uint8)
    cast, local = original.copy(), original.copy()
    cast[..., 2] = 120  # every pixel's blue +20: the mean blue 100 -> 120
    local[:1, :1] = 180  # one pixel of 64: channel means +1.25
    for name, image in (("o", original), ("cast", cast), ("local", local)):
        Image.fromarray(image).save(tmp_path / f"{name}.png")
    table = pd.DataFrame(
        {"counterfactual": ["cast.png", "local.png"], "original": ["o.png"] * 2, "label": ["0"] * 2}
    )
    # real images' channel means lie within 90..130
    limits = np.array([[90.0, 90.0, 90.0], [130.0, 130.0, 130.0]])
    capped = Counterfactuals(table, tmp_path, ["0", "1"], make_transform(8), stretch=3.0, limits=limits)
    read = lambda name: np.asarray(Image.open(tmp_path / name), float)  # noqa: E731
    assert capped.most(read("o.png"), read("cast.png")) == pytest.approx(1.5)  # +20 may grow to +30, not +60
    assert capped.most(read("o.png"), read("local.png")) == 3.0
    torch.manual_seed(0)
    blues = torch.stack([capped[0][0][2].mean() * 127.5 + 127.5 for _ in range(64)])
    assert blues.min() >= 119.5 and blues.max() <= 130.5 and blues.max() > 127
    free = Counterfactuals(table, tmp_path, ["0", "1"], make_transform(8), stretch=3.0)
    assert max(free[0][0][2].mean() * 127.5 + 127.5 for _ in range(64)) > 140  # uncapped it goes past them


def test_colour_limits_span_the_real_training_images(tiny_biased):
    ckpt, data = tiny_biased
    _, card = models.load(ckpt)
    limits = distil.colour_limits(data, card)
    images = ImageDataset(data, "train", card.classes, models.pixel_transform(card))
    means = np.stack([((images[i][0] + 1) * 127.5).mean((1, 2)).numpy() for i in range(len(images))])
    assert limits.shape == (2, 3) and (limits[0] <= limits[1]).all()
    assert (limits[0] >= means.min(0) - 1e-3).all() and (limits[1] <= means.max(0) + 1e-3).all()
    inside = ((means >= limits[0]) & (means <= limits[1])).all(1).mean()
    assert inside >= 0.9


@pytest.mark.parametrize(
    "flip, seen",
    [
        ("none", {"as is"}),
        ("horizontal", {"as is", "mirrored"}),
        ("both", {"as is", "mirrored", "upside down", "both"}),
    ],
)
def test_distil_flip_draws_the_orientations_it_names(tmp_path, flip, seen):
    """distil.flip: horizontal mirrors draws left-right and never upside down; none leaves them as they are."""
    image = np.zeros((8, 8, 3), np.uint8)
    image[:2, :2] = 255  # a bright top-left corner tells every orientation apart
    Image.fromarray(image).save(tmp_path / "c.png")
    table = pd.DataFrame({"counterfactual": ["c.png"] * 64, "original": ["c.png"] * 64, "label": ["0"] * 64})
    card = models.ModelCard(arch="small_cnn", classes=["0", "1"], image_size=8)
    cfs = Counterfactuals(table, tmp_path, card.classes, distil.training_transform(card, flip))
    torch.manual_seed(0)
    corners = {"as is": (0, 0), "mirrored": (0, 7), "upside down": (7, 0), "both": (7, 7)}
    draws = [cfs[i][0][0] for i in range(64)]
    found = {name for x in draws for name, (r, c) in corners.items() if x[r, c] > 0.9}
    assert found == seen


@pytest.mark.parametrize(
    "passes, counterfactuals, epochs", [(0, 20, 3), (40, 20, 1), (40, 45, 3), (40, 206, 14), (10, 1, 1)]
)
def test_distil_passes_sets_the_epochs_by_how_often_each_counterfactual_is_drawn(
    passes, counterfactuals, epochs
):
    """distil.passes: 40 draws of each counterfactual, half of each batch counterfactuals, 1200 training images:
    20 verdicts fit in about one epoch, 206 need fourteen; never fewer than one; 0 keeps distil.epochs."""
    config = DistilConfig(epochs=3, mix=0.5, passes=passes)
    assert distil.fine_tune_epochs(config, counterfactuals, 1200) == epochs


def test_a_round_with_passes_fine_tunes_for_the_epochs_they_make(tiny_biased, tmp_path):
    """distil.passes on a real round: 20 counterfactuals drawn about 2 * (0.5 * training images) / 20 times each
    make two epochs, which the card and the training log both show."""
    ckpt, data = tiny_biased
    cfs = _swap_background(data, "train", 20, tmp_path / "explain")
    train = len(ImageDataset(data, "train", models.load(ckpt)[1].classes, make_transform(32)))
    config = DistilConfig(batch_size=32, passes=2 * 0.5 * train / 20, erase=0, mix=0.5)
    card = distil.run(ckpt, data, cfs, cfs.iloc[:0], tmp_path / "explain", config, tmp_path / "out").card
    logged = pd.read_csv(tmp_path / "out" / "logs" / "metrics.csv")["epoch"].max() + 1
    assert card.metrics["epochs"] == logged == 2 != config.epochs


@pytest.mark.parametrize("shift, most", [(0.0, 0), (0.125, 2)])
def test_distil_shift_moves_draws_by_at_most_its_share_of_the_image(tmp_path, shift, most):
    """distil.shift: 0.125 of a 16-pixel image moves each draw by up to 2 pixels either way, the size kept."""
    image = np.zeros((16, 16, 3), np.uint8)
    image[7:9, 7:9] = 255  # a bright block in the middle: where it lands is the draw's offset
    Image.fromarray(image).save(tmp_path / "c.png")
    table = pd.DataFrame({"counterfactual": ["c.png"] * 64, "original": ["c.png"] * 64, "label": ["0"] * 64})
    card = models.ModelCard(arch="small_cnn", classes=["0", "1"], image_size=[16, 16])
    transform = distil.training_transform(card, "none", shift)
    cfs = Counterfactuals(table, tmp_path, card.classes, transform)
    torch.manual_seed(0)
    draws = [cfs[i][0][0] for i in range(64)]
    assert all(x.shape == (16, 16) for x in draws)
    offsets = {tuple((torch.nonzero(x > 0.9).min(0).values - 7).tolist()) for x in draws}
    assert {abs(o) for offset in offsets for o in offset} == set(range(most + 1))


def _logits(model, table: pd.DataFrame, folder, column: str) -> torch.Tensor:
    images = Counterfactuals(
        table.assign(counterfactual=table[column]), folder, ["0", "1"], make_transform(32)
    )
    with torch.no_grad():
        return model.eval()(torch.stack([images[i][0] for i in range(len(images))]))


def test_erase_makes_the_head_blind_to_what_the_spurious_edits_moved(tiny_biased, tmp_path):
    """erase: once the spurious edits' feature directions are projected out of the head, those edits no
    longer move any logit, although the head was refitted and still separates the training images."""
    ckpt, data = tiny_biased
    cfs = _swap_background(data, "train", 24, tmp_path / "explain")
    model, card = models.load(ckpt)
    moved = (
        _logits(model, cfs, tmp_path / "explain", "counterfactual")
        - _logits(model, cfs, tmp_path / "explain", "original")
    ).abs()
    directions = erase.spurious_directions(model, card, cfs, tmp_path / "explain", k=len(cfs))
    erase.project_out(model, card, data, directions)
    after = (
        _logits(model, cfs, tmp_path / "explain", "counterfactual")
        - _logits(model, cfs, tmp_path / "explain", "original")
    ).abs()
    assert moved.max() > 0.5 and after.max() < 1e-3 * moved.max()
    # the same edits judged true elsewhere are real evidence: nothing of them is erased
    evidence = cfs.assign(verdict="true")
    assert len(erase.spurious_directions(model, card, cfs, tmp_path / "explain", 1, evidence)) == 0
    # the same kind of edit judged true on a few images only: with the vote the spurious verdicts outvote them
    few = cfs.head(4).assign(verdict="true")
    assert len(erase.spurious_directions(model, card, cfs, tmp_path / "explain", 1, few)) == 0
    assert len(erase.spurious_directions(model, card, cfs, tmp_path / "explain", 1, few, vote=True)) == 1
    start = models.load(ckpt)[0]
    changed = [n for n, p in model.state_dict().items() if not torch.equal(p, start.state_dict()[n])]
    assert changed and all(n.startswith(dfr.last_linear(model)) for n in changed)


def test_a_round_with_erase_removes_the_shortcut_the_same_fine_tune_leaves(tiny_biased, tmp_path):
    """A fine-tune too short to unlearn the background on its own; erase on top of it removes the shortcut."""
    ckpt, data = tiny_biased
    cfs = _swap_background(data, "train", 40, tmp_path / "explain")
    worst = {}
    for k in (0, 1):
        config = DistilConfig(epochs=1, passes=0, batch_size=32, lr=1e-4, erase=k)
        result = distil.run(ckpt, data, cfs, cfs.iloc[:0], tmp_path / "explain", config, tmp_path / f"out{k}")
        worst[k] = evaluate(*models.load(tmp_path / f"out{k}"), data)[0]["worst_group_accuracy"]
        assert result.card.metrics.get("erased_directions", 0) == k
    before = evaluate(*models.load(ckpt), data)[0]["worst_group_accuracy"]
    assert worst[0] < before + 0.2 and worst[1] >= worst[0] + 0.3


def test_erase_auto_takes_one_direction_fewer_than_the_classes(tiny_biased, tmp_path):
    # a tag of K colours tells K classes apart along K - 1 feature directions
    auto = DistilConfig(erase="auto", layers="none")
    assert [erase.per_round(auto, k) for k in (1, 2, 3, 10)] == [1, 1, 2, 9]
    assert erase.per_round(DistilConfig(erase=4), 2) == 4
    ckpt, data = tiny_biased  # two classes: one direction
    cfs = _swap_background(data, "train", 24, tmp_path / "explain")
    result = distil.run(ckpt, data, cfs, cfs.iloc[:0], tmp_path / "explain", auto, tmp_path / "out")
    assert result.card.metrics["erased_directions"] == 1


def test_erase_hold_adds_directions_until_the_spurious_edits_keep_their_source_label(tiny_biased, tmp_path):
    """erase: hold takes the fewest directions whose refitted head keeps HOLD of the spurious edits at their
    source label, never more than hold 99 % of what those edits changed."""
    ckpt, data = tiny_biased
    folder = tmp_path / "explain"
    cfs = _swap_background(data, "train", 24, folder).assign(round=1)
    model, card = models.load(ckpt)
    asked = []

    def directions_for(k):
        asked.append(k)
        return erase.spurious_directions(model, card, cfs, folder, k)

    def held(directions) -> float:
        erased = models.load(ckpt)[0]
        erase.project_out(erased, card, data, directions)
        return float(
            (
                _logits(erased, cfs, folder, "counterfactual").argmax(1).numpy() == cfs["label"].astype(int)
            ).mean()
        )

    # a share no head reaches: every k up to the cap (99 % of the edits' change) is tried, the cap is kept
    capped, rank = erase.holding_directions(model, card, data, cfs, folder, directions_for, hold=1.01)
    tried, most = list(asked), len(asked)
    assert tried == list(range(1, most + 1)) and len(capped) == len(directions_for(most)) < len(cfs)
    assert rank == most
    shares = [held(directions_for(k)) for k in tried]
    # the share asked for: the first k that reaches it, else the cap
    asked.clear()
    chosen, rank = erase.holding_directions(model, card, data, cfs, folder, directions_for)
    first = next((k for k, share in enumerate(shares, 1) if share >= erase.HOLD), most)
    assert asked[-1] == rank == first and len(chosen) == len(directions_for(first)), shares
    # the round: erase hold on the head alone erases as many directions as that choice
    config = DistilConfig(layers="none", erase="hold")
    result = distil.run(ckpt, data, cfs, cfs.iloc[:0], folder, config, tmp_path / "out")
    assert result.card.metrics["erased_directions"] == len(chosen)
    assert result.card.metrics["erased_rank"] == first


def test_erase_verdicts_holds_the_true_edits_too(tiny_biased, tmp_path, monkeypatch):
    """erase: verdicts takes the fewest directions whose refitted head keeps ``hold`` of the spurious edits at their
    source label while the true edits keep ``keep`` of the share reaching their target with one direction; with no
    such k, one direction. It searches only in a round that fine-tunes nothing."""
    ckpt, data = tiny_biased
    folder = tmp_path / "explain"
    spurious = _swap_background(data, "train", 24, folder).assign(round=1)
    true = _swap_square(data, "train", 8, folder)
    model, card = models.load(ckpt)

    def directions_for(k):
        return erase.spurious_directions(model, card, spurious, folder, k)

    def shares(k) -> tuple[float, float]:
        erased = models.load(ckpt)[0]
        erase.project_out(erased, card, data, directions_for(k))
        return tuple(
            float(
                (
                    _logits(erased, t, folder, "counterfactual").argmax(1).numpy() == t["label"].astype(int)
                ).mean()
            )
            for t in (spurious, true)
        )

    most = erase.most_directions(erase.feature_change(model, card, spurious, folder))
    (held_1, reached_1), (held_most, reached_most) = shares(1), shares(most)
    assert most > 1 and held_most > held_1 and reached_1 > 0  # more directions hold more spurious edits

    def chosen(**rule) -> int:
        found, rank = erase.holding_directions(
            model, card, data, spurious, folder, directions_for, true_edits=true, **rule
        )
        assert len(found) == len(directions_for(rank))
        return len(found)

    # held at the cap only: taken while the true edits keep their reach, one direction where they would not
    assert chosen(hold=held_most, keep=0.0) == len(directions_for(most))
    assert chosen(hold=held_most, keep=reached_most / reached_1 + 0.01) == len(directions_for(1))
    assert chosen(hold=1.01) == len(directions_for(1))  # nothing holds: one direction (hold alone: the cap)
    # the round: erase alone searches with the true edits as the guard ...
    config = DistilConfig(layers="none", erase="verdicts")
    result = distil.run(
        ckpt, data, spurious, spurious.iloc[:0], folder, config, tmp_path / "out", true_edits=true
    )
    assert result.card.metrics["erased_directions"] == chosen()
    # ... and after a fine-tune it erases one direction per round without a search
    monkeypatch.setattr(
        erase, "holding_directions", lambda *a, **k: pytest.fail("searched after a fine-tune")
    )
    config = replace(config, layers="all", epochs=1, passes=0)
    result = distil.run(
        ckpt, data, spurious, spurious.iloc[:0], folder, config, tmp_path / "ft", true_edits=true
    )
    assert result.card.metrics["erased_directions"] == 1


def test_the_distil_stage_hands_the_rounds_true_edits_to_the_erase(tiny_biased, tmp_path, monkeypatch):
    ckpt, data = tiny_biased
    run, other = _four_true_twenty_spurious(ckpt, data, tmp_path)
    seen = []

    def holding(*args, true_edits=None, **kwargs):
        seen.append(sorted(true_edits["verdict"]))
        return np.zeros((0, 1)), 1

    monkeypatch.setattr(erase, "holding_directions", holding)
    (tmp_path / "out").mkdir()
    distil.stage(run, [1], ckpt, ckpt, data, DistilConfig(layers="none", erase="verdicts"), tmp_path / "out")
    assert seen == [["true"] * 4]


def test_erase_ranks_erases_again_the_rank_an_earlier_round_searched(tiny_biased, tmp_path, monkeypatch):
    """distil.erase_ranks: after a fine-tune, round 1's spurious edits lose as many directions as round 1's own
    search took (read from its distil card), the round's own edits one; without it, one direction per round."""
    ckpt, data = tiny_biased
    folder = tmp_path / "explain"
    cfs = _swap_background(data, "train", 24, folder)
    two_rounds = cfs.assign(round=[1] * 12 + [2] * 12)
    config = DistilConfig(erase="verdicts", erase_ranks=True, layers="all", epochs=1, passes=0)
    erased = {
        label: distil.run(
            ckpt, data, two_rounds, cfs.iloc[:0], folder, config, tmp_path / label, ranks=ranks
        ).card.metrics["erased_directions"]
        for label, ranks in (("ranks", {1: 3}), ("none", None))
    }
    assert erased == {"ranks": 4, "none": 2}
    # a round whose rank was searched is erased whole: that search already kept its true edits at their target
    evidence, model, card = cfs.assign(verdict="true", round=1), *models.load(ckpt)
    spared = erase.spurious_directions(model, card, two_rounds, folder, {1: 3}, evidence)
    whole = erase.spurious_directions(model, card, two_rounds, folder, {1: 3}, evidence, whole=(1,))
    second = two_rounds[two_rounds["round"] == 2]
    assert len(whole) == 3 + len(erase.spurious_directions(model, card, second, folder, 1, evidence))
    assert len(whole) > len(spared)
    # the stage reads the ranks of the earlier rounds' cards (a round whose card records none: nothing to carry)
    run, _ = _four_true_twenty_spurious(ckpt, data, tmp_path)
    shutil.copytree(run / "explain", run / "explain_r2")
    shutil.copytree(run / "feedback_r1", run / "feedback_r2")
    card = models.load_card(ckpt)
    models.save(models.load(ckpt)[0], replace(card, metrics={"erased_rank": 3}), run / "distil_r1")
    assert erase.searched_ranks(run, [1, 2]) == {1: 3}
    seen = []
    monkeypatch.setattr(distil, "run", lambda *a, **k: seen.append(a[11] if len(a) > 11 else k.get("ranks")))
    (tmp_path / "out").mkdir()
    for ranks_on, how in ((True, "verdicts"), (False, "verdicts"), (True, "hold")):
        changed = replace(config, erase_ranks=ranks_on, erase=how)
        distil.stage(run, [1, 2], ckpt, ckpt, data, changed, tmp_path / "out")
    assert seen == [{1: 3}, None, None]  # only erase: verdicts searched its rank with the true edits holding


def test_erase_ranks_gives_each_round_its_own_number_of_principal_directions():
    rng = np.random.default_rng(0)
    change = rng.standard_normal((30, 8))
    table = pd.DataFrame({"round": [1] * 15 + [2] * 15})
    assert len(erase.principal(change, table, {1: 3})) == 4  # round 2 has no entry: one
    assert len(erase.principal(change, table, {1: 2, 2: 5})) == 7
    assert np.allclose(erase.principal(change, table, {1: 2, 2: 2}), erase.principal(change, table, 2))


def test_layers_none_changes_only_the_head_by_erasing(tiny_biased, tmp_path):
    ckpt, data = tiny_biased
    cfs = _swap_background(data, "train", 24, tmp_path / "explain")
    config = DistilConfig(layers="none", erase=2)
    result = distil.run(
        ckpt, data, cfs.assign(round=1), cfs.iloc[:0], tmp_path / "explain", config, tmp_path / "out"
    )
    start, model = models.load(ckpt)[0], models.load(tmp_path / "out")[0]
    changed = {n for n, p in model.state_dict().items() if not torch.equal(p, start.state_dict()[n])}
    assert changed == {f"{dfr.last_linear(model)}.weight", f"{dfr.last_linear(model)}.bias"}
    assert result.card.metrics["erased_directions"] == 2 and "epochs" not in result.card.metrics
    assert not (tmp_path / "out" / "logs").exists()  # no training ran


def test_erase_vote_decides_a_rounds_erase_when_true_edits_share_the_direction(tiny_biased, tmp_path):
    """distil.erase_vote reaches the round: four edits judged true keep the direction of twenty-four spurious ones
    of the same kind only without the vote."""
    ckpt, data = tiny_biased
    cfs = _swap_background(data, "train", 24, tmp_path / "explain")
    few = cfs.head(4).assign(verdict="true")
    for vote in (False, True):
        config = DistilConfig(layers="none", erase=1, erase_vote=vote)
        out = tmp_path / f"out-{vote}"
        result = distil.run(ckpt, data, cfs, cfs.iloc[:0], tmp_path / "explain", config, out, evidence=few)
        assert result.card.metrics["erased_directions"] == int(vote)


def test_erase_alone_does_not_spare_true_edits_in_the_features_they_flipped(tiny_biased, tmp_path):
    """In the features of the classifier the edits were searched on, every flip moves along its decision direction,
    true or spurious alike: the erase-alone round (layers none, the explained weights) erases what twenty spurious
    edits moved although four edits judged true moved it too; erasing in other weights spares it."""
    ckpt, data = tiny_biased
    run, other = _four_true_twenty_spurious(ckpt, data, tmp_path)
    config = DistilConfig(layers="none", erase=1, erase_vote=False)
    for explained, erased in ((ckpt, 1), (other, 0)):
        out = tmp_path / f"out-{erased}"
        out.mkdir()
        distil.stage(run, [1], ckpt, explained, data, config, out)
        assert models.load_card(out).metrics["erased_directions"] == erased


def test_erase_spare_off_erases_what_true_edits_moved_too(tiny_biased, tmp_path):
    """distil.erase_spare: false: outside the searched-on features, the direction twenty spurious edits moved is
    erased although four edits judged true moved it too (on: spared, nothing erased)."""
    ckpt, data = tiny_biased
    run, other = _four_true_twenty_spurious(ckpt, data, tmp_path)
    for spare, erased in ((True, 0), (False, 1)):
        out = tmp_path / f"out-{spare}"
        out.mkdir()
        config = DistilConfig(layers="none", erase=1, erase_vote=False, erase_spare=spare)
        distil.stage(run, [1], ckpt, other, data, config, out)
        assert models.load_card(out).metrics["erased_directions"] == erased


def _four_true_twenty_spurious(ckpt, data, tmp_path):
    """A run whose round 1 holds 24 background swaps, four judged true and twenty spurious, and a copy of the
    classifier: the same weights, explained elsewhere (no longer the features the edits were searched on)."""
    run = tmp_path / "run"
    cfs = _swap_background(data, "train", 24, run / "explain")
    cfs.drop(columns=["label", "verdict"]).assign(success=True).to_csv(run / "explain" / "manifest.csv")
    (run / "feedback_r1").mkdir()
    verdicts = ["true"] * 4 + ["spurious"] * 20
    pd.DataFrame({"cf_id": cfs["id"], "label": verdicts}).to_csv(run / "feedback_r1" / "verdicts.csv")
    other = tmp_path / "other"
    shutil.copytree(ckpt, other)
    return run, other


def test_erase_clip_lets_many_small_edits_outweigh_a_few_huge_ones():
    """distil.erase_clip: twenty spurious edits move the features a little along one direction, three move them
    ten times as far along another. The raw changes' principal direction is the three's; shortened to the median
    length every verdict counts about once, and the direction is the twenty's. Rounds are clipped apart."""
    rng = np.random.default_rng(0)
    d = 16
    small = np.eye(d)[0] + 0.05 * rng.standard_normal((20, d))
    huge = 10 * (np.eye(d)[1] + 0.05 * rng.standard_normal((3, d)))
    change, table = np.concatenate([small, huge]), pd.DataFrame({"round": [1] * 23})
    assert abs(erase.principal(change, table, 1)[0] @ np.eye(d)[1]) > 0.99
    assert abs(erase.principal(change, table, 1, clip=True)[0] @ np.eye(d)[0]) > 0.99
    # a second round of huge edits alone keeps its own direction: the median is each round's
    two = pd.DataFrame({"round": [1] * 20 + [2] * 3})
    first, second = erase.principal(change, two, 1, clip=True)
    assert abs(first @ np.eye(d)[0]) > 0.99 and abs(second @ np.eye(d)[1]) > 0.99
    assert np.allclose(
        np.linalg.norm(erase.clipped(change), axis=1).max(), np.median(np.linalg.norm(change, axis=1))
    )


def test_erase_finetuned_off_erases_only_in_a_round_that_fine_tunes_nothing(tiny_biased, tmp_path):
    ckpt, data = tiny_biased
    cfs = _swap_background(data, "train", 24, tmp_path / "explain").assign(round=1)
    for layers, erased in (("all", None), ("none", 1)):
        config = DistilConfig(layers=layers, erase=1, erase_finetuned=False, epochs=1, passes=0)
        out = tmp_path / f"out-{layers}"
        card = distil.run(ckpt, data, cfs, cfs.iloc[:0], tmp_path / "explain", config, out).card
        assert card.metrics.get("erased_directions") == erased
        assert ("epochs" in card.metrics) == (layers == "all")


def _inverted(ckpt, out):
    """The classifier with its two output rows swapped: it says the other class for every image."""
    model, card = models.load(ckpt)
    head = model.get_submodule(dfr.last_linear(model))
    with torch.no_grad():
        head.weight.copy_(head.weight.flip(0))
        head.bias.copy_(head.bias.flip(0))
    models.save(model, card, out)
    return out


def test_soft_targets_carry_a_classifiers_probabilities_and_one_hot_labels(tiny_biased):
    ckpt, data = tiny_biased
    model, card = models.load(ckpt)
    train = ImageDataset(data, "train", card.classes, models.input_transform(card))
    p = distil.probabilities(ckpt, data, card.classes)
    x, _, _ = train[3]
    assert p.shape == (len(train), 2) and np.allclose(p.sum(1), 1, atol=1e-5)
    assert torch.allclose(torch.from_numpy(p[3]), torch.softmax(model.eval()(x[None]), -1)[0], atol=1e-5)
    soft, hard = distil.SoftTargets(train, 2, p), distil.SoftTargets(train, 2)
    assert torch.equal(soft[3][1], torch.from_numpy(p[3])) and soft.targets == train.targets
    assert hard[3][1].tolist() == [float(train.targets[3] == c) for c in range(2)]


def test_originals_follow_the_explained_classifier_not_their_labels(tiny_biased, tmp_path):
    """distil.originals: explained: the original training images are fitted to the explained classifier's
    probabilities. With a classifier that says the other class for every image, the fine-tuned one disagrees with
    most training labels; fitted to the labels, it agrees with them."""
    ckpt, data = tiny_biased
    cfs = _swap_background(data, "train", 8, tmp_path / "explain")
    config = DistilConfig(layers="all", erase=0, mix=0.1, epochs=4, passes=0, lr=3e-3)
    agreement = {}
    for name, soft_from in (("labels", None), ("explained", _inverted(ckpt, tmp_path / "inverted"))):
        out = tmp_path / name
        distil.run(ckpt, data, cfs, cfs.iloc[:0], tmp_path / "explain", config, out, soft_from=soft_from)
        model, card = models.load(out)
        train = ImageDataset(data, "train", card.classes, models.input_transform(card))
        predicted = torch.stack([model.eval()(train[i][0][None])[0] for i in range(len(train))]).argmax(1)
        agreement[name] = float((predicted == torch.tensor(train.targets)).float().mean())
    assert agreement["labels"] > 0.9 and agreement["explained"] < 0.5


def test_the_replay_diagnoses_teach_first_attempts_only_or_all_but_the_cast_and_restore_the_stage(
    monkeypatch, tmp_path
):
    """benchmarks/distil_replay.py --first-attempts: the distil stage sees the verdicts of attempt 1 alone;
    --without-casts: every verdict but those on the cast attempt (after the run's 2 attempts)."""
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))
    import distil_replay

    manifest = pd.DataFrame(
        {
            "id": ["a-to-1-a1", "a-to-1-a2", "b-to-1-a1", "b-to-1-a3"],
            "sample": ["a", "a", "b", "b"],
            "attempt": [1, 2, 1, 3],
            "counterfactual": ["a1.png", "a2.png", "b1.png", "b3.png"],
            "original": ["a.png", "a.png", "b.png", "b.png"],
            "source_class": ["0"] * 4,
            "target_class": ["1"] * 4,
            "success": [True] * 4,
        }
    )
    verdicts = pd.DataFrame({"cf_id": manifest["id"], "label": ["spurious"] * 4})
    every = distil.training_set
    with distil_replay.only_attempts("first_attempts", tmp_path):
        assert distil.training_set(manifest, verdicts, False)["id"].tolist() == ["a-to-1-a1", "b-to-1-a1"]
    assert distil.training_set is every
    (tmp_path / "config.yaml").write_text("explain:\n  search:\n    attempts: 2\n    cast: true\n")
    with distil_replay.only_attempts("without_casts", tmp_path):
        kept = distil.training_set(manifest, verdicts, False)["id"].tolist()
        assert kept == ["a-to-1-a1", "a-to-1-a2", "b-to-1-a1"]
    assert distil.training_set is every
    assert len(distil.training_set(manifest, verdicts, False)) == 4
    (tmp_path / "config.yaml").write_text("explain:\n  search:\n    attempts: 2\n    cast: false\n")
    with pytest.raises(SystemExit, match="no cast attempt"):
        distil_replay.only_attempts("without_casts", tmp_path)


def _cast_round(run_dir: Path, r: int, cast_verdicts: list[str]) -> None:
    """Round r's manifest and verdicts by hand: two images, a spurious search edit each (attempt 1) and a cast each
    (attempt 3 after 2 attempts) with the given verdicts."""
    folder = run_dir / manifest_module.folder(r)
    folder.mkdir(parents=True)
    rows, verdicts = [], []
    for i, verdict in enumerate(cast_verdicts):
        for attempt, label in ((1, "spurious"), (3, verdict)):
            cf_id = f"r{r}-s{i}-a{attempt}"
            rows.append(
                {
                    "id": cf_id,
                    "sample": f"s{i}",
                    "attempt": attempt,
                    "counterfactual": f"{cf_id}.png",
                    "original": f"s{i}.png",
                    "source_class": "0",
                    "target_class": "1",
                    "success": True,
                }
            )
            verdicts.append({"cf_id": cf_id, "label": label})
    pd.DataFrame(rows).to_csv(folder / manifest_module.NAME, index=False)
    path = feedback.verdicts_path(run_dir, r)
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(verdicts).to_csv(path, index=False)


def test_cast_vote_teaches_cast_verdicts_only_while_most_casts_were_judged_spurious(tmp_path):
    """Round 1: both casts spurious, taught. Round 2: one true, one spurious (3 of 4 spurious: still taught).
    Round 3: one true, one unsure, so 3 of 6 spurious, not most: a gain of the whole image is not (only) a shortcut
    here, and no cast verdict is taught any more, earlier rounds' included; the search edits' verdicts stay. Off,
    or without a cast attempt, every verdict counts."""
    _cast_round(tmp_path, 1, ["spurious", "spurious"])
    _cast_round(tmp_path, 2, ["true", "spurious"])
    _cast_round(tmp_path, 3, ["true", "unsure"])
    on = DistilConfig(cast_vote=True)
    assert len(distil.taught_verdicts(tmp_path, [1], on, cast_attempt=3)) == 4
    assert len(distil.taught_verdicts(tmp_path, [1, 2], on, cast_attempt=3)) == 8
    three = distil.taught_verdicts(tmp_path, [1, 2, 3], on, cast_attempt=3)
    assert sorted(three["id"]) == [f"r{r}-s{i}-a1" for r in (1, 2, 3) for i in (0, 1)]
    assert (
        len(distil.taught_verdicts(tmp_path, [1, 2, 3], DistilConfig(cast_vote=False), cast_attempt=3)) == 11
    )
    assert len(distil.taught_verdicts(tmp_path, [1, 2, 3], on, cast_attempt=None)) == 11


def test_spurious_off_mask_teaches_only_the_part_of_a_spurious_edit_off_the_feature_mask(
    tiny_biased, tmp_path, monkeypatch
):
    """distil.spurious_off_mask: a spurious edit that brightened square and background alike is taught (and erased)
    as its background part only, the square as it was; a true edit and an image without a mask keep the whole edit.
    Off, every verdict trains on the edit as judged."""
    ckpt, data = tiny_biased
    explain = tmp_path / "run" / manifest_module.folder(1)
    explain.mkdir(parents=True)
    rows, verdicts = [], []
    train = data.split("train").head(6)
    for i, row in enumerate(train.itertuples()):
        x = np.asarray(Image.open(data.root / row.path).convert("RGB"), np.float32)
        Image.fromarray(x.astype(np.uint8)).save(explain / f"o{i}.png")
        Image.fromarray(np.clip(x + 60, 0, 255).astype(np.uint8)).save(explain / f"c{i}.png")
        source = row.path if i < 5 else "images/elsewhere.png"  # the last image has no feature mask
        rows.append(
            {
                "id": f"e{i}",
                "sample": f"s{i}",
                "source_path": source,
                "attempt": 1,
                "counterfactual": f"c{i}.png",
                "original": f"o{i}.png",
                "source_class": row.label,
                "target_class": str(1 - int(row.label)),
                "success": True,
            }
        )
        verdicts.append({"cf_id": f"e{i}", "label": "true" if i == 4 else "spurious"})
    pd.DataFrame(rows).to_csv(explain / manifest_module.NAME, index=False)
    feedback.verdicts_path(tmp_path / "run", 1).parent.mkdir()
    pd.DataFrame(verdicts).to_csv(feedback.verdicts_path(tmp_path / "run", 1), index=False)

    parts = []
    real = distil.fine_tune  # the stage's fine-tune sees the parts; recorded, then run for real
    monkeypatch.setattr(distil, "fine_tune", lambda *a, **k: parts.append(a[3].copy()) or real(*a, **k))
    config = DistilConfig(spurious_off_mask=True, layers="all", epochs=1, passes=0, batch_size=8, keep="last")
    (tmp_path / "out").mkdir(), (tmp_path / "off").mkdir()  # the runner gives a stage its folder
    distil.stage(tmp_path / "run", [1], ckpt, ckpt, data, config, tmp_path / "out")
    taught = parts[0].set_index("id")
    assert sorted(taught.index) == ["e0", "e1", "e2", "e3", "e5"]  # the spurious verdicts
    for i, row in enumerate(train.head(4).itertuples()):
        part = np.asarray(Image.open(taught.loc[f"e{i}", "counterfactual"]), np.float32)
        original, edited = (np.asarray(Image.open(explain / f"{n}{i}.png"), np.float32) for n in "oc")
        square = np.asarray(Image.open(data.root / row.feature_mask)) > 127
        assert square.any() and (~square).any()
        assert np.array_equal(part[square], original[square])  # the evidence as it was
        assert np.array_equal(part[~square], edited[~square])  # the shortcut's change kept
        assert Path(taught.loc[f"e{i}", "counterfactual"]).parent == (tmp_path / "out" / "off_mask").resolve()
    assert (
        taught.loc["e5", "counterfactual"] == f"{manifest_module.folder(1)}/c5.png"
    )  # no mask: the whole edit
    recorded = pd.read_csv(tmp_path / "out" / "training_set.csv", keep_default_na=False).set_index("id")
    assert recorded.loc["e0", "counterfactual"] == f"{manifest_module.folder(1)}/c0.png"  # the edit judged
    assert (
        recorded.loc["e0", "feature_mask"] == train.iloc[0]["feature_mask"]
        and recorded.loc["e5", "feature_mask"] == ""
    )
    assert (tmp_path / "out" / models.CARD).is_file()

    parts.clear()
    distil.stage(
        tmp_path / "run",
        [1],
        ckpt,
        ckpt,
        data,
        replace(config, spurious_off_mask=False),
        tmp_path / "off",
    )
    assert set(parts[0]["counterfactual"]) == {
        f"{manifest_module.folder(1)}/c{i}.png" for i in (0, 1, 2, 3, 5)
    }
    assert not (tmp_path / "off" / "off_mask").exists()
