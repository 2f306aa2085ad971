"""Run configuration: one frozen dataclass per stage; the YAML file maps onto them.

Every problem in a config file is collected and reported at once (key, value received, what is allowed).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pipeline.counterfactual import Settings as SearchConfig
from pipeline.errors import UserError


@dataclass(frozen=True)
class SquareConfig:
    """The embedded Square dataset (DESIGN.md)."""

    n: int = 2000  # images in all splits together
    poison: float = 1.0  # share of train/val images whose confounder equals the class (0.5 = unbiased)
    noise: float = 20.0  # std of the Gaussian pixel noise, 0-255 scale
    size: int = 64  # image side in pixels
    seed: int = 0  # generator seed; same seed, same dataset


@dataclass(frozen=True)
class DataConfig:
    root: str | None = None  # a folder dataset (metadata.csv); None = generate Square into the run directory
    square: SquareConfig = field(default_factory=SquareConfig)
    image_size: int = 64  # images are resized to this side before the classifier


@dataclass(frozen=True)
class ClassifierConfig:
    arch: str = "resnet18"  # any torchvision classification model name, or "small_cnn"
    weights: str | None = None  # import these weights (safetensors or .pt state_dict) instead of training
    epochs: int = 6
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    balanced: bool = False  # class-balanced sampling of the training split
    accelerator: str = "auto"  # Lightning accelerator: auto, cpu, gpu, ...
    devices: str | int = "auto"
    seed: int = 0


@dataclass(frozen=True)
class ReferenceConfig:
    """The unbiased reference classifier: the upper limit of any correction, and later a simulated teacher."""

    enabled: bool = True
    poison: float = 0.5  # poison of the Square dataset it is trained on (0.5 = unbiased)
    root: str | None = None  # or a user's unbiased folder dataset
    weights: str | None = None  # or a user's own reference weights


@dataclass(frozen=True)
class GeneratorConfig:
    """The pretrained generative model whose latent the explainer searches (a diffusers autoencoder)."""

    source: str = "checkpoints/generic-codec"  # local folder or hub id (offline: local cache only)
    subfolder: str | None = None  # e.g. "vae" inside a full pipeline repository
    unet: str | None = None  # optional diffusers UNet2DModel + scheduler folder for gradient filtering


@dataclass(frozen=True)
class ExplainConfig:
    enabled: bool = True
    split: str = "val"  # counterfactuals for correctly classified images of this split
    per_pair: int = 16  # images per ordered (source, target) class pair
    batch_size: int = 32
    surrogate: bool = (
        True  # gradients from a smooth surrogate (smoothing 1; smoothing 2 is search.smoothgrad)
    )
    surrogate_epochs: int = 2  # distillation epochs of the smooth surrogate
    search: SearchConfig = field(default_factory=SearchConfig)
    accelerator: str = "auto"
    devices: str | int = "auto"
    seed: int = 0


@dataclass(frozen=True)
class FeedbackConfig:
    """Who labels the counterfactuals of each round: a simulated teacher or experts in the app."""

    teacher: str = (
        "mask"  # mask (feature-mask oracle), model (reference-classifier oracle) or human (the app)
    )
    noise: float = 0.0  # share of a simulated teacher's verdicts flipped at random (imperfect experts)
    # a simulated teacher says unsure when its score (feature change density, reference odds) lies within
    # (1 / band, band]: 1 = the authors' oracles, always true or spurious
    band: float = 1.0
    min_labels: int = 1  # human teacher: labelled counterfactuals a round needs before distil continues
    min_votes: int = 1  # annotators that must agree for a consensus label (fewer -> unsure)


@dataclass(frozen=True)
class DistilConfig:
    """Counterfactual Knowledge Distillation: fine-tune on the teacher's verdicts, round after round."""

    enabled: bool = True
    rounds: int = 3  # explain -> feedback -> distil -> evaluate, this many times
    use_true: bool = False  # also train on 'true' counterfactuals with the target label
    accumulate: bool = (
        True  # round r trains on the verdicts of rounds 1..r (a verdict stays true), not r alone
    )
    start: str = (
        "latest"  # fine-tune the classifier the round explained (latest) or the run's first one (initial)
    )
    select: bool = False  # a closing explain + feedback judges the last classifier; the run's result is the
    # classifier whose counterfactuals the teacher found most often true (feedback accuracy, label-free)
    mix: float = 0.5  # share of counterfactuals in each training batch (the rest: original training images)
    holdout: float = 0.2  # share of a round's counterfactual images kept for model selection
    anchor: float = 0.0  # L2 pull toward the starting weights
    # a spurious change stays spurious when made stronger: each time a counterfactual is drawn for training its change
    # is scaled by a factor from U(1, stretch) (clipped to the image range), so the classifier learns to ignore the
    # shortcut over its whole range, not only at the one point the search stopped at (1 = the counterfactual as is)
    stretch: float = 1.0
    # random flips of every training image (originals and counterfactuals) while fine-tuning: "none", "horizontal" or
    # "both" (and vertical). A dozen edits are otherwise learnt by where their square sits; leave "none" where a flip
    # changes the meaning (laterality in chest X-rays, text)
    flip: str = "none"
    layers: str = "all"  # fine-tune every layer, or only the last linear layer on frozen features ("head")
    # the weights kept: the epoch model selection picks (the starting weights compete) or the last one
    keep: str = "best"
    epochs: int = 3
    batch_size: int = 64
    lr: float = 5e-4
    weight_decay: float = 0.05
    accelerator: str = "auto"  # Lightning: auto uses a GPU when there is one
    devices: str | int = "auto"
    strategy: str = "auto"  # DDP when devices > 1
    precision: str = "auto"  # auto: bf16-mixed on GPUs that support it, else 32-true
    seed: int = 0


@dataclass(frozen=True)
class BaselineConfig:
    """DFR-style baseline: retrain the last layer on a group-balanced subset of validation data."""

    dfr: bool = True
    subsets: int = 10  # balanced subsets whose logistic-regression heads are averaged (as DFR does)


@dataclass(frozen=True)
class RunConfig:
    name: str = "default"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    explain: ExplainConfig = field(default_factory=ExplainConfig)
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig)
    distil: DistilConfig = field(default_factory=DistilConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)


# Value checks beyond the type: key -> (predicate, what is allowed)
_CHECKS: dict[str, tuple[typing.Callable[[typing.Any], bool], str]] = {
    "data.square.n": (lambda v: v >= 20, "an integer >= 20"),
    "data.square.poison": (lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]"),
    "data.square.noise": (lambda v: v >= 0, "a number >= 0"),
    "data.square.size": (lambda v: v >= 16, "an integer >= 16 (the square patch is 12 px)"),
    "data.image_size": (lambda v: v >= 8, "an integer >= 8"),
    "classifier.epochs": (lambda v: v >= 1, "an integer >= 1"),
    "classifier.batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "classifier.lr": (lambda v: v > 0, "a number > 0"),
    "classifier.weight_decay": (lambda v: v >= 0, "a number >= 0"),
    "reference.poison": (lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]"),
    "explain.split": (lambda v: v in ("train", "val", "test"), "train, val or test"),
    "explain.per_pair": (lambda v: v >= 1, "an integer >= 1"),
    "explain.batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "explain.surrogate_epochs": (lambda v: v >= 1, "an integer >= 1"),
    "explain.search.attempts": (lambda v: v >= 1, "an integer >= 1"),
    "explain.search.goal": (lambda v: 0.5 <= v < 1.0, "a probability in [0.5, 1)"),
    "explain.search.aim": (lambda v: v == 0 or 0.5 <= v < 1.0, "0 (off) or a probability in [0.5, 1)"),
    "explain.search.steps": (lambda v: v >= 1, "an integer >= 1"),
    "explain.search.patience": (lambda v: v >= 0, "an integer >= 0"),
    "explain.search.lr": (lambda v: v > 0, "a number > 0"),
    "explain.search.temperature": (lambda v: v > 0, "a number > 0"),
    "explain.search.l1": (lambda v: v >= 0, "a number >= 0"),
    "explain.search.tv": (lambda v: v >= 0, "a number >= 0"),
    "explain.search.patch_prior": (lambda v: v >= 0, "a number >= 0"),
    "explain.search.prototype": (lambda v: v >= 0, "a number >= 0"),
    "explain.search.smoothgrad": (lambda v: v >= 0, "an integer >= 0"),
    "explain.search.paste_threshold": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "explain.search.blur": (lambda v: v >= 1 and v % 2 == 1, "an odd integer >= 1"),
    "explain.search.confine": (lambda v: v in ("threshold", "regions"), "threshold or regions"),
    "explain.search.max_regions": (lambda v: 1 <= v <= 8, "an integer in [1, 8]"),
    "explain.search.filter_timestep": (lambda v: v >= 0, "an integer >= 0"),
    "feedback.teacher": (lambda v: v in ("mask", "model", "human"), "mask, model or human"),
    "feedback.noise": (lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]"),
    "feedback.band": (lambda v: v >= 1.0, "a number >= 1"),
    "feedback.min_labels": (lambda v: v >= 1, "an integer >= 1"),
    "feedback.min_votes": (lambda v: v >= 1, "an integer >= 1"),
    "distil.rounds": (lambda v: v >= 1, "an integer >= 1"),
    "distil.start": (lambda v: v in ("latest", "initial"), "latest or initial"),
    "distil.layers": (lambda v: v in ("all", "head"), "all or head"),
    "distil.keep": (lambda v: v in ("best", "last"), "best or last"),
    "distil.mix": (lambda v: 0.0 < v < 1.0, "a number in (0, 1)"),
    "distil.holdout": (lambda v: 0.0 <= v < 1.0, "a number in [0, 1)"),
    "distil.anchor": (lambda v: v >= 0, "a number >= 0"),
    "distil.stretch": (lambda v: 1.0 <= v <= 10.0, "a number in [1, 10]"),
    "distil.flip": (lambda v: v in ("none", "horizontal", "both"), "none, horizontal or both"),
    "distil.epochs": (lambda v: v >= 1, "an integer >= 1"),
    "distil.batch_size": (lambda v: v >= 2, "an integer >= 2"),
    "distil.lr": (lambda v: v > 0, "a number > 0"),
    "distil.weight_decay": (lambda v: v >= 0, "a number >= 0"),
    "distil.precision": (
        lambda v: v in ("auto", "32-true", "16-mixed", "bf16-mixed"),
        "auto, 32-true, 16-mixed or bf16-mixed",
    ),
    "baseline.subsets": (lambda v: v >= 1, "an integer >= 1"),
    "name": (lambda v: v and "/" not in v and "\\" not in v and v not in {".", ".."}, "a plain folder name"),
}


def _type_ok(value: typing.Any, hint: typing.Any) -> bool:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _build(cls: type, raw: typing.Any, prefix: str, issues: list[str]):
    if not isinstance(raw, dict):
        issues.append(f"{prefix or 'config'}: expected a mapping, got {raw!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            issues.append(f"{prefix}{key}: unknown key (allowed: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            continue
        key, value, hint = f"{prefix}{f.name}", raw[f.name], hints[f.name]
        if dataclasses.is_dataclass(hint):
            kwargs[f.name] = _build(hint, value, key + ".", issues)
        elif not _type_ok(value, hint):
            issues.append(f"{key}: got {value!r}, expected {_hint_name(hint)}")
        elif key in _CHECKS and value is not None and not _CHECKS[key][0](value):
            issues.append(f"{key}: got {value!r}, expected {_CHECKS[key][1]}")
        else:
            kwargs[f.name] = float(value) if hint is float else value
    return cls(**kwargs)


def _hint_name(hint: typing.Any) -> str:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return " or ".join(_hint_name(h) for h in typing.get_args(hint))
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def from_dict(raw: dict | None) -> RunConfig:
    """Build a RunConfig from a plain mapping; raise one UserError listing every bad key."""
    issues: list[str] = []
    config = _build(RunConfig, raw or {}, "", issues)
    if issues:
        raise UserError("bad config: " + "; ".join(issues))
    return config


DEFAULT_RUN = Path(__file__).with_name("default.yaml")


def load(path: str | Path | None) -> RunConfig:
    """Read a YAML config file (None = the embedded default run, pipeline/default.yaml)."""
    path = Path(path) if path is not None else DEFAULT_RUN
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UserError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    return from_dict(raw)


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def dump(config, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def fingerprint(*parts: typing.Any) -> str:
    """A stable hash of JSON-able parts (configs as dicts, upstream fingerprints, file hashes)."""
    blob = json.dumps([to_dict(p) if dataclasses.is_dataclass(p) else p for p in parts], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
