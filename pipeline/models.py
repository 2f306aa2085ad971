"""Classifiers: any torchvision classification architecture by name (stem adapted to small images) or a small
CNN; checkpoints as ``model.safetensors`` plus ``card.json`` (architecture, classes, image size, normalisation,
training metrics, data hash), loadable without Lightning.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torchvision
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.data import MEAN, STD
from pipeline.errors import UserError

WEIGHTS, CARD = "model.safetensors", "card.json"


@dataclass
class ModelCard:
    arch: str
    classes: list[str]
    image_size: int
    mean: list[float] = field(default_factory=lambda: list(MEAN))
    std: list[float] = field(default_factory=lambda: list(STD))
    metrics: dict = field(default_factory=dict)  # training metrics (final train/val accuracy, epochs, ...)
    data_hash: str | None = None  # sha256 of the training split (metadata rows + image bytes)
    source: str = "trained"  # trained | imported:<file>


def small_cnn(num_classes: int, width: int = 32) -> nn.Sequential:
    """Four conv blocks and a linear head: the fast choice for tiny images and tests."""
    layers, channels = [], 3
    for out in (width, width * 2, width * 4, width * 4):
        layers += [nn.Conv2d(channels, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(), nn.MaxPool2d(2)]
        channels = out
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))


def _adapt_stem(model: nn.Module, image_size: int) -> None:
    """ResNet-style stems (7x7 stride 2 + max-pool) shrink small images too early: use a 3x3 conv and less
    downsampling below 128 px, so the first block sees at least 16 px (64 px in -> 16 px, 32 px in -> 16 px)."""
    conv = getattr(model, "conv1", None)
    if image_size >= 128 or not isinstance(conv, nn.Conv2d):
        return
    model.conv1 = nn.Conv2d(3, conv.out_channels, 3, 2 if image_size >= 64 else 1, 1, bias=False)
    if image_size < 32 and isinstance(getattr(model, "maxpool", None), nn.MaxPool2d):
        model.maxpool = nn.Identity()


def build(arch: str, num_classes: int, image_size: int) -> nn.Module:
    """A freshly initialised classifier (weights=None: nothing is downloaded)."""
    if arch == "small_cnn":
        return small_cnn(num_classes)
    try:
        model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    except ValueError:
        known = ", ".join(["small_cnn", *torchvision.models.list_models(torchvision.models)][:12])
        raise UserError(f"unknown classifier architecture '{arch}' (e.g. {known}, ...)") from None
    _adapt_stem(model, image_size)
    return model


def save(model: nn.Module, card: ModelCard, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, out / WEIGHTS, metadata={"arch": card.arch})
    (out / CARD).write_text(json.dumps(asdict(card), indent=2))


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Weights from safetensors or a torch state_dict file (never unpickling code)."""
    if not path.is_file():
        raise UserError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, RuntimeError, OSError, EOFError, ValueError) as exc:
        raise UserError(f"cannot read weights {path}: {str(exc).splitlines()[0]}") from None
    except Exception as exc:  # weights_only refuses pickled objects with its own exception types
        raise UserError(
            f"{path} is not a plain state_dict ({type(exc).__name__}); save model.state_dict()"
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} does not hold a state_dict of tensors")
    return state


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict with an error that names missing, unexpected and mis-shaped keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        parts = [f"{len(missing)} missing key(s) e.g. {missing[:3]}" if missing else ""]
        parts.append(f"{len(unexpected)} unexpected key(s) e.g. {unexpected[:3]}" if unexpected else "")
        parts.append(f"shape mismatch (file vs model): {'; '.join(shapes[:3])}" if shapes else "")
        raise UserError(f"weights {source} do not fit the architecture: " + ", ".join(p for p in parts if p))
    model.load_state_dict(state)


def load_card(directory: str | Path) -> ModelCard:
    directory = Path(directory)
    try:
        return ModelCard(**json.loads((directory / CARD).read_text()))
    except FileNotFoundError:
        raise UserError(f"{directory} is not a classifier checkpoint (no {CARD})") from None
    except (json.JSONDecodeError, TypeError) as exc:
        raise UserError(f"{directory / CARD} is not a valid model card ({exc})") from None


def load(directory: str | Path) -> tuple[nn.Module, ModelCard]:
    """A checkpoint directory (model.safetensors + card.json) as an eval-mode nn.Module and its card."""
    card = load_card(directory)
    model = build(card.arch, len(card.classes), card.image_size)
    load_weights(model, read_state_dict(Path(directory) / WEIGHTS), str(Path(directory) / WEIGHTS))
    return model.eval(), card


def import_weights(
    weights: str | Path, arch: str, classes: list[str], image_size: int, out: Path
) -> ModelCard:
    """Turn a user's own weights file into a checkpoint directory, checking that it fits ``arch``."""
    weights = Path(weights)
    model = build(arch, len(classes), image_size)
    load_weights(model, read_state_dict(weights), str(weights))
    card = ModelCard(arch=arch, classes=classes, image_size=image_size, source=f"imported:{weights.name}")
    save(model, card, out)
    return card
