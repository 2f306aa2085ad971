"""The benchmark scripts' own arithmetic (their measurements run in benchmarks/, not here)."""

import json
from pathlib import Path

import numpy as np
import pandas as pd


def _run(worst_group: float, gap: float, validity: float = 1.0) -> dict:
    return {
        "cfkd": {
            "model": "distil_r2",
            "worst_group_accuracy": worst_group,
            "gap_closed_worst_group": gap,
            "rounds": [{"worst_group_accuracy": 0.0}, {"worst_group_accuracy": worst_group}],
        },
        "explain": {"validity_by_attempt": {"1": validity}, "evaluations_per_counterfactual": 90.0},
        "shares": {"round_1": {"shortcut_median_a1": 0.5}},
    }


def test_replicates_merge_files_in_order_and_count_the_targets_each_replicate_meets(monkeypatch, tmp_path):
    """benchmarks/replicates.py: a later file only fills in runs the earlier ones lack; mean and range per
    dataset; the gap target differs by teacher (mask 0.8, model 0.7)."""
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))
    import replicates

    files = {
        "a.json": {"square": {"mask": _run(0.9, 0.95)}, "stain": {"mask": _run(0.0, 0.0, validity=0.9)}},
        "b.json": {"square": {"mask": _run(0.1, 0.1), "model": _run(0.6, 0.75)}},
        "c.json": {"square": {"mask": _run(0.7, 0.75), "model": _run(0.5, 0.6)}},
    }
    for name, datasets in files.items():
        (tmp_path / name).write_text(json.dumps({"datasets": datasets}))
    runs = {
        "one": replicates.merged([str(tmp_path / "a.json"), str(tmp_path / "b.json")]),
        "two": replicates.merged([str(tmp_path / "c.json")]),
    }
    assert runs["one"][("square", "mask")]["cfkd"]["worst_group_accuracy"] == 0.9  # a.json first
    summary = replicates.summarise(runs)
    square = summary["teachers"]["mask"]["square"]
    assert square["worst_group"] == {"mean": 0.8, "min": 0.7, "max": 0.9}
    assert list(summary["teachers"]["mask"]) == ["square", "stain"]
    assert summary["acceptance"]["mask"]["one"] == {
        "datasets": 2,
        "mean_worst_group": 0.45,
        "gap_target_met": 1,
        "validity_target_met": 1,
    }
    assert summary["acceptance"]["mask"]["two"]["gap_target_met"] == 0  # 0.75 < 0.8 for the mask teacher
    assert summary["acceptance"]["model"]["one"]["gap_target_met"] == 1  # 0.75 >= 0.7 for the model teacher
    assert summary["acceptance"]["model"]["two"]["gap_target_met"] == 0
    assert "0.00, 0.90 -> 0.90 (0.95)" in replicates.markdown(summary, ["one", "two"])


def test_replicates_table_shows_a_run_without_a_gap_to_close(monkeypatch):
    """The suite writes gap_closed_worst_group = None where biased and reference were equal: the table says "-"."""
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))
    import replicates

    run = _run(1.0, 0.0) | {"file": "x.json"}
    run["cfkd"]["gap_closed_worst_group"] = None
    summary = replicates.summarise({"one": {("shapes", "mask"): run}})
    assert summary["acceptance"]["mask"]["one"]["gap_target_met"] == 0
    assert "| shapes | mask | 0.00, 1.00 -> 1.00 (-) | 1.0 |" in replicates.markdown(summary, ["one"])


def test_judged_same_compares_edit_sizes_per_attempt_over_edits_that_flipped_in_both(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))
    import judged_same

    index = pd.MultiIndex.from_tuples(
        [("s0", "b", 1), ("s1", "b", 1), ("s2", "b", 1), ("s0", "b", 2), ("s1", "b", 2)],
        names=judged_same.KEY,
    )
    a = pd.DataFrame({"l1": [1.0, 2.0, 4.0, 1.0, 1.0], "success": [True, True, True, True, False]}, index)
    b = pd.DataFrame({"l1": [1.1, 2.2, 2.0, 0.5, 9.0], "success": [True, True, False, True, True]}, index)
    ratios = judged_same.l1_ratios(a, b)
    # attempt 1: s2 did not flip in the second run and is left out; attempt 2: s1 did not flip in the first
    assert ratios["1"][0] == 1.1 and ratios["2"] == [0.5, 0.5]
    p = pd.Series([0.9, 0.7, 0.1, 0.6, 0.99], index)
    assert judged_same.medians(p, a.success & b.success) == {"1": 0.8, "2": 0.6}


def test_select_trusted_replays_the_products_choice_on_a_draw_of_the_trusted_set(monkeypatch):
    """benchmarks/select_trusted.py: a draw of the trusted set is scored per label x group cell, and the choice is
    rounds.select_trusted's on those rows alone."""
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))
    import select_trusted

    rows = pd.DataFrame({"label": ["0", "0", "1", "1"], "group": ["a", "b", "a", "b"]})
    tables = {
        "classifier": rows.assign(pred=[0, 0, 0, 1]),  # wrong on (1, a) only
        "distil_r1": rows.assign(pred=[0, 1, 1, 1]),  # wrong on (0, b) only
    }
    metrics = {
        "classifier": {"accuracy": 0.5, "worst_group_accuracy": 0.0},
        "rounds": [{"model": "distil_r1"}],
    }
    metrics["rounds"][0] |= {"test_accuracy": 0.9, "worst_group_accuracy": 0.8}
    classes = ["0", "1"]
    assert select_trusted.choose(metrics, tables, classes, None) == "classifier"  # a tie: the earlier
    assert select_trusted.choose(metrics, tables, classes, [0, 2, 3]) == "distil_r1"  # no (0, b) drawn
    assert select_trusted.choose(metrics, tables, classes, [0, 1, 3]) == "classifier"  # no (1, a) drawn
    runs = {"suite-x-mask-t": {k: 0.5 for k in ("label_free", "last_round", "best_of_run", "trusted_all")}}
    runs["suite-x-mask-t"] |= {"trusted_60": 0.25, "trusted_24": 0.75}
    assert select_trusted.summary(runs) == {"mask": {"runs": 1, **runs["suite-x-mask-t"]}}


def test_erase_geometry_measures_what_an_erase_leaves_readable(monkeypatch):
    """benchmarks/erase_geometry.py: the share of the changes' energy left after projecting directions out."""
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))
    import erase_geometry

    change = np.array([[3.0, 4.0, 0.0], [0.0, 0.0, 0.0]])
    assert erase_geometry.residual(change, np.zeros((0, 3))) == 1.0
    assert np.isclose(erase_geometry.residual(change, np.array([[1.0, 0.0, 0.0]])), 16 / 25)
    assert np.isclose(erase_geometry.residual(change, np.array([[0.6, 0.8, 0.0]])), 0.0)


def test_erase_rank_replays_the_hold_and_verdicts_choices_on_a_sweep(monkeypatch):
    """benchmarks/erase_rank.py: hold takes the first rank holding 90 % of the spurious edits (else the cap);
    verdicts passes over a rank where the true edits keep less than two thirds of their reach with one direction
    (else one direction), and is hold where no edit was judged true."""
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))
    import erase_rank

    def sweep(held, reached, true=8):  # ranks past the fifth as the fifth (the script sweeps eight)
        held, reached = held + held[-1:] * 3, reached + reached[-1:] * 3
        ranks = {
            str(k): {"worst_group": k / 10, "spurious_held": h, "true_reached": r}
            for k, (h, r) in enumerate(zip(held, reached), 1)
        }
        return {"true": true, "spurious": 20, "cap": 4, "ranks": ranks}

    object_lost = sweep([0.3, 0.5, 0.92, 0.95, 1.0], [0.99, 0.85, 0.5, 0.5, 0.5])
    assert erase_rank.chooses(object_lost) == {"hold": 3, "verdicts": 1}
    kept_enough = sweep([0.3, 0.5, 0.92, 0.95, 1.0], [0.9, 0.3, 0.5, 0.61, 0.7])
    assert erase_rank.chooses(kept_enough) == {"hold": 3, "verdicts": 4}
    never_held = sweep([0.3, 0.5, 0.6, 0.7, 0.95], [1.0] * 5, true=0)  # rank 5 is past the cap
    assert erase_rank.chooses(never_held) == {"hold": 4, "verdicts": 4}
    sums = erase_rank.summary({"a": object_lost, "b": kept_enough})
    assert sums["sum_worst_group_hold"] == 0.6 and sums["sum_worst_group_verdicts"] == 0.5
    assert object_lost["verdicts_chooses"] == 1 and sums["sum_worst_group"][2] == 0.4


def test_distil_replay_reuses_the_rounds_fine_tuned_layers(tiny_biased, tmp_path, monkeypatch):
    """benchmarks/distil_replay.py --fine-tuned: inside the context the stage's fine-tune loads the round's saved
    layers instead of training, and only erase settings may vary (anything else fine-tunes other layers)."""
    import torch

    from pipeline import distil, models

    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))
    import distil_replay

    ckpt, data = tiny_biased
    saved, card = models.load(ckpt)
    with torch.no_grad():
        for weight in saved.parameters():
            weight.add_(0.5)
    models.save(saved, card, tmp_path / "distil_r2")
    fresh, _ = models.load(ckpt)
    real = distil.fine_tune
    with distil_replay.fine_tuned_from(tmp_path / "distil_r2"):
        assert distil.fine_tune(fresh, card, data, None, None, None, None, None, False, None) == {}
    assert distil.fine_tune is real
    pairs = zip(fresh.state_dict().values(), saved.state_dict().values())
    assert all(torch.allclose(a, b) for a, b in pairs)
    assert distil_replay.erase_only({"erase": "hold", "erase_ranks": False, "erase_spare": False})
    assert not distil_replay.erase_only({"erase_ranks": True, "start": "latest"})
