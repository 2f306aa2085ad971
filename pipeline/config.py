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

from pipeline.config_rules import CHECKS, cross_checks
from pipeline.errors import UserError
from pipeline.search_config import RECOMMENDED_SEARCH, SearchConfig


@dataclass(frozen=True)
class SquareConfig:
    """The embedded Square dataset: grey background, red square; class = the square, confounder = the background."""

    n: int = 2000  # images in all splits together
    poison: float = 1.0  # share of train/val images whose confounder equals the class (0.5 = unbiased)
    noise: float = 20.0  # std of the Gaussian pixel noise, 0-255 scale
    size: int = 64  # image side in pixels
    seed: int = 0  # generator seed; same seed, same dataset


@dataclass(frozen=True)
class DataConfig:
    root: str | None = None  # a folder dataset (metadata.csv); None = generate Square into the run directory
    square: SquareConfig = field(default_factory=SquareConfig)
    image_size: int | list = 64  # what the classifier sees: a side, or [height, width] (multiples of 8)
    # how images of another shape reach image_size: pad keeps the whole image and its aspect (a tag or ruler at
    # the edge stays in view), crop fills the frame and cuts the longer side, stretch distorts the aspect
    resize: str = "pad"


@dataclass(frozen=True)
class ClassifierConfig:
    arch: str = "resnet18"  # any torchvision classification model name, or "small_cnn"
    weights: str | None = (
        None  # import these weights (safetensors, .pt state_dict, TorchScript) instead of training
    )
    # the normalisation the imported weights were trained with (per channel, on the [0, 1] scale); required with
    # weights. preset: imagenet or half (mean = std = 0.5, cfkd's own); models cfkd trains use half
    mean: list | None = None
    std: list | None = None
    preset: str | None = None
    # class names in the order of the imported model's outputs (default: the dataset's classes, sorted)
    classes: list | None = None
    epochs: int = 6
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    balanced: bool = False  # class-balanced sampling of the training split
    accelerator: str = "auto"  # Lightning accelerator: auto (a GPU when there is one), cpu, gpu, ...
    devices: str | int = 1  # N > 1 (or auto: every GPU): DDP over N devices in spawned processes
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
    split: str = (
        "train"  # explain the images the classifier learned from; validation stays for model selection
    )
    per_pair: int = 16  # images per ordered (source, target) class pair
    batch_size: int = 32
    surrogate: bool = (
        False  # gradients from a smooth surrogate (smoothing 1; smoothing 2 is search.smoothgrad)
    )
    surrogate_epochs: int = 2  # distillation epochs of the smooth surrogate
    search: SearchConfig = field(default_factory=lambda: RECOMMENDED_SEARCH)
    accelerator: str = "auto"
    devices: str | int = 1  # N > 1: the images to explain are shared out over N devices (DDP)
    seed: int = 0


@dataclass(frozen=True)
class FeedbackConfig:
    """Who labels the counterfactuals of each round: a simulated teacher or experts in the app."""

    teacher: str = (
        "mask"  # mask (feature-mask oracle), model (reference-classifier oracle) or human (the app)
    )
    noise: float = 0.0  # share of a simulated teacher's verdicts flipped at random (imperfect experts)
    # a simulated teacher says unsure when its score (feature change density, reference odds) lies within
    # (1 / band, band], as an expert does before an edit that changes evidence and shortcut alike; 1 = the authors'
    band: float = 2.0
    # how the mask teacher judges: density (where the change lies against the feature mask) or intervention (the
    # explained classifier sees the edit's part on the mask and its part off it separately; the part that carries
    # the flip decides, the density rule where only both together move it) or density+intervention (the density
    # rule, intervention for the edits it is unsure of, such as a colour cast that changed every pixel)
    oracle: str = "density"
    # density+intervention may settle an unsure edit as true; off, only as spurious: a flip carried by the part off
    # the feature mask convicts a shortcut, while one carried by the part on it may be any small change there
    intervention_true: bool = False
    # the model teacher says unsure, not spurious, where the edit took the reference more than 1 / band of the way
    # (in target log-odds) to its own flip: an unbiased model that moves that far sees evidence in the change
    moved_unsure: bool = False
    # the model teacher says unsure, not spurious, where the reference reads a third class on the edit (neither
    # source nor target): the change moved real evidence, and a spurious verdict would teach the source label
    other_class_unsure: bool = False
    # a simulated teacher rejects a counterfactual as unrealistic (never trained on, counted per round) when its
    # realism proxy (kNN distance ratio to real images of the target class, 1 = like them) exceeds this; 0 = never
    unrealistic: float = 0.0
    # counterfactuals that fell short of the goal are judged too when they covered at least this share of the way
    # to it (target log-odds): a change that moves the decision that far, flip or not, is class evidence or a
    # shortcut the classifier must not follow (a swapped tag alone rarely flips a classifier that also reads the
    # real evidence); spurious ones are distilled with their source label (1 = flips only)
    partial: float = 0.5
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
    # fine-tune the run's first classifier on all verdicts so far (initial: steadier than chaining fine-tunes on a
    # dozen edits) or the classifier the round explained (latest, as the method's authors do)
    start: str = "initial"
    select: bool = True  # a closing explain + feedback judges the last classifier; the run's result is the
    # corrected classifier whose counterfactuals the teacher found most often true (feedback accuracy, label-free)
    # ... or, when you hold a small labelled dataset you trust (folder format; images where the shortcut does not
    # give the label away), the classifier with the best worst-group accuracy on its val split, the run's first
    # classifier included; no closing judgement is needed then
    trusted: str | None = None
    mix: float = 0.5  # share of counterfactuals in each training batch (the rest: original training images)
    holdout: float = 0.2  # share of a round's counterfactual images kept for model selection
    anchor: float = 0.0  # L2 pull toward the starting weights
    # a spurious change stays spurious when made stronger: each draw scales it by U(1, stretch) (clipped to the image
    # range), so the shortcut is ignored over its whole range, not at the one point the search stopped (1 = as is)
    stretch: float = 3.0
    # ... but never past where the image's overall colour (per-channel mean) leaves the range real training images
    # show: a whole-image edit (a colour cast) made stronger than any real image is one a fine-tune tells apart
    stretch_within: bool = False
    # a spurious verdict on an image with a feature mask teaches only the edit's part off the mask: the change on
    # the evidence is not made ignorable (a colour cast that also recolours the evidence, a tag edit that touched it)
    spurious_off_mask: bool = False
    # the colour-cast attempt's verdicts (explain.search.cast) are taught only while the teacher judged most casts
    # spurious (of those judged true, spurious or unsure): where a cast of the whole image can change the class it
    # is evidence in this data, and even a correct spurious verdict on one cast teaches the classifier to ignore it
    cast_vote: bool = True
    # after fine-tuning, project this many principal directions of each round's spurious edits' feature change
    # (less what the true edits changed, except in the explained classifier's own features) out of the head and
    # refit it on the training images: the verdict removes a feature from every image, not only the edited (0 = off;
    # auto = one fewer than the classes: a shortcut that tells K classes apart spans K - 1 directions; hold = as
    # many as it takes for the refitted head to keep 90 % of the spurious edits at their source label; verdicts = as
    # hold, but the true edits must keep reaching their target too, and only in a round that fine-tunes nothing;
    # after a fine-tune, one per round)
    erase: int | str = "verdicts"
    # with erase: verdicts, after a fine-tune each earlier round whose erase searched its rank has as many directions
    # of its spurious edits erased again, not one, and whole (its search already kept its true edits at their
    # target): a shortcut that took several directions to hold stays erased (other erase values search no rank)
    erase_ranks: bool = True
    # after a fine-tune, a direction lying mostly in what the true edits changed is still erased when the spurious
    # edits move along it more, in sum, than the true ones: most verdicts on that kind of change said spurious
    erase_vote: bool = True
    # after a fine-tune, the erase spares what the edits judged true moved (off: erased whole, as round 1 does): a
    # biased classifier's edits judged true often move the shortcut too, and sparing them spares it
    erase_spare: bool = True
    # each round's spurious edits are shortened to their median length in feature space before the principal
    # directions are taken: every verdict counts about once, and a few edits that moved every feature do not decide
    erase_clip: bool = False
    # erase after a fine-tune too (false: only a round that fine-tunes nothing erases; a fine-tune that starts from an
    # erased classifier keeps its head's projection as the starting point and learns the rest from the verdicts)
    erase_finetuned: bool = True
    # random flips of every training image while fine-tuning: "none", "horizontal" or "both". A property of the data:
    # only where a mirrored image means the same (not laterality in chest X-rays, text, a tag in a known corner)
    flip: str = "none"
    # random shifts of every training image while fine-tuning, up to this share of its shorter side (edges
    # reflected): a counterfactual seen at many offsets is harder to memorise pixel by pixel (0 = off)
    shift: float = 0.125
    # "staged": round 1 erases alone, in the explained classifier's own features (a shortcut it reads there is
    # removed from every image), later rounds fine-tune every layer (a shortcut it must learn to ignore), and
    # distil.select's label-free judgement picks between them. Or always: every layer ("all"), only the last linear
    # layer on frozen features ("head"), nothing ("none": erase alone)
    layers: str = "staged"
    # the weights kept: the last epoch, or the one model selection picks on validation data and held-out
    # counterfactuals ("best"; the starting weights compete); validation data as confounded as the training data
    # prefers the shortcut, so best is only for a validation split you trust
    keep: str = "last"
    # what the original training images are fitted to while fine-tuning: their labels, or the probabilities of the
    # classifier the round explained (knowledge distillation: its shortcut-free reading, where an earlier round
    # erased the shortcut, is kept on every image instead of relearnt from the confounded labels)
    originals: str = "labels"
    epochs: int = 3  # the fine-tune's length when passes is 0
    # > 0: the fine-tune's length in passes over each counterfactual instead of epochs over the originals
    # (epochs = passes * counterfactuals / (mix * training images), at least 1): few verdicts are not repeated into
    # memory, many get the steps they need
    passes: float = 40.0
    batch_size: int = 64
    lr: float = 5e-4
    weight_decay: float = 0.05
    accelerator: str = "auto"  # Lightning: auto uses a GPU when there is one
    devices: str | int = 1  # N > 1: DDP over N devices
    strategy: str = "auto"  # auto: ddp_spawn when devices > 1
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


# Settings that no longer exist: the value that meant "off" (a run directory written before still loads, the same
# method), and why it went (any other value is an error naming the key)
RETIRED: dict[str, tuple[typing.Any, str]] = {
    "distil.transplant": (0.0, "a verdict is only ever used for the exact image it was given on"),
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


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _build(cls: type, raw: typing.Any, prefix: str, issues: list[str], base=None):
    """``cls`` from a mapping, starting from ``base`` (the field's default: a partial section keeps the rest)."""
    base = cls() if base is None else base
    if not isinstance(raw, dict):
        issues.append(f"{prefix or 'config'}: expected a mapping, got {raw!r}")
        return base
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if f"{prefix}{key}" in RETIRED:
            off, why = RETIRED[f"{prefix}{key}"]
            if raw[key] != off:  # the setting changed the method: say so rather than run another one
                issues.append(f"{prefix}{key}: removed ({why}); delete it from the config")
        elif key not in names:
            issues.append(f"{prefix}{key}: unknown key (allowed: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            continue
        key, value, hint = f"{prefix}{f.name}", raw[f.name], hints[f.name]
        if dataclasses.is_dataclass(hint):
            kwargs[f.name] = _build(hint, value, key + ".", issues, _default(f))
        elif not _type_ok(value, hint):
            issues.append(f"{key}: got {value!r}, expected {_hint_name(hint)}")
        elif key in CHECKS and value is not None and not CHECKS[key][0](value):
            issues.append(f"{key}: got {value!r}, expected {CHECKS[key][1]}")
        else:
            kwargs[f.name] = float(value) if hint is float else value
    return dataclasses.replace(base, **kwargs)


def _hint_name(hint: typing.Any) -> str:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return " or ".join(_hint_name(h) for h in typing.get_args(hint))
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def from_dict(raw: dict | None) -> RunConfig:
    """Build a RunConfig from a plain mapping; raise one UserError listing every bad key."""
    issues: list[str] = []
    config = _build(RunConfig, raw or {}, "", issues)
    if not issues:
        issues += cross_checks(config)
    if issues:
        raise UserError("bad config: " + "; ".join(issues))
    return config


DEFAULT_RUN = Path(__file__).with_name("default.yaml")


def load(path: str | Path | None) -> RunConfig:
    """Read a YAML config file (None = the embedded default run, pipeline/default.yaml)."""
    path = Path(path) if path is not None else DEFAULT_RUN
    try:
        raw = yaml.load(path.read_text(), Loader=_StrictLoader)
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise UserError(f"config file {path} is a folder") from None
    except UnicodeDecodeError:
        raise UserError(f"config file {path} is not UTF-8 text") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"config file {path} is not valid YAML{where}: {problem}") from None
    return from_dict(raw)


class _StrictLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (plain YAML keeps the last one silently)."""


def _unique_keys(loader: _StrictLoader, node: yaml.MappingNode) -> dict:
    first: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in first:
            raise yaml.constructor.ConstructorError(
                None, None, f"key '{key}' given twice (first at line {first[key]})", key_node.start_mark
            )
        first[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_keys)


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def dump(config, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def fingerprint(*parts: typing.Any) -> str:
    """A stable hash of JSON-able parts (configs as dicts, upstream fingerprints, file hashes)."""
    blob = json.dumps([to_dict(p) if dataclasses.is_dataclass(p) else p for p in parts], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
