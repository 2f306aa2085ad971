"""Classifiers: any torchvision classification architecture by name, a timm model (``timm:<name>``, optional
extra) or a small CNN; checkpoints as ``model.safetensors`` plus ``card.json`` (architecture, classes, input
size and channels, normalisation, resize policy, stem, training metrics, data hash), loadable without Lightning.

Imported weights are built exactly as their library defines the architecture; only classifiers cfkd trains
itself get the small-image stem (``card.stem``).
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torchvision
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.data import MEAN, RESIZE, STD, hw, make_transform
from pipeline.errors import UserError

WEIGHTS, CARD = "model.safetensors", "card.json"


PRESETS = {  # normalisations a user's model may have been trained with, per channel
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "half": (MEAN, STD),  # [0, 1] -> [-1, 1]: cfkd's own models
}
STEMS = ("standard", "small-image")  # as torchvision defines it | cfkd's adaptation for images below 128 px


@dataclass
class ModelCard:
    arch: str
    classes: list[str]
    image_size: list[int]  # [height, width] the classifier sees
    channels: int = 3  # input channels (1: greyscale model)
    mean: list[float] = field(default_factory=lambda: list(MEAN))  # per input channel, on the [0, 1] scale
    std: list[float] = field(default_factory=lambda: list(STD))
    resize: str = "pad"  # how images of another shape reach image_size (pipeline.data.Fit)
    stem: str = "standard"  # standard: the architecture as its library defines it; small-image: cfkd's own
    metrics: dict = field(default_factory=dict)  # training metrics (final train/val accuracy, epochs, ...)
    data_hash: str | None = None  # sha256 of the training split (metadata rows + image bytes)
    source: str = "trained"  # trained | imported:<file> | distilled:<stage>


def normalisation(channels: int, mean=None, std=None, preset: str | None = None) -> tuple[list, list]:
    """Per-channel mean and std from explicit lists (one value, or one per channel) or a preset."""
    if preset is not None:
        if preset not in PRESETS:
            raise UserError(f"unknown normalisation preset '{preset}' (choose {', '.join(PRESETS)})")
        mean, std = PRESETS[preset]
        if channels == 1:  # a greyscale model trained with an RGB preset: the channel average
            mean, std = [sum(mean) / 3], [sum(std) / 3]
    mean, std = [float(v) for v in (mean or MEAN[:1])], [float(v) for v in (std or STD[:1])]
    mean, std = (v * channels if len(v) == 1 else v for v in (mean, std))
    if len(mean) != channels or len(std) != channels:
        raise UserError(
            f"mean {mean} / std {std}: expected 1 or {channels} value(s), one per input channel of the model"
        )
    if any(s <= 0 for s in std):
        raise UserError(f"std {std}: every value must be > 0")
    return mean[:channels], std[:channels]


def small_cnn(num_classes: int, width: int = 32, channels: int = 3) -> nn.Sequential:
    """Four conv blocks and a linear head: the fast choice for tiny images and tests."""
    layers = []
    for out in (width, width * 2, width * 4, width * 4):
        layers += [nn.Conv2d(channels, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(), nn.MaxPool2d(2)]
        channels = out
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))


def first_conv(model: nn.Module) -> str | None:
    """Name of the first convolution: the layer whose weights tell the input channels."""
    return next((name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)


def last_linear(model: nn.Module) -> str:
    """Name of the classifier's last nn.Linear: its head."""
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not names:
        raise ValueError("the classifier has no linear layer to retrain")
    return names[-1]


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _set_channels(model: nn.Module, channels: int) -> None:
    """The first convolution with ``channels`` inputs, every other setting as the architecture defines it."""
    name = first_conv(model)
    conv = model.get_submodule(name) if name else None
    if conv is None or conv.in_channels == channels:
        return
    _replace(
        model,
        name,
        nn.Conv2d(
            channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            conv.bias is not None,
            conv.padding_mode,
        ),
    )


def _adapt_stem(model: nn.Module, side: int) -> None:
    """ResNet-style stems (7x7 stride 2 + max-pool) shrink small images too early: use a 3x3 conv and less
    downsampling below 128 px, so the first block sees at least 16 px (64 px in -> 16 px, 32 px in -> 16 px).
    Only for classifiers cfkd trains itself (card.stem = small-image)."""
    conv = getattr(model, "conv1", None)
    if side >= 128 or not isinstance(conv, nn.Conv2d):
        return
    model.conv1 = nn.Conv2d(conv.in_channels, conv.out_channels, 3, 2 if side >= 64 else 1, 1, bias=False)
    if side < 32 and isinstance(getattr(model, "maxpool", None), nn.MaxPool2d):
        model.maxpool = nn.Identity()


def own_stem(arch: str, image_size) -> str:
    """The stem cfkd gives a classifier it trains: adapted below 128 px where the architecture has one."""
    return "small-image" if arch != "small_cnn" and min(hw(image_size)) < 128 else "standard"


def _library_model(arch: str, num_classes: int) -> nn.Module:
    if arch.startswith("timm:"):
        try:
            import timm
        except ImportError:
            raise UserError(f"classifier '{arch}' needs timm: pip install 'cfkd[timm]'") from None
        try:
            return timm.create_model(arch.removeprefix("timm:"), pretrained=False, num_classes=num_classes)
        except RuntimeError as exc:  # timm: "Unknown model (...)"
            raise UserError(f"unknown timm architecture '{arch}' ({exc})") from None
    try:
        return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    except ValueError:
        known = ", ".join(["small_cnn", *torchvision.models.list_models(torchvision.models)][:12])
        raise UserError(
            f"unknown classifier architecture '{arch}' (e.g. {known}, ...; timm:<name> with cfkd[timm])"
        ) from None


def build(arch: str, num_classes: int, image_size=64, channels: int = 3, stem: str = "standard") -> nn.Module:
    """A freshly initialised classifier (weights=None: nothing is downloaded): a torchvision model by name,
    ``timm:<name>``, or small_cnn; ``stem: small-image`` adapts a ResNet-style stem to small images."""
    if arch == "small_cnn":
        return small_cnn(num_classes, channels=channels)
    model = _library_model(arch, num_classes)
    _set_channels(model, channels)
    if stem == "small-image":
        _adapt_stem(model, min(hw(image_size)))
    return model


def output_classes(given: list | None, dataset: list[str]) -> list[str]:
    """The imported model's class names in output order: ``given`` (checked against the dataset's) or the
    dataset's own, sorted."""
    if given is None:
        return list(dataset)
    given = [str(c) for c in given]
    if sorted(given) != sorted(dataset) or len(set(given)) != len(given):
        raise UserError(
            f"classifier classes {given} are not the dataset's classes {dataset} in some order (each once)"
        )
    return given


def input_transform(card: ModelCard):
    """What the classifier is fed: its channels, size, resize policy and normalisation."""
    return make_transform(card.image_size, card.mean, card.std, card.channels, card.resize)


def pixel_transform(card: ModelCard):
    """The same images on the generator's scale: 3 channels in [-1, 1] (greyscale replicated), same geometry."""
    return make_transform(card.image_size, MEAN, STD, 3, card.resize)


class OnPixels(nn.Module):
    """The classifier applied to pixel-scale images (3 channels in [-1, 1], as the generator makes them): to its
    channels (the channel mean for a greyscale model or greyscale data, so colour the codec adds is not seen)
    and its normalisation."""

    def __init__(self, model: nn.Module, card: ModelCard, grey: bool = False):
        super().__init__()
        self.model, self.channels, self.grey = model, card.channels, grey
        self.register_buffer("mean", torch.tensor(card.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(card.std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.grey or self.channels == 1:
            x = x.mean(1, keepdim=True)
        x = x.expand(-1, self.channels, -1, -1)
        return self.model(((x + 1) / 2 - self.mean) / self.std)


def save(model: nn.Module, card: ModelCard, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, out / WEIGHTS, metadata={"arch": card.arch})
    (out / CARD).write_text(json.dumps(asdict(card), indent=2))


def weights_digest(directory: str | Path) -> str:
    """A short hash of a checkpoint's tensors (names and values): equal digests, the same classifier."""
    state = load_file(Path(directory) / WEIGHTS)
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _is_torchscript(path: Path) -> bool:
    """A torch.jit.save archive: a zip whose entries include TorchScript code."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name for name in archive.namelist())


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Weights from safetensors, a torch state_dict file or a TorchScript module (never unpickling code)."""
    if not path.is_file():
        raise UserError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            state = load_file(path)
        elif _is_torchscript(path):  # TorchScript's own archive format: its tensors, no Python pickle
            state = dict(torch.jit.load(str(path), map_location="cpu").state_dict())
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"cannot read weights {path}: {first}") from None
    except Exception as exc:  # weights_only refuses pickled objects with its own exception types
        raise UserError(
            f"{path} is not a plain state_dict ({type(exc).__name__}); save model.state_dict()"
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if (
        not isinstance(state, dict)
        or not state
        or not all(isinstance(v, torch.Tensor) for v in state.values())
    ):
        raise UserError(f"{path} does not hold a state_dict of tensors")
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise UserError(f"weights {path} hold NaN or infinite values in {len(bad)} tensor(s), e.g. {bad[0]}")
    return state


def weight_shape(arch: str, state: dict[str, torch.Tensor]) -> tuple[int, int | None]:
    """(input channels, output classes) of the weights: the second dimension of their first convolution (3 when
    unknown) and the rows of their last linear layer (None without one), from one probe build of ``arch``."""
    probe = build(arch, 2)
    conv = first_conv(probe)
    weight = state.get(f"{conv}.weight") if conv else None
    channels = int(weight.shape[1]) if weight is not None and weight.ndim == 4 else 3
    try:
        head = state.get(f"{last_linear(probe)}.weight")
    except ValueError:
        return channels, None
    return channels, int(head.shape[0]) if head is not None and head.ndim == 2 else None


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


def _card_problems(card: ModelCard) -> list[str]:
    problems = []
    size = card.image_size
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v >= 8 for v in size)):
        problems.append(f"image_size {size!r} is not [height, width] of integers >= 8")
    if card.channels not in (1, 3):
        problems.append(f"channels {card.channels!r} is not 1 or 3")
    if not (
        isinstance(card.classes, list)
        and len(card.classes) >= 2
        and all(isinstance(c, str) for c in card.classes)
    ):
        problems.append(f"classes {card.classes!r} is not a list of at least 2 names")
    try:
        normalisation(card.channels if card.channels in (1, 3) else 3, card.mean, card.std)
    except (UserError, TypeError, ValueError) as exc:
        problems.append(str(exc))
    if card.resize not in RESIZE:
        problems.append(f"resize {card.resize!r} is not one of {', '.join(RESIZE)}")
    if card.stem not in STEMS:
        problems.append(f"stem {card.stem!r} is not one of {', '.join(STEMS)}")
    return problems


def load_card(directory: str | Path) -> ModelCard:
    directory = Path(directory)
    try:
        raw = json.loads((directory / CARD).read_text())
        if isinstance(raw.get("image_size"), int):  # cards before [height, width]
            raw["image_size"] = [raw["image_size"]] * 2
        raw.setdefault("stem", "small-image" if raw.get("arch") != "small_cnn" else "standard")
        card = ModelCard(**raw)
    except FileNotFoundError:
        raise UserError(f"{directory} is not a classifier checkpoint (no {CARD})") from None
    except (json.JSONDecodeError, TypeError, AttributeError, UnicodeDecodeError) as exc:
        raise UserError(f"{directory / CARD} is not a valid model card ({exc})") from None
    problems = _card_problems(card)
    if problems:
        raise UserError(f"{directory / CARD} is not a valid model card: {'; '.join(problems)}")
    return card


def load(directory: str | Path) -> tuple[nn.Module, ModelCard]:
    """A checkpoint directory (model.safetensors + card.json) as an eval-mode nn.Module and its card."""
    card = load_card(directory)
    model = build(card.arch, len(card.classes), card.image_size, card.channels, card.stem)
    load_weights(model, read_state_dict(Path(directory) / WEIGHTS), str(Path(directory) / WEIGHTS))
    return model.eval(), card


def import_weights(
    weights: str | Path,
    arch: str,
    classes: list[str],
    image_size,
    out: Path,
    mean=None,
    std=None,
    preset: str | None = None,
    resize: str = "pad",
    grey_data: bool | None = None,
) -> ModelCard:
    """Turn a user's own weights file into a checkpoint directory, checking that it fits ``arch`` as its
    library defines it (standard stem), the classes and, when known, the data's channels."""
    weights = Path(weights)
    state = read_state_dict(weights)
    channels, predicted = weight_shape(arch, state)
    if channels not in (1, 3):
        raise UserError(
            f"weights {weights} take {channels} input channels: cfkd feeds 1 (greyscale) or 3 (RGB)"
        )
    if channels == 1 and grey_data is False:
        raise UserError(
            f"weights {weights} take 1 input channel (greyscale) but the dataset has colour images"
        )
    if predicted is not None and predicted != len(classes):
        raise UserError(
            f"weights {weights} predict {predicted} classes, the dataset has {len(classes)} ({', '.join(classes)})"
        )
    mean, std = normalisation(channels, mean, std, preset)
    model = build(arch, len(classes), image_size, channels, "standard")
    load_weights(model, state, str(weights))
    card = ModelCard(
        arch=arch,
        classes=classes,
        image_size=list(hw(image_size)),
        channels=channels,
        mean=mean,
        std=std,
        resize=resize,
        stem="standard",
        source=f"imported:{weights.name}",
    )
    save(model, card, out)
    return card
