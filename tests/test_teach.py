import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pipeline import config, manifest, square, teach
from pipeline.config import ClassifierConfig
from pipeline.data import load_folder
from pipeline.errors import UserError
from pipeline.store import FeedbackStore
from pipeline.train import run as train


@pytest.fixture(scope="module")
def unbiased(tmp_path_factory):
    root = tmp_path_factory.mktemp("unbiased")
    square.generate(root / "data", config.SquareConfig(n=400, size=32, poison=0.5, seed=9))
    train(
        load_folder(root / "data"),
        ClassifierConfig(arch="small_cnn", epochs=6, batch_size=32, lr=3e-3),
        32,
        root / "reference",
    )
    return root


def _hand_made_counterfactuals(run_dir, data_root, kinds=("square", "background")):
    """Real test images edited by hand: one edit recolours the square (true evidence), one the background, and
    (kind "mixed") one moves every pixel by 40 grey levels, square and background alike (ambiguous)."""
    table = pd.read_csv(data_root / "metadata.csv")
    test = table[(table["split"] == "test") & (table["label"] == 0)].head(6)
    (run_dir / "explain" / "originals").mkdir(parents=True)
    (run_dir / "explain" / "counterfactuals").mkdir()
    rows, truth = [], {}
    for row in test.itertuples():
        image = np.asarray(Image.open(data_root / row.path)).copy()
        mask = np.asarray(Image.open(data_root / row.feature_mask)) > 0
        original = f"originals/{row.Index}.png"
        Image.fromarray(image).save(run_dir / "explain" / original)
        for kind in kinds:
            edited = image.copy()
            if kind == "square":
                edited[mask] = [240, 0, 0]  # the red intensity itself: class 1 evidence
            elif kind == "mixed":
                edited = np.where(image < 200, image + 40, image - 40).astype(np.uint8)
            else:
                edited[~mask] = np.clip(255 - edited[~mask].astype(int), 0, 255)  # invert the background
            cf_id = f"{row.Index}-{kind}"
            Image.fromarray(edited).save(run_dir / "explain" / f"counterfactuals/{cf_id}.png")
            truth[cf_id] = {"square": "true", "background": "spurious", "mixed": "unsure"}[kind]
            rows.append(
                {
                    "id": cf_id,
                    "source_path": row.path,
                    "original": original,
                    "counterfactual": f"counterfactuals/{cf_id}.png",
                    "source_class": "0",
                    "target_class": "1",
                    "success": True,
                }
            )
    rows.append({**rows[0], "id": "failed", "success": False})  # did not flip: no verdict
    pd.DataFrame(rows).to_csv(run_dir / "explain" / "manifest.csv", index=False)
    return truth


def test_mask_oracle_matches_mask_ground_truth(tmp_path, unbiased):
    truth = _hand_made_counterfactuals(tmp_path, unbiased / "data")
    result = teach.run(tmp_path, "mask", unbiased / "data", oracle="density")
    labels = FeedbackStore(tmp_path / "feedback.sqlite").labels().set_index("cf_id")["label"]
    assert result["labelled"] == 12 and "failed" not in labels
    assert labels.to_dict() == truth
    assert set(FeedbackStore(tmp_path / "feedback.sqlite").events()["annotator"]) == {"teacher:mask"}
    teach.run(
        tmp_path, "mask", unbiased / "data", oracle="density"
    )  # the same verdicts again: nothing appended
    assert len(FeedbackStore(tmp_path / "feedback.sqlite").events()) == 12


def test_progress_is_the_share_of_the_way_to_the_goal_in_log_odds():
    # logit(0.1) = -logit(0.9): p = 0.5 lies half-way; no progress below the start; a flip is past the goal
    got = manifest.progress([0.1, 0.1, 0.1, 0.1], [0.5, 0.05, 0.95, 0.1], 0.9)
    np.testing.assert_allclose(got, [0.5, 0.0, 1.0, 0.0], atol=1e-6)


def test_a_near_flip_is_judged_only_when_feedback_partial_reaches_it(tmp_path, unbiased):
    truth = _hand_made_counterfactuals(tmp_path, unbiased / "data")
    path = tmp_path / "explain" / "manifest.csv"
    table = pd.read_csv(path)
    table["progress"] = np.where(table["success"], 1.0, 0.2)  # "failed" came a fifth of the way
    near = table[table["id"].str.endswith("background")].iloc[0].to_dict()
    table = pd.concat([table, pd.DataFrame([{**near, "id": "near", "success": False, "progress": 0.6}])])
    table.to_csv(path, index=False)
    flips = teach.run(tmp_path, "mask", unbiased / "data", oracle="density")
    assert flips["labelled"] == 12 and flips["not_flipped"] == 2
    wider = teach.run(tmp_path, "mask", unbiased / "data", oracle="density", partial=0.5)
    labels = FeedbackStore(tmp_path / "feedback.sqlite").labels().set_index("cf_id")["label"]
    assert wider["labelled"] == 13 and wider["not_flipped"] == 1 and "failed" not in labels
    assert labels["near"] == "spurious" and labels.drop("near").to_dict() == truth  # judged like any edit


def test_the_interventional_oracle_on_a_run_matches_the_ground_truth(tmp_path, unbiased):
    """Real images, real classifier: the unbiased one (it reads the square) as the explained classifier."""
    import json
    import shutil

    truth = _hand_made_counterfactuals(tmp_path, unbiased / "data")
    shutil.copytree(unbiased / "reference", tmp_path / "classifier")
    (tmp_path / "explain" / "desiderata.json").write_text(json.dumps({"explained": "classifier"}))
    result = teach.run(tmp_path, "mask", unbiased / "data", oracle="intervention")
    labels = FeedbackStore(tmp_path / "feedback.sqlite").labels().set_index("cf_id")["label"]
    assert result["labelled"] == 12 and labels.to_dict() == truth


def test_density_then_intervention_asks_the_classifier_only_where_density_is_unsure(tmp_path, unbiased):
    """oracle density+intervention: the density rule's sure verdicts stand; the edits it is unsure of (every pixel
    moved alike) get the interventional verdict, whose classifier reads the square."""
    import json
    import shutil

    truth = _hand_made_counterfactuals(tmp_path, unbiased / "data", ("square", "background", "mixed"))
    shutil.copytree(unbiased / "reference", tmp_path / "classifier")
    (tmp_path / "explain" / "desiderata.json").write_text(json.dumps({"explained": "classifier"}))
    result = teach.run(tmp_path, "mask", unbiased / "data", band=2.0, oracle="density+intervention")
    labels = FeedbackStore(tmp_path / "feedback.sqlite").labels().set_index("cf_id")["label"]
    edits = manifest.judged(manifest.read(tmp_path / "explain"), 1.0)
    checkpoint = tmp_path / "classifier"
    by_intervention = teach.intervention_verdicts(
        edits, tmp_path / "explain", unbiased / "data", checkpoint, 2.0
    )
    mixed = [k for k in truth if k.endswith("mixed")]
    assert result["labelled"] == 18 and result.get("unsure", 0) < 6  # the classifier decided some mixed edits
    assert {k: labels[k] for k in truth if k not in mixed} == {
        k: v for k, v in truth.items() if k not in mixed
    }
    assert {k: labels[k] for k in mixed} == by_intervention[mixed].to_dict()
    # intervention_true off: its true verdicts leave the edit unsure, its spurious ones stand
    assert (by_intervention[mixed] == "true").any()
    teach.run(
        tmp_path, "mask", unbiased / "data", band=2.0, oracle="density+intervention", intervention_true=False
    )
    labels = FeedbackStore(tmp_path / "feedback.sqlite").labels().set_index("cf_id")["label"]
    assert {k: labels[k] for k in mixed} == by_intervention[mixed].replace("true", "unsure").to_dict()
    assert {k: labels[k] for k in truth if k not in mixed} == {
        k: v for k, v in truth.items() if k not in mixed
    }
    with pytest.raises(UserError, match="unknown mask oracle"):
        teach.run(tmp_path, "mask", unbiased / "data", oracle="vote")


def test_model_oracle_matches_mask_ground_truth(tmp_path, unbiased):
    truth = _hand_made_counterfactuals(tmp_path, unbiased / "data")
    result = teach.run(tmp_path, "model", unbiased / "data", unbiased / "reference")
    labels = FeedbackStore(tmp_path / "feedback.sqlite").labels().set_index("cf_id")["label"]
    assert result["labelled"] + result["abstained"] == 12 and result["not_flipped"] == 1
    agree = np.mean([labels[k] == truth[k] for k in labels.index])
    assert result["labelled"] >= 10 and agree >= 0.9


def test_noise_flips_a_share_of_verdicts(tmp_path, unbiased):
    truth = _hand_made_counterfactuals(tmp_path, unbiased / "data")
    teach.run(tmp_path, "mask", unbiased / "data", noise=0.5, seed=1, oracle="density")
    labels = FeedbackStore(tmp_path / "feedback.sqlite").labels().set_index("cf_id")["label"]
    flipped = sum(labels[k] != truth[k] for k in labels.index)
    assert 2 <= flipped <= 10
    with pytest.raises(UserError, match="unknown teacher"):
        teach.run(tmp_path, "oracle", unbiased / "data")
    with pytest.raises(UserError, match="needs the reference classifier"):
        teach.run(tmp_path, "model", unbiased / "data", tmp_path / "nothing")


def test_banded_verdicts():
    assert [teach.banded(s, 1.0) for s in (0.0, 0.99, 1.0, 1.01, 50)] == ["spurious"] * 3 + ["true"] * 2
    assert [teach.banded(s, 2.0) for s in (0.5, 0.51, 1.0, 2.0, 2.01)] == ["spurious"] + ["unsure"] * 3 + [
        "true"
    ]


def test_the_mask_oracle_is_unsure_of_an_edit_that_moves_square_and_background_alike(tmp_path, unbiased):
    truth = _hand_made_counterfactuals(tmp_path, unbiased / "data", ("square", "background", "mixed"))
    result = teach.run(tmp_path, "mask", unbiased / "data", band=2.0, oracle="density")
    labels = FeedbackStore(tmp_path / "feedback.sqlite").labels().set_index("cf_id")["label"]
    assert labels.to_dict() == truth and result["unsure"] == 6
    # the authors' oracle (band 1) never abstains: the ambiguous edits get a verdict too
    manifest = pd.read_csv(tmp_path / "explain" / "manifest.csv").query("success")
    authors = teach.mask_verdicts(manifest, tmp_path / "explain", unbiased / "data")
    assert len(authors) == 18 and set(authors) <= {"true", "spurious"}


def test_the_model_oracles_band_only_turns_verdicts_unsure(tmp_path, unbiased):
    _hand_made_counterfactuals(tmp_path, unbiased / "data", ("square", "background", "mixed"))
    # class names as text, as the run reads them
    table = manifest.flipped(manifest.read(tmp_path / "explain"))
    plain = teach.model_verdicts(table, tmp_path / "explain", unbiased / "reference")
    banded = teach.model_verdicts(table, tmp_path / "explain", unbiased / "reference", band=2.0)
    assert len(plain) >= 15 and set(plain) <= {"true", "spurious"} and list(banded.index) == list(plain.index)
    assert ((banded == plain) | (banded == "unsure")).all()


def test_the_reference_verdict_with_moved_spares_an_edit_that_took_the_reference_part_of_the_way():
    # before -4: the reference is sure of the source class; band 2: true above odds 2, spurious at or below 1/2
    assert [teach.reference_verdict(-4.0, a, 2.0) for a in (-3.9, -1.0, 0.0, 0.5, 1.0)] == [
        "spurious",
        "spurious",
        "unsure",
        "unsure",
        "true",
    ]
    moved = [teach.reference_verdict(-4.0, a, 2.0, moved=True) for a in (-3.9, -2.1, -1.9, -1.0, 1.0)]
    assert moved == ["spurious", "spurious", "unsure", "unsure", "true"]
    # band 1 is the authors' oracle with or without moved: flipped or spurious
    assert [teach.reference_verdict(-4.0, a, 1.0, moved=True) for a in (-0.1, 0.1)] == ["spurious", "true"]


def test_the_model_oracle_with_moved_calls_a_weak_evidence_edit_unsure_and_a_background_edit_spurious(
    tmp_path, unbiased
):
    """Real test images, the square recoloured part of the way to class 1's red (weak evidence) and the background
    inverted (the shortcut): only edits the reference moved more than half way toward its flip turn unsure."""
    _hand_made_counterfactuals(tmp_path, unbiased / "data", ("square", "background"))
    explain = tmp_path / "explain"
    table = manifest.flipped(manifest.read(explain))
    rows = []
    for row in table[table["id"].str.endswith("square")].itertuples():
        original = np.asarray(Image.open(explain / row.original), float)
        full = np.asarray(Image.open(explain / row.counterfactual), float)
        for share in np.linspace(0.05, 0.95, 19):  # the way from the original to the full recolour
            cf_id = f"{row.id}-{share:.2f}"
            Image.fromarray((original + share * (full - original)).round().astype(np.uint8)).save(
                explain / f"counterfactuals/{cf_id}.png"
            )
            rows.append(row._asdict() | {"id": cf_id, "counterfactual": f"counterfactuals/{cf_id}.png"})
    table = pd.concat([table, pd.DataFrame(rows).drop(columns="Index")], ignore_index=True)
    plain = teach.model_verdicts(table, explain, unbiased / "reference", band=2.0)
    moved = teach.model_verdicts(table, explain, unbiased / "reference", band=2.0, moved=True)
    assert len(moved) == 126 and list(moved.index) == list(plain.index)
    changed = moved != plain
    assert changed.any() and (plain[changed] == "spurious").all() and (moved[changed] == "unsure").all()
    background = moved.index.str.endswith("background")
    assert background.sum() >= 5 and (moved[background] == "spurious").all()


def test_noise_swaps_true_and_spurious_and_leaves_unsure_alone(tmp_path, unbiased):
    _hand_made_counterfactuals(tmp_path, unbiased / "data", ("square", "background", "mixed"))
    teach.run(tmp_path, "mask", unbiased / "data", noise=1.0, band=2.0, oracle="density")
    labels = FeedbackStore(tmp_path / "feedback.sqlite").labels().set_index("cf_id")["label"]
    expected = {"square": "spurious", "background": "true", "mixed": "unsure"}
    assert labels.to_dict() == {k: expected[k.split("-", 1)[1]] for k in labels.index}


class _Regions(torch.nn.Module):
    """A hand-made two-class classifier on 16 px images: class 1's logit reads the object (the centre 6 x 6) with
    weight ``a`` and a corner patch (top-left 3 x 3) with weight ``b``; ``both`` needs object and patch at once."""

    def __init__(self, a: float, b: float, both: bool = False):
        super().__init__()
        self.a, self.b, self.both = a, b, both

    def forward(self, x):
        obj, patch = x[:, :, 5:11, 5:11].mean((1, 2, 3)), x[:, :, :3, :3].mean((1, 2, 3))
        score = torch.minimum(obj, patch) * 40 if self.both else self.a * obj + self.b * patch
        return torch.stack([torch.zeros_like(score), score], 1)


def _edit(where: dict[str, float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, x_cf, object mask): a dark image, and a copy brightened by the given amount in each region."""
    x = torch.full((1, 3, 16, 16), -0.6)
    x_cf = x.clone()
    x_cf[:, :, 5:11, 5:11] += where.get("object", 0.0)
    x_cf[:, :, :3, :3] += where.get("patch", 0.0)
    x_cf += where.get("everywhere", 0.0)
    mask = torch.zeros(1, 1, 16, 16)
    mask[:, :, 5:11, 5:11] = 1
    return x, x_cf, mask


@pytest.mark.parametrize(
    "model, edit, verdict",
    [
        (_Regions(0, 20), {"patch": 1.2}, "spurious"),  # the patch recoloured: a shortcut edit
        (_Regions(20, 0), {"object": 1.2}, "true"),  # the object changed: real evidence
        # a tint over everything, strongest on the object (the density rule would call it true): the flip comes
        # from the patch's share of it
        (_Regions(0, 20), {"object": 1.4, "everywhere": 0.7}, "spurious"),
        (_Regions(20, 20), {"object": 0.8, "patch": 0.8}, "unsure"),  # both carry the flip alike
    ],
)
def test_the_interventional_oracle_finds_the_part_that_flips(model, edit, verdict):
    x, x_cf, mask = _edit(edit)
    assert int(model(x_cf).argmax()) == 1 and int(model(x).argmax()) == 0  # a real counterfactual
    assert teach.banded(teach.intervention_score(model, x, x_cf, mask, 1), band=2.0) == verdict
    if edit.get("everywhere"):  # where the density rule goes wrong: most of the change lies on the object
        delta = (x_cf - x).abs().sum(1)[0]
        assert (delta * mask[0, 0]).mean() / (delta.mean() * mask.mean()) > 2.0


def test_the_interventional_oracle_defers_when_only_both_parts_together_flip():
    x, x_cf, mask = _edit({"object": 1.2, "patch": 1.2})
    model = _Regions(0, 0, both=True)
    assert int(model(x_cf).argmax()) == 1
    assert teach.intervention_score(model, x, x_cf, mask, 1) is None  # the density rule decides


def test_the_interventional_oracle_needs_the_explained_classifier(tmp_path):
    (tmp_path / "explain").mkdir()
    (tmp_path / "explain" / "desiderata.json").write_text("{}")
    with pytest.raises(UserError, match="needs the classifier explain explained"):
        teach.explained(tmp_path, 1)


def test_a_simulated_teacher_rejects_edits_its_realism_proxy_calls_unrealistic(tmp_path, unbiased):
    truth = _hand_made_counterfactuals(tmp_path, unbiased / "data")
    path = tmp_path / "explain" / "manifest.csv"
    table = pd.read_csv(path)
    table["realism"] = np.where(
        table["id"].str.endswith("background"), 3.0, 1.2
    )  # the proxy, as explain writes it
    table.to_csv(path, index=False)
    result = teach.run(tmp_path, "mask", unbiased / "data", oracle="density", unrealistic=2.0)
    labels = FeedbackStore(tmp_path / "feedback.sqlite").labels().set_index("cf_id")["label"]
    expected = {k: "unrealistic" if k.endswith("background") else v for k, v in truth.items()}
    assert labels.to_dict() == expected and result["unrealistic"] == 6


def test_the_density_rule_weighs_a_pixel_by_its_largest_channel_not_its_sum(tmp_path):
    """A gain over a red square on a grey background changes every pixel's largest channel alike: an even edit
    (unsure), not a background edit because a grey pixel has three channels to change."""
    data, explain = tmp_path / "data", tmp_path / "explain"
    (data / "masks").mkdir(parents=True)
    explain.mkdir()
    image = np.full((32, 32, 3), 120, np.uint8)
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    image[mask > 0] = [120, 0, 0]
    Image.fromarray(image).save(data / "a.png")
    Image.fromarray(mask).save(data / "masks" / "a.png")
    pd.DataFrame([{"path": "a.png", "label": 0, "feature_mask": "masks/a.png"}]).to_csv(data / "metadata.csv")
    Image.fromarray(image).save(explain / "original.png")
    edits = {
        "cast": (image * 0.6).astype(np.uint8),
        "square": np.where(mask[..., None] > 0, [240, 0, 0], image).astype(np.uint8),
        "background": np.where(mask[..., None] > 0, image, 255 - image).astype(np.uint8),
    }
    for name, edited in edits.items():
        Image.fromarray(edited).save(explain / f"{name}.png")
    table = pd.DataFrame(
        [
            {"id": n, "source_path": "a.png", "original": "original.png", "counterfactual": f"{n}.png"}
            for n in edits
        ]
    )
    verdicts = teach.mask_verdicts(table, explain, data, band=2.0)
    assert verdicts.to_dict() == {"cast": "unsure", "square": "true", "background": "spurious"}


@pytest.fixture(scope="module")
def three_classes(tmp_path_factory):
    """Unconfounded Shapes (three objects) and a reference trained on it: (root, test rows it reads right)."""
    from pipeline import models, shapes
    from pipeline.evaluate import evaluate

    root = tmp_path_factory.mktemp("three")
    shapes.generate(root / "data", shapes.ShapesConfig(n=300, poison=1 / 3, seed=5))
    data = load_folder(root / "data")
    train(
        data,
        ClassifierConfig(arch="small_cnn", epochs=8, batch_size=32, lr=3e-3),
        [48, 64],
        root / "reference",
    )
    _, predictions = evaluate(*models.load(root / "reference"), data)
    read = predictions["pred"].map(data.classes.__getitem__) == predictions["label"].astype(str)
    return root, predictions[read]


def test_the_model_oracle_with_other_class_calls_an_edit_the_reference_reads_as_a_third_class_unsure(
    three_classes,
):
    """feedback.other_class_unsure: real test images, each original replaced by another real image. One of the
    target class: true either way. One of the third class: the authors' oracle calls it spurious (the reference
    did not flip to the target), which would teach the source label for an image the unbiased reference reads as
    the third class; the switch says unsure. The original itself, re-saved: spurious either way."""
    root, read = three_classes
    explain = root / "explain"
    (explain / "originals").mkdir(parents=True, exist_ok=True)
    classes = sorted(read["label"].astype(str).unique())
    assert len(classes) == 3
    by_class = {c: read[read["label"].astype(str) == c]["path"].tolist() for c in classes}
    rows = []
    for i, (source, target) in enumerate(
        [(classes[0], classes[1]), (classes[1], classes[2]), (classes[2], classes[0])]
    ):
        third = next(c for c in classes if c not in (source, target))
        original = f"originals/{i}.png"
        Image.open(root / "data" / by_class[source][i]).save(explain / original)
        for kind, path in (("target", by_class[target][i]), ("third", by_class[third][i]), ("same", None)):
            cf = f"counterfactuals/{i}-{kind}.png"
            (explain / "counterfactuals").mkdir(exist_ok=True)
            Image.open(root / "data" / path if path else explain / original).save(explain / cf)
            rows.append(
                {
                    "id": f"{i}-{kind}",
                    "original": original,
                    "counterfactual": cf,
                    "source_class": source,
                    "target_class": target,
                }
            )
    table = pd.DataFrame(rows)
    authors = teach.model_verdicts(table, explain, root / "reference")
    switched = teach.model_verdicts(table, explain, root / "reference", other_class=True)
    kind = pd.Series(table["id"].str.split("-").str[1].to_numpy(), index=table["id"])
    assert (authors[kind == "target"] == "true").all() and (switched[kind == "target"] == "true").all()
    assert (authors[kind == "third"] == "spurious").all() and (switched[kind == "third"] == "unsure").all()
    assert (authors[kind == "same"] == "spurious").all() and (switched[kind == "same"] == "spurious").all()
