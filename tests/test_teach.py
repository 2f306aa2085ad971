import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline import config, square, teach
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
    result = teach.run(tmp_path, "mask", unbiased / "data")
    labels = FeedbackStore(tmp_path / "feedback.sqlite").labels().set_index("cf_id")["label"]
    assert result["labelled"] == 12 and "failed" not in labels
    assert labels.to_dict() == truth
    assert set(FeedbackStore(tmp_path / "feedback.sqlite").events()["annotator"]) == {"teacher:mask"}
    teach.run(tmp_path, "mask", unbiased / "data")  # the same verdicts again: nothing appended
    assert len(FeedbackStore(tmp_path / "feedback.sqlite").events()) == 12


def test_model_oracle_matches_mask_ground_truth(tmp_path, unbiased):
    truth = _hand_made_counterfactuals(tmp_path, unbiased / "data")
    result = teach.run(tmp_path, "model", unbiased / "data", unbiased / "reference")
    labels = FeedbackStore(tmp_path / "feedback.sqlite").labels().set_index("cf_id")["label"]
    assert result["labelled"] + result["abstained"] == 12 and result["not_flipped"] == 1
    agree = np.mean([labels[k] == truth[k] for k in labels.index])
    assert result["labelled"] >= 10 and agree >= 0.9


def test_noise_flips_a_share_of_verdicts(tmp_path, unbiased):
    truth = _hand_made_counterfactuals(tmp_path, unbiased / "data")
    teach.run(tmp_path, "mask", unbiased / "data", noise=0.5, seed=1)
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
    result = teach.run(tmp_path, "mask", unbiased / "data", band=2.0)
    labels = FeedbackStore(tmp_path / "feedback.sqlite").labels().set_index("cf_id")["label"]
    assert labels.to_dict() == truth and result["unsure"] == 6
    # the authors' oracle (band 1) never abstains: the ambiguous edits get a verdict too
    manifest = pd.read_csv(tmp_path / "explain" / "manifest.csv").query("success")
    authors = teach.mask_verdicts(manifest, tmp_path / "explain", unbiased / "data")
    assert len(authors) == 18 and set(authors) <= {"true", "spurious"}


def test_the_model_oracles_band_only_turns_verdicts_unsure(tmp_path, unbiased):
    _hand_made_counterfactuals(tmp_path, unbiased / "data", ("square", "background", "mixed"))
    manifest = pd.read_csv(tmp_path / "explain" / "manifest.csv").query("success")
    plain = teach.model_verdicts(manifest, tmp_path / "explain", unbiased / "reference")
    banded = teach.model_verdicts(manifest, tmp_path / "explain", unbiased / "reference", band=2.0)
    assert set(plain) <= {"true", "spurious"} and list(banded.index) == list(plain.index)
    assert ((banded == plain) | (banded == "unsure")).all()


def test_noise_swaps_true_and_spurious_and_leaves_unsure_alone(tmp_path, unbiased):
    _hand_made_counterfactuals(tmp_path, unbiased / "data", ("square", "background", "mixed"))
    teach.run(tmp_path, "mask", unbiased / "data", noise=1.0, band=2.0)
    labels = FeedbackStore(tmp_path / "feedback.sqlite").labels().set_index("cf_id")["label"]
    expected = {"square": "spurious", "background": "true", "mixed": "unsure"}
    assert labels.to_dict() == {k: expected[k.split("-", 1)[1]] for k in labels.index}
