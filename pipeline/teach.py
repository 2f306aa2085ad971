"""Simulated teachers: label counterfactuals automatically, writing to the same feedback store as experts.

- mask oracle, density rule (default): the change (a pixel's: its largest channel's) weighted by the centred
  feature mask (positive on the true feature, negative elsewhere); a positive mean means the edit sits on the real
  evidence -> true, else spurious.
  Where the feature covers most of the image (a texture) every density is near 1 and it cannot decide.
- mask oracle by intervention (``oracle: intervention``): the explained classifier sees only the part of the edit
  inside the feature mask, then only the part outside; whichever carries the flip decides (true / spurious), the
  density rule where only both parts together move it.
- mask oracle by density, then intervention (``oracle: density+intervention``): the density rule, and
  intervention for the edits it is unsure of (an edit as dense on the evidence as off it: a cast of the whole
  image), so only those edits get the verdict of the classifier's own reading.
- model oracle: the unbiased reference classifier; it flips too -> true, else spurious; it abstains where it
  gets the original image wrong itself. With ``moved``, an edit that took it part of the way is unsure instead;
  with ``other_class``, an edit it reads as a third class.
Only counterfactuals that flipped the classifier get a verdict (with ``partial``, also those that came that share
of the way). Each oracle reduces an edit to a score whose
boundary is 1 (the feature's change per pixel against the image's; the reference's odds of the target class
against the strongest other class); with ``band`` > 1 it says unsure between 1 / band and band, as an expert does
before an edit that moves square and background alike (band 1: the authors' oracles exactly). An optional noise
rate flips verdicts at random to simulate imperfect experts; with ``unrealistic`` the teacher rejects edits whose
realism proxy is above it, as an expert rejects an image no real one looks like.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from pipeline import manifest, models
from pipeline.config_rules import ORACLES
from pipeline.data import load_mask, read_rgb
from pipeline.errors import UserError
from pipeline.rundir import read_json
from pipeline.store import FeedbackStore

TEACHERS = ("mask", "model")


def _image(path: Path, transform) -> torch.Tensor:
    with Image.open(path) as image:
        return transform(image)


def banded(score: float, band: float) -> str:
    """true above band, spurious at or below 1 / band, unsure between."""
    return "true" if score > band else "spurious" if score <= 1 / band else "unsure"


def mask_verdicts(
    table: pd.DataFrame, explain_dir: Path, data_root: Path, band: float = 1.0, resize: str = "pad"
) -> pd.Series:
    masks = feature_masks(data_root)
    verdicts = {}
    for row in table.itertuples():
        if not masks.get(row.source_path):
            continue  # no feature mask for this image: the oracle abstains
        cf, original = (read_rgb(explain_dir / p, float) for p in (row.counterfactual, row.original))
        # a pixel's change is its largest channel's: a grey pixel's gain is not three times a red one's
        delta = np.abs(cf - original).max(-1)
        # the mask fitted like its image was (same size, same resize policy)
        mask = load_mask(data_root / masks[row.source_path], list(delta.shape), resize).astype(float)
        # change per pixel on the feature / per pixel overall: > 1 <=> the centred-mask mean is positive
        density = (delta * mask).mean() / max(delta.mean() * mask.mean(), 1e-12)
        verdicts[row.id] = banded(density, band)
    return pd.Series(verdicts, dtype=object)


MOVED = 1e-3  # a gain in log-odds below this is no movement (float rounding, not the classifier)


def _margin(model, x: torch.Tensor, target: int) -> torch.Tensor:
    """Log-odds of the target class against the strongest other class, per image."""
    return _logit_margin(model(x), target)


def _logit_margin(logits: torch.Tensor, target: int) -> torch.Tensor:
    """``_margin`` from logits already computed."""
    logp = torch.log_softmax(logits, -1)
    others = torch.cat([logp[:, :target], logp[:, target + 1 :]], 1)
    return logp[:, target] - others.max(1).values


@torch.no_grad()
def intervention_gains(
    model, x: torch.Tensor, x_cf: torch.Tensor, mask: torch.Tensor, target: int
) -> tuple[float, float]:
    """The classifier's gain in target log-odds from applying only the part of the edit inside ``mask``, and from
    only the part outside it."""
    delta = x_cf - x
    parts = torch.cat([x, x + mask * delta, x + (1 - mask) * delta])
    before, inside, outside = _margin(model, parts, target).tolist()
    return inside - before, outside - before


def intervention_score(
    model, x: torch.Tensor, x_cf: torch.Tensor, mask: torch.Tensor, target: int
) -> float | None:
    """How much more of the flip the change on the feature carries than the change off it: the gain from the part
    of the edit inside ``mask`` over the gain from the part outside it (``intervention_gains``; > 1: the evidence
    carries it). None when neither part alone moves the classifier toward the target (the parts only work
    together)."""
    gain_in, gain_out = intervention_gains(model, x, x_cf, mask, target)
    if gain_in <= MOVED and gain_out <= MOVED:
        return None
    return max(gain_in, MOVED) / max(gain_out, MOVED)


def intervention_verdicts(
    table: pd.DataFrame,
    explain_dir: Path,
    data_root: Path,
    checkpoint: Path,
    band: float = 1.0,
    resize: str = "pad",
) -> pd.Series:
    """The mask oracle by intervention: the explained classifier judges the edit's part on the feature mask and
    its part off it separately; the density rule decides where the parts only flip it together."""
    model, card = models.load(checkpoint)
    model, transform = models.OnPixels(model, card), models.pixel_transform(card)
    masks, verdicts, undecided = feature_masks(data_root), {}, []
    for row in table.itertuples():
        if not masks.get(row.source_path):
            continue  # no feature mask: abstain, as the density rule does
        x = _image(explain_dir / row.original, transform)[None]
        x_cf = _image(explain_dir / row.counterfactual, transform)[None]
        mask = load_mask(data_root / masks[row.source_path], list(x.shape[-2:]), resize)
        mask = torch.from_numpy(mask).float()[None, None]
        score = intervention_score(model, x, x_cf, mask, card.classes.index(row.target_class))
        if score is None:
            undecided.append(row.Index)
        else:
            verdicts[row.id] = banded(score, band)
    density = mask_verdicts(table.loc[undecided], explain_dir, data_root, band, resize)
    return pd.Series(verdicts | density.to_dict(), dtype=object)


def reference_verdict(
    before: float, after: float, band: float, moved: bool = False, elsewhere: bool = False
) -> str:
    """The model oracle's verdict from the reference's target log-odds (against its strongest other class) on the
    original (``before``, below 0: it reads the source class) and on the edit (``after``): banded odds. With
    ``moved``, an edit that took the reference more than 1 / band of the way to its own flip is unsure, not
    spurious: an unbiased reference that moves that far sees evidence in the change, too little to flip it, and a
    spurious verdict would teach the classifier to ignore that evidence (band 1: the authors' oracle exactly).
    ``elsewhere``: the reference reads a third class on the edit (``other_class_unsure``), so the change is
    evidence, of neither class, and a spurious verdict (keep the source label) would be wrong: unsure."""
    verdict = banded(float(np.exp(after)), band)
    if moved and verdict == "spurious" and after - before > -before / band:
        return "unsure"
    if elsewhere and verdict == "spurious":
        return "unsure"
    return verdict


@torch.no_grad()
def model_verdicts(
    table: pd.DataFrame,
    explain_dir: Path,
    reference: Path,
    band: float = 1.0,
    moved: bool = False,
    other_class: bool = False,
) -> pd.Series:
    """The model oracle's verdicts (``reference_verdict``); with ``other_class``, an edit the reference reads as
    neither the source nor the target class is unsure, not spurious."""
    model, card = models.load(reference)
    model, transform = models.OnPixels(model, card), models.pixel_transform(card)
    verdicts = {}
    for row in table.itertuples():
        x = _image(explain_dir / row.original, transform)[None]
        x_cf = _image(explain_dir / row.counterfactual, transform)[None]
        logits = model(torch.cat([x, x_cf]))  # original and edit in one pass
        if card.classes[int(logits[0].argmax())] != row.source_class:
            continue  # the oracle gets the original wrong: it abstains
        target = card.classes.index(row.target_class)
        # log-odds of the target against the strongest other class: after > 0 <=> the reference flips too
        before, after = _logit_margin(logits, target).tolist()
        reads = card.classes[int(logits[1].argmax())]
        elsewhere = other_class and reads not in (row.source_class, row.target_class)
        verdicts[row.id] = reference_verdict(before, after, band, moved, elsewhere)
    return pd.Series(verdicts, dtype=object)


def explained(run_dir: Path, round: int) -> Path:
    """The checkpoint the round's explain stage explained (recorded in its desiderata.json)."""
    name = read_json(Path(run_dir) / manifest.folder(round) / "desiderata.json").get("explained")
    if not name or not (Path(run_dir) / name / models.CARD).is_file():
        raise UserError(
            f"round {round}: the interventional mask oracle needs the classifier explain explained, and "
            f"{manifest.folder(round)}/desiderata.json does not name one in {run_dir} (rerun with --from explain)"
        )
    return Path(run_dir) / name


def feature_masks(data_root: Path) -> dict[str, str]:
    """Image path -> feature-mask path, for the images that have one."""
    table = pd.read_csv(Path(data_root) / "metadata.csv", dtype=str, keep_default_na=False)
    if "feature_mask" not in table:
        return {}
    return {p.strip(): m.strip() for p, m in zip(table["path"], table["feature_mask"]) if m.strip()}


def run(
    run_dir: Path,
    teacher: str,
    data_root: Path,
    reference: Path | None = None,
    noise: float = 0.0,
    round: int = 1,
    seed: int = 0,
    band: float = 1.0,
    resize: str = "pad",
    oracle: str = "density",
    unrealistic: float = 0.0,
    partial: float = 1.0,
    moved: bool = False,
    other_class: bool = False,
    intervention_true: bool = True,
) -> dict:
    """Label every counterfactual of the round's explain folder that flipped the classifier (or, with ``partial``
    < 1, came that share of the way: ``manifest.judged``) and write the verdicts to the store. Without
    ``intervention_true``, ``density+intervention`` takes only the spurious verdicts of intervention: an edit the
    density rule is unsure of and whose part on the mask carries the flip stays unsure."""
    if teacher not in TEACHERS:
        raise UserError(f"unknown teacher '{teacher}' (choose {', '.join(TEACHERS)})")
    if oracle not in ORACLES:
        raise UserError(f"unknown mask oracle '{oracle}' (choose {', '.join(ORACLES)})")
    explain_dir = run_dir / manifest.folder(round)
    everything = manifest.read(explain_dir)
    table = manifest.judged(everything, partial)
    if teacher == "mask" and oracle == "intervention":
        verdicts = intervention_verdicts(
            table, explain_dir, data_root, explained(run_dir, round), band, resize
        )
    elif teacher == "mask":
        verdicts = mask_verdicts(table, explain_dir, data_root, band, resize)
        if oracle == "density+intervention" and (verdicts == "unsure").any():
            unsure = table[table["id"].isin(verdicts.index[verdicts == "unsure"])]
            checkpoint = explained(run_dir, round)
            settled = intervention_verdicts(unsure, explain_dir, data_root, checkpoint, band, resize)
            verdicts.update(settled if intervention_true else settled[settled != "true"])
    else:
        if reference is None or not (reference / "card.json").exists():
            raise UserError(
                "the model oracle needs the reference classifier (reference stage or --reference)"
            )
        verdicts = model_verdicts(table, explain_dir, reference, band, moved, other_class)
    if noise > 0:
        flip = np.random.default_rng(seed).random(len(verdicts)) < noise
        # an imperfect expert swaps true and spurious; an unsure verdict stays unsure
        verdicts[flip] = verdicts[flip].replace({"true": "spurious", "spurious": "true"})
    if unrealistic > 0 and "realism" not in table:
        raise UserError(
            f"feedback.unrealistic needs the realism column of {explain_dir}/manifest.csv (rerun explain)"
        )
    if unrealistic > 0:  # as an expert rejects an edit no real image shows, whatever it changed
        realism = table.set_index("id")["realism"].reindex(verdicts.index).to_numpy(float)
        verdicts[realism > unrealistic] = "unrealistic"
    annotator = f"teacher:{teacher}"
    store = FeedbackStore(run_dir / "feedback.sqlite")
    # a rerun gives the same verdicts: only a verdict that differs from the teacher's current one is appended
    current = store.labels(round)
    current = current[current["annotator"] == annotator].set_index("cf_id")["label"]
    store.add_many(
        {"cf_id": cf_id, "annotator": annotator, "label": label, "round": round}
        for cf_id, label in verdicts.items()
        if current.get(cf_id) != label
    )
    counts = verdicts.value_counts().to_dict()
    return {
        "annotator": annotator,
        "labelled": int(len(verdicts)),
        "not_flipped": int(len(everything) - len(table)),
        "abstained": int(len(table) - len(verdicts)),
        **counts,
    }
