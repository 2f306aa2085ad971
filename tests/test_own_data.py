"""A user's own data and classifier: greyscale, non-square, three classes with awkward names, and a 1-channel
torchvision model trained outside cfkd with its own normalisation."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision
import yaml
from PIL import Image

from pipeline import cli, feedback, manifest, models, shapes
from pipeline.config import FeedbackConfig
from pipeline.data import load_folder
from pipeline.errors import UserError

NAMES = ("disc / round", "bar-to-ring", "ring é")  # a slash, "-to-", unicode and spaces
MEAN, STD = 0.3, 0.25  # the user's own normalisation, not cfkd's


def plain_resnet(channels: int = 1) -> torch.nn.Module:
    """torchvision's resnet18 as its library defines it, with a 1-channel stem."""
    model = torchvision.models.resnet18(num_classes=3)
    model.conv1 = torch.nn.Conv2d(channels, 64, 7, 2, 3, bias=False)
    return model


def plain_inputs(root, rows: pd.DataFrame) -> torch.Tensor:
    images = [np.asarray(Image.open(root / p), dtype=np.float32) / 255 for p in rows["path"]]
    return (torch.from_numpy(np.stack(images))[:, None] - MEAN) / STD


def plain_training(root, steps: int = 80) -> torch.nn.Module:
    """The user's own loop: no cfkd code involved."""
    table = pd.read_csv(root / "metadata.csv", keep_default_na=False)
    train = table[table["split"] == "train"]
    x, y = plain_inputs(root, train), torch.tensor([NAMES.index(label) for label in train["label"]])
    torch.manual_seed(0)
    model = plain_resnet()
    optimizer = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(steps):
        batch = torch.randint(len(x), (32,))
        loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    """(dataset folder, the user's weights file, the user's model)."""
    root = tmp_path_factory.mktemp("own")
    shapes.generate(root / "data", shapes.ShapesConfig(n=120, height=40, width=56, poison=1.0), NAMES)
    model = plain_training(root / "data")
    torch.save(model.state_dict(), root / "model.pt")
    return root / "data", root / "model.pt", model


def _import(own, tmp_path, *extra):
    data, weights, _ = own
    argv = ["import", "--weights", str(weights), "--arch", "resnet18", "--data", str(data)]
    argv += ["--classes", ",".join(NAMES), "--image-size", "40,56"]
    return cli.main([*argv, "--out", str(tmp_path / "ckpt"), *extra])


def test_import_keeps_the_users_model_exactly(own, tmp_path):
    data, _, model = own
    assert _import(own, tmp_path, "--mean", str(MEAN), "--std", str(STD)) == 0
    imported, card = models.load(tmp_path / "ckpt")
    assert card.channels == 1 and card.stem == "standard" and card.image_size == [40, 56]
    assert card.mean == [MEAN] and card.std == [STD] and card.classes == list(NAMES)  # the output order
    assert isinstance(imported.maxpool, torch.nn.MaxPool2d)  # built as torchvision defines it
    # cfkd feeds it what the user's own code fed it: the same outputs
    table = load_folder(data).split("test")
    with torch.no_grad():
        theirs = model(plain_inputs(data, table))
        transform = models.input_transform(card)
        ours = imported(torch.stack([transform(Image.open(data / p)) for p in table["path"]]))
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_torchscript_and_preset(own, tmp_path):
    _, _, model = own
    torch.jit.save(torch.jit.script(model), tmp_path / "model.ts")
    argv = ["import", "--weights", str(tmp_path / "model.ts"), "--arch", "resnet18", "--classes", "a,b,c"]
    assert cli.main([*argv, "--preset", "imagenet", "--out", str(tmp_path / "ts")]) == 0
    card = models.load_card(tmp_path / "ts")
    assert card.channels == 1 and card.mean == [pytest.approx(0.449)]  # the preset's channel average


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m, "say how the imported model normalises"),
        (lambda m: m.fc.__setattr__("weight", torch.nn.Parameter(torch.zeros(5, 512))), "predict 5 classes"),
        (
            lambda m: m.layer1[0].conv1.__setattr__("weight", torch.nn.Parameter(torch.zeros(64, 64, 1, 1))),
            "layer1.0.conv1.weight",
        ),
    ],
)
def test_import_errors_are_one_line(own, tmp_path, capsys, change, message):
    data, _, model = own
    broken = plain_resnet()
    broken.load_state_dict(model.state_dict())
    change(broken)
    torch.save(broken.state_dict(), tmp_path / "broken.pt")
    extra = [] if message.startswith("say") else ["--preset", "half"]
    argv = ["import", "--weights", str(tmp_path / "broken.pt"), "--arch", "resnet18", "--data", str(data)]
    assert cli.main([*argv, "--out", str(tmp_path / "x"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_a_greyscale_model_refuses_colour_data(own, square_dir, tmp_path, capsys):
    _, weights, _ = own
    argv = ["import", "--weights", str(weights), "--arch", "resnet18", "--data", str(square_dir)]
    assert cli.main([*argv, "--preset", "half", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "1 input channel" in err and "colour" in err


def test_a_class_without_training_images_is_named(own, tmp_path, capsys):
    data, _, _ = own
    table = pd.read_csv(data / "metadata.csv", keep_default_na=False)
    table.loc[table["label"] == NAMES[1], "split"] = "test"
    copy = tmp_path / "data"
    copy.mkdir()
    for rel in list(table["path"]) + list(table["feature_mask"]):
        (copy / rel).parent.mkdir(exist_ok=True)
        (copy / rel).write_bytes((data / rel).read_bytes())
    table.to_csv(copy / "metadata.csv", index=False)
    assert cli.main(["data", "check", str(copy)]) == 2
    assert f"'{NAMES[1]}'" in capsys.readouterr().err


def _config(tmp_path, data, weights, codec, **feedback_settings) -> str:
    config = {
        "name": "own",
        "data": {"root": str(data), "image_size": [40, 56]},
        "classifier": {
            "arch": "resnet18",
            "weights": str(weights),
            "classes": list(NAMES),  # the model's output order
            "mean": [MEAN],
            "std": [STD],
            "epochs": 1,
        },
        "reference": {"root": str(data)},
        "generator": {"source": str(codec)},
        "explain": {"split": "train", "per_pair": 2, "search": {"attempts": 1, "steps": 30, "goal": 0.6}},
        "feedback": {"teacher": "mask", **feedback_settings},
        "distil": {"rounds": 1, "epochs": 1, "passes": 0, "batch_size": 16},
        "baseline": {"dfr": False},
    }
    path = tmp_path / "own.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_cfkd_run_end_to_end_on_own_data(own, tiny_codec, tmp_path):
    data, weights, _ = own
    config = _config(tmp_path, data, weights, tiny_codec)
    assert cli.main(["run", "--config", config, "--run-dir", str(tmp_path / "run")]) == 0
    run = tmp_path / "run"
    table = manifest.read_round(run, 1)
    assert (
        set(table["source_class"]) <= set(NAMES) and 0 < len(table) <= 3 * 2 * 2 * 2
    )  # pairs x images x (1 attempt + the cast)
    cf = Image.open(run / "explain" / table["counterfactual"][0])
    assert cf.mode == "L" and cf.size == (56, 40)  # greyscale, at the classifier's input size
    verdicts = pd.read_csv(run / "feedback_r1" / "verdicts.csv")
    assert len(verdicts) > 0 and set(verdicts["cf_id"]) <= set(table["id"])
    metrics = json.loads((run / "metrics.json").read_text())
    counts = metrics["rounds"][0]
    assert sum(counts["labels"].values()) + counts["not_flipped"] + counts["abstained"] == len(table)
    assert (run / "distil_r1" / "card.json").exists() and metrics["status"] == "complete"
    assert "ring é" in (run / "report.html").read_text()


def test_mask_teacher_without_masks_stops_before_training(own, tiny_codec, tmp_path, capsys):
    data, weights, _ = own
    table = pd.read_csv(data / "metadata.csv", keep_default_na=False).drop(columns="feature_mask")
    copy = tmp_path / "nomask"
    (copy / "images").mkdir(parents=True)
    for rel in table["path"]:
        (copy / rel).write_bytes((data / rel).read_bytes())
    table.to_csv(copy / "metadata.csv", index=False)
    config = _config(tmp_path, copy, weights, tiny_codec)
    assert cli.main(["run", "--config", config, "--run-dir", str(tmp_path / "run")]) == 2
    assert "feedback.teacher: mask needs a feature_mask column" in capsys.readouterr().err
    assert not (tmp_path / "run" / "classifier").exists()


def test_a_round_without_verdicts_says_why(tmp_path):
    (tmp_path / "explain").mkdir()
    rows = [{"id": f"s{i}", "sample": f"s{i}", "success": False} for i in range(3)]
    pd.DataFrame(rows).to_csv(tmp_path / "explain" / "manifest.csv", index=False)
    (tmp_path / "out").mkdir()
    with pytest.raises(UserError, match="none of the 3 counterfactuals flipped"):
        feedback.run(tmp_path, 1, FeedbackConfig(teacher="human"), tmp_path / "out")
    info = feedback.run(tmp_path, 1, FeedbackConfig(teacher="human"), tmp_path / "out", require=False)
    assert info["not_flipped"] == 3 and info["abstained"] == 0 and info["feedback_accuracy"] is None


def test_experts_are_not_asked_for_more_labels_than_there_are_cards(tmp_path):
    (tmp_path / "explain").mkdir()
    rows = [{"id": f"s{i}", "sample": f"s{i}", "success": i < 2} for i in range(4)]
    pd.DataFrame(rows).to_csv(tmp_path / "explain" / "manifest.csv", index=False)
    assert feedback.progress(tmp_path, 1, FeedbackConfig(teacher="human", min_labels=20))[1] == 2
    pd.DataFrame([{**r, "success": False} for r in rows]).to_csv(
        tmp_path / "explain" / "manifest.csv", index=False
    )
    assert feedback.progress(tmp_path, 1, FeedbackConfig(teacher="human", min_labels=20))[1] == 0
