import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from pipeline import models
from pipeline.errors import UserError


def test_resnet_stem_is_adapted_to_small_images():
    small, large = models.build("resnet18", 2, 64), models.build("resnet18", 2, 224)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (2, 2)
    assert large.conv1.kernel_size == (7, 7)
    assert isinstance(models.build("resnet18", 2, 24).maxpool, nn.Identity)
    assert models.build("resnet18", 3, 32)(torch.zeros(2, 3, 32, 32)).shape == (2, 3)


def test_unknown_architecture_is_a_user_error():
    with pytest.raises(UserError, match="unknown classifier architecture 'resnet9000'"):
        models.build("resnet9000", 2, 32)


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    model = models.build("small_cnn", 2, 32).eval()
    card = models.ModelCard(arch="small_cnn", classes=["a", "b"], image_size=32, metrics={"val_acc": 0.5})
    models.save(model, card, tmp_path / "ckpt")
    loaded, loaded_card = models.load(tmp_path / "ckpt")
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(model(x), loaded(x))
    assert loaded_card == card


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
    with pytest.raises(UserError, match=r"shape mismatch .*\(5, 128\) vs \(2, 128\)"):
        models.import_weights(tmp_path / "w.pt", "small_cnn", ["a", "b"], 32, tmp_path / "out")
    with pytest.raises(UserError, match="missing key"):
        models.import_weights(tmp_path / "w.pt", "resnet18", ["a", "b"], 32, tmp_path / "out")


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
