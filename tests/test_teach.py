import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline import config, square, teach
from pipeline.config import ClassifierConfig
from pipeline.data import load_folder
from pipeline.errors import UserError
from pipeline.feedback import FeedbackStore
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


def _hand_made_counterfactuals(run_dir, data_root):
    """Real test images edited by hand: one edit recolours the square (true evidence), one the background."""
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
        for kind in ("square", "background"):
            edited = image.copy()
            if kind == "square":
                edited[mask] = [240, 0, 0]  # the red intensity itself: class 1 evidence
            else:
                edited[~mask] = np.clip(255 - edited[~mask].astype(int), 0, 255)  # invert the background
            cf_id = f"{row.Index}-{kind}"
            Image.fromarray(edited).save(run_dir / "explain" / f"counterfactuals/{cf_id}.png")
            truth[cf_id] = "true" if kind == "square" else "spurious"
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


def test_model_oracle_matches_mask_ground_truth(tmp_path, unbiased):
    truth = _hand_made_counterfactuals(tmp_path, unbiased / "data")
    result = teach.run(tmp_path, "model", unbiased / "data", unbiased / "reference")
    labels = FeedbackStore(tmp_path / "feedback.sqlite").labels().set_index("cf_id")["label"]
    assert result["labelled"] + result["skipped"] == 12
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
