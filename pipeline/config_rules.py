"""What values and combinations of settings a run config allows, beyond each field's type: per-key value rules,
and the cross-checks of settings that only make sense together (pipeline/config.py applies both)."""

from __future__ import annotations

import typing

if typing.TYPE_CHECKING:
    from pipeline.config import RunConfig

# how the mask teacher judges (pipeline/teach.py)
ORACLES = ("density", "intervention", "density+intervention")


def _devices_ok(v) -> bool:
    if isinstance(v, int):
        return v >= 1 or v == -1
    return v in ("auto", "-1") or all(part.strip().isdigit() for part in v.split(","))


def _sides(v) -> list:
    return [v] if not isinstance(v, list) else v if len(v) == 2 else [None]


def _numbers(v: list, ok) -> bool:
    numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
    return len(v) in (1, 3) and numeric and all(ok(x) for x in v)


# Value checks beyond the type: key -> (predicate, what is allowed)
CHECKS: dict[str, tuple[typing.Callable[[typing.Any], bool], str]] = {
    "data.square.n": (lambda v: v >= 20, "an integer >= 20"),
    "data.square.poison": (lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]"),
    "data.square.noise": (lambda v: v >= 0, "a number >= 0"),
    "data.square.size": (lambda v: v >= 16, "an integer >= 16 (the square patch is 12 px)"),
    "data.image_size": (
        lambda v: all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 8 and s % 8 == 0 for s in _sides(v)
        ),
        "a multiple of 8 (>= 8), or [height, width] of such",
    ),
    "data.resize": (lambda v: v in ("pad", "crop", "stretch"), "pad, crop or stretch"),
    "classifier.mean": (lambda v: _numbers(v, lambda x: 0 <= x <= 1), "a list of 1 or 3 numbers in [0, 1]"),
    "classifier.std": (lambda v: _numbers(v, lambda x: x > 0), "a list of 1 or 3 numbers > 0"),
    "classifier.preset": (lambda v: v in ("imagenet", "half"), "imagenet or half"),
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
    "explain.search.pace": (lambda v: 0 <= v <= 1, "a share in [0, 1] (0 = off)"),
    "explain.search.lr": (lambda v: v > 0, "a number > 0"),
    "explain.search.cast_lr": (lambda v: v > 0, "a number > 0"),
    "explain.search.temperature": (lambda v: v > 0, "a number > 0"),
    "explain.search.l1": (lambda v: v >= 0, "a number >= 0"),
    "explain.search.tv": (lambda v: v >= 0, "a number >= 0"),
    "explain.search.patch_prior": (lambda v: v >= 0, "a number >= 0"),
    "explain.search.prototype": (lambda v: v >= 0, "a number >= 0"),
    "explain.search.smoothgrad": (lambda v: v >= 0, "an integer >= 0"),
    "explain.search.paste_threshold": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "explain.search.blur": (lambda v: 0 <= v <= 0.5, "a share of the image side in [0, 0.5]"),
    "explain.search.dilate": (lambda v: 0 <= v <= 0.5, "a share of the image side in [0, 0.5]"),
    "explain.search.confine": (lambda v: v in ("threshold", "regions"), "threshold or regions"),
    "explain.search.max_regions": (lambda v: 1 <= v <= 8, "an integer in [1, 8]"),
    "explain.search.windows": (lambda v: 0 <= v <= 8, "an integer in [0, 8]"),
    "explain.search.window": (lambda v: 0 < v <= 1, "a share of the image side in (0, 1]"),
    "explain.search.donors": (lambda v: 0 <= v <= 16, "an integer in [0, 16]"),
    "explain.search.filter_timestep": (lambda v: v >= 0, "an integer >= 0"),
    "feedback.teacher": (lambda v: v in ("mask", "model", "human"), "mask, model or human"),
    "feedback.noise": (lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]"),
    "feedback.band": (lambda v: v >= 1.0, "a number >= 1"),
    "feedback.unrealistic": (lambda v: v == 0 or v >= 1.0, "0 (off) or a realism ratio >= 1"),
    "feedback.partial": (lambda v: 0 < v <= 1, "a share in (0, 1] (1 = only counterfactuals that flipped)"),
    "feedback.oracle": (lambda v: v in ORACLES, " or ".join(ORACLES)),
    "feedback.min_labels": (lambda v: v >= 1, "an integer >= 1"),
    "feedback.min_votes": (lambda v: v >= 1, "an integer >= 1"),
    "distil.rounds": (lambda v: v >= 1, "an integer >= 1"),
    "distil.start": (lambda v: v in ("latest", "initial"), "latest or initial"),
    "distil.layers": (lambda v: v in ("all", "head", "none", "staged"), "all, head, none or staged"),
    "distil.keep": (lambda v: v in ("best", "last"), "best or last"),
    "distil.originals": (lambda v: v in ("labels", "explained"), "labels or explained"),
    "distil.mix": (lambda v: 0.0 < v < 1.0, "a number in (0, 1)"),
    "distil.holdout": (lambda v: 0.0 <= v < 1.0, "a number in [0, 1)"),
    "distil.anchor": (lambda v: v >= 0, "a number >= 0"),
    "distil.stretch": (lambda v: 1.0 <= v <= 10.0, "a number in [1, 10]"),
    "distil.erase": (
        lambda v: v in ("auto", "hold", "verdicts") or (isinstance(v, int) and 0 <= v <= 64),
        "auto, hold, verdicts or an integer in [0, 64]",
    ),
    "distil.flip": (lambda v: v in ("none", "horizontal", "both"), "none, horizontal or both"),
    "distil.shift": (lambda v: 0.0 <= v < 0.5, "a share in [0, 0.5)"),
    "distil.epochs": (lambda v: v >= 1, "an integer >= 1"),
    "distil.passes": (lambda v: v >= 0, "a number >= 0 (0 = distil.epochs)"),
    "distil.batch_size": (lambda v: v >= 2, "an integer >= 2"),
    "distil.lr": (lambda v: v > 0, "a number > 0"),
    "distil.weight_decay": (lambda v: v >= 0, "a number >= 0"),
    "distil.precision": (
        lambda v: v in ("auto", "32-true", "16-mixed", "bf16-mixed"),
        "auto, 32-true, 16-mixed or bf16-mixed",
    ),
    "baseline.subsets": (lambda v: v >= 1, "an integer >= 1"),
    **{
        f"{section}.devices": (_devices_ok, "an integer >= 1, -1 (all), auto, or GPU ids like '0,1'")
        for section in ("classifier", "explain", "distil")
    },
    "name": (
        lambda v: v and v.isprintable() and not set(v) & set("/\\") and v not in {".", ".."},
        "a plain folder name (no slashes, no control characters)",
    ),
}


def cross_checks(config: RunConfig) -> list[str]:
    """Settings that only make sense together."""
    issues, c = [], config.classifier
    given = c.mean is not None or c.std is not None
    if c.preset is not None and given:
        issues.append("classifier.preset: give a preset or classifier.mean/std, not both")
    if (c.mean is None) != (c.std is None):
        issues.append("classifier.mean and classifier.std: give both")
    imported = c.weights is not None or config.reference.weights is not None
    if imported and c.preset is None and not given:
        issues.append(
            "classifier.weights: say how the imported model normalises its input: classifier.preset: imagenet "
            "(or half) or classifier.mean / classifier.std"
        )
    if config.feedback.teacher == "model" and not config.reference.enabled:
        issues.append(
            "feedback.teacher: model needs the reference classifier (reference.enabled: true, with "
            "reference.root or reference.weights for your own data); or use feedback.teacher: human"
        )
    if config.explain.search.pace > config.feedback.partial:
        issues.append(
            f"explain.search.pace ({config.explain.search.pace}) is above feedback.partial "
            f"({config.feedback.partial}): it would give up searches whose near-flips the teacher judges; set it to "
            "feedback.partial or below"
        )
    if config.distil.layers in ("none", "staged") and config.distil.erase == 0:
        what = "fine-tunes nothing" if config.distil.layers == "none" else "erases alone in round 1"
        issues.append(
            f"distil.layers: {config.distil.layers} {what}; it needs distil.erase >= 1 to change the classifier "
            "(to fine-tune without erasing, set distil.layers: all with distil.erase: 0)"
        )
    if (
        config.distil.layers in ("all", "head")
        and config.distil.erase != 0
        and not config.distil.erase_finetuned
    ):
        issues.append(
            f"distil.erase_finetuned: false with distil.layers: {config.distil.layers} never erases; set "
            "distil.erase: 0 to fine-tune alone, or distil.layers: staged to erase in round 1 only"
        )
    return issues
