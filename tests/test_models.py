import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from pipeline import models
from pipeline.errors import UserError


def test_only_cfkds_own_models_get_the_small_image_stem():
    small = models.build("resnet18", 2, 64, stem=models.own_stem("resnet18", 64))
    large = models.build("resnet18", 2, 224, stem=models.own_stem("resnet18", 224))
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (2, 2)
    assert large.conv1.kernel_size == (7, 7)
    assert isinstance(models.build("resnet18", 2, 24, stem="small-image").maxpool, nn.Identity)
    assert models.build("resnet18", 3, [32, 48], stem="small-image")(torch.zeros(2, 3, 32, 48)).shape == (
        2,
        3,
    )
    # an imported architecture is built as torchvision defines it, whatever the size
    standard = models.build("resnet18", 2, 24, channels=1)
    assert standard.conv1.kernel_size == (7, 7) and isinstance(standard.maxpool, nn.MaxPool2d)
    assert standard.conv1.in_channels == 1 and standard(torch.zeros(1, 1, 24, 40)).shape == (1, 2)


def test_unknown_architecture_is_a_user_error():
    with pytest.raises(UserError, match="unknown classifier architecture 'resnet9000'"):
        models.build("resnet9000", 2, 32)


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    model = models.build("small_cnn", 2, 32).eval()
    card = models.ModelCard(
        arch="small_cnn", classes=["a", "b"], image_size=[32, 32], metrics={"val_acc": 0.5}
    )
    models.save(model, card, tmp_path / "ckpt")
    loaded, loaded_card = models.load(tmp_path / "ckpt")
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(model(x), loaded(x))
    assert loaded_card == card


def test_weights_digest_tells_the_same_classifier_from_a_changed_one(tmp_path):
    """A classifier saved again unchanged (with another card) has the digest it had; one changed weight differs."""
    torch.manual_seed(0)
    model = models.build("small_cnn", 2, 32).eval()
    card = models.ModelCard(arch="small_cnn", classes=["a", "b"], image_size=[32, 32])
    models.save(model, card, tmp_path / "first")
    models.save(
        models.load(tmp_path / "first")[0],
        card.__class__(**{**card.__dict__, "metrics": {"x": 1}}),
        tmp_path / "again",
    )
    assert models.weights_digest(tmp_path / "first") == models.weights_digest(tmp_path / "again")
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1e-6
    models.save(model, card, tmp_path / "changed")
    assert models.weights_digest(tmp_path / "changed") != models.weights_digest(tmp_path / "first")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_import_users_weights(tmp_path, suffix):
    torch.manual_seed(1)
    model = models.build("resnet18", 3, 32).eval()
    path = tmp_path / f"mine{suffix}"
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    torch.save(state, path) if suffix == ".pt" else save_file(state, path)
    card = models.import_weights(path, "resnet18", ["x", "y", "z"], 32, tmp_path / "out")
    loaded, _ = models.load(tmp_path / "out")
    x = torch.randn(2, 3, 32, 32)
    assert card.source == f"imported:mine{suffix}"
    assert torch.allclose(model(x), loaded(x))


def test_import_names_missing_and_mis_shaped_keys(tmp_path):
    state = models.build("small_cnn", 5, 32).state_dict()
    torch.save(state, tmp_path / "w.pt")
    with pytest.raises(UserError, match=r"predict 5 classes, the dataset has 2 \(a, b\)"):
        models.import_weights(tmp_path / "w.pt", "small_cnn", ["a", "b"], 32, tmp_path / "out")
    state["4.weight"] = torch.zeros(64, 32, 5, 5)
    torch.save(state, tmp_path / "w.pt")
    with pytest.raises(UserError, match=r"shape mismatch .*4.weight \(64, 32, 5, 5\) vs \(64, 32, 3, 3\)"):
        models.import_weights(tmp_path / "w.pt", "small_cnn", list("abcde"), 32, tmp_path / "out")
    with pytest.raises(UserError, match="missing key"):
        models.import_weights(tmp_path / "w.pt", "resnet18", list("abcde"), 32, tmp_path / "out")


def test_pickled_objects_and_garbage_are_refused(tmp_path):
    torch.save({"model": nn.Linear(2, 2)}, tmp_path / "pickled.pt")  # a module, not tensors
    with pytest.raises(UserError):
        models.read_state_dict(tmp_path / "pickled.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="cannot read weights"):
        models.read_state_dict(tmp_path / "junk.safetensors")
    with pytest.raises(UserError, match="not found"):
        models.read_state_dict(tmp_path / "nope.pt")
    with pytest.raises(UserError, match="not a classifier checkpoint"):
        models.load(tmp_path)


def test_bad_cards_are_named(tmp_path):
    models.save(models.build("small_cnn", 2), models.ModelCard("small_cnn", ["a", "b"], [32, 32]), tmp_path)
    card = json.loads((tmp_path / "card.json").read_text())
    for key, value, message in (
        ("image_size", "abc", "image_size"),
        ("std", [0, 1, 1], "must be > 0"),
        ("classes", "01", "classes"),
        ("channels", 2, "channels"),
    ):
        (tmp_path / "card.json").write_text(json.dumps({**card, key: value}))
        with pytest.raises(UserError, match=message):
            models.load(tmp_path)


def test_weights_that_are_not_numbers_are_refused(tmp_path):
    state = models.build("small_cnn", 2).state_dict()
    state["0.weight"] = torch.full_like(state["0.weight"], float("nan"))
    torch.save(state, tmp_path / "nan.pt")
    with pytest.raises(UserError, match="NaN"):
        models.read_state_dict(tmp_path / "nan.pt")


def test_the_pixel_view_feeds_each_model_its_own_input():
    grey = models.ModelCard("small_cnn", ["a", "b"], [8, 8], channels=1, mean=[0.25], std=[0.5])
    seen = []
    probe = models.OnPixels(nn.Sequential(nn.Identity()), grey)
    probe.model.register_forward_hook(lambda m, i, o: seen.append(o))
    x = torch.zeros(1, 3, 8, 8)  # mid grey on the [-1, 1] scale
    probe(x)
    assert seen[0].shape == (1, 1, 8, 8) and torch.allclose(seen[0], torch.full_like(seen[0], 0.5))
    colour = models.ModelCard("small_cnn", ["a", "b"], [8, 8], channels=3)
    tinted = torch.stack([torch.ones(8, 8), -torch.ones(8, 8), torch.zeros(8, 8)])[None]
    assert torch.equal(models.OnPixels(nn.Identity(), colour, grey=True)(tinted), torch.zeros(1, 3, 8, 8))


def test_a_timm_model_imports_with_its_own_stem(tmp_path):
    timm = pytest.importorskip("timm")  # the optional extra (part of the dev extra, so CI runs this)
    torch.manual_seed(0)
    theirs = timm.create_model("resnet18", pretrained=False, num_classes=3, in_chans=1).eval()
    torch.save(theirs.state_dict(), tmp_path / "timm.pt")
    card = models.import_weights(tmp_path / "timm.pt", "timm:resnet18", ["a", "b", "c"], 48, tmp_path / "out")
    ours, _ = models.load(tmp_path / "out")
    x = torch.randn(2, 1, 48, 48)
    assert card.channels == 1 and card.stem == "standard"
    assert torch.allclose(ours(x), theirs(x), atol=1e-5)
