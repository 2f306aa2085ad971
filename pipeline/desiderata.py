"""Desiderata of counterfactuals, measured per run: validity, proximity, sparsity, realism, diversity, and where
the dataset has feature masks, whether the change sits on the true feature or on the background (the shortcut).

Realism proxy (offline, no model at all, so the generator's own space does not grade itself): on 16x16
thumbnails, which keep colour and layout but not pixel noise, the mean distance of a counterfactual to its k
nearest real images of the target class, divided by the same distance for real target-class images
(leave-one-out). 1.0 = as close to the real data as real images are to each other; larger = further from anything
real.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch.nn import functional as F

from pipeline.regions import dilate

RIM = 0.03  # share of the image side (2 px at 64 px)
CHANGED = 0.05  # a pixel counts as changed when its channel-summed |delta| exceeds this ([-1, 1] scale)


def per_counterfactual(
    x: torch.Tensor, x_cf: torch.Tensor, feature_mask: torch.Tensor | None
) -> dict[str, np.ndarray]:
    """Proximity and sparsity per image; share of the change on the feature mask when one is given."""
    delta = (x_cf - x).abs().sum(1)  # (B, H, W)
    out = {
        "l1": (x_cf - x).abs().flatten(1).mean(1).numpy(),
        "l2": (x_cf - x).flatten(1).norm(dim=1).numpy(),
        "changed_area": (delta > CHANGED).float().flatten(1).mean(1).numpy(),
    }
    if (
        feature_mask is not None
    ):  # dilated by 3 % of the side: an object's rim belongs to it, not the background
        mask = dilate(feature_mask, RIM)[:, 0]
        total = delta.flatten(1).sum(1).clamp_min(1e-8)
        out["feature_share"] = ((delta * mask).flatten(1).sum(1) / total).numpy()
        # density: mean change on the feature over mean change elsewhere (> 1: the edit concentrates on the
        # feature; the mask oracle's criterion). Mass share alone calls a small object "background" by area.
        inside = (delta * mask).flatten(1).sum(1) / mask.flatten(1).sum(1).clamp_min(1)
        outside = (delta * (1 - mask)).flatten(1).sum(1) / (1 - mask).flatten(1).sum(1).clamp_min(1)
        out["feature_density"] = (inside / outside.clamp_min(1e-8)).numpy()
    return out


def thumbnails(images: torch.Tensor, side: int = 16) -> torch.Tensor:
    """Images area-downsampled to side x side: the space of the realism proxy (colour and layout)."""
    return F.interpolate(images, size=(side, side), mode="area").flatten(1)


def realism(cf_feats: torch.Tensor, real_feats: torch.Tensor, k: int = 5) -> np.ndarray:
    """kNN distance ratio per counterfactual (see module docstring)."""
    k = min(k, len(real_feats) - 1)
    real_d = torch.cdist(real_feats, real_feats)
    real_d.fill_diagonal_(float("inf"))
    scale = real_d.topk(k, largest=False).values.mean().clamp_min(1e-8)
    return (torch.cdist(cf_feats, real_feats).topk(k, largest=False).values.mean(1) / scale).numpy()


def diversity(x: torch.Tensor, attempts: list[torch.Tensor], masks: list[torch.Tensor]) -> dict[str, float]:
    """Mean pairwise L2 between attempts and IoU of their change masks (over samples with both changed)."""
    dists, ious = [], []
    for i in range(len(attempts)):
        for j in range(i + 1, len(attempts)):
            dists.append((attempts[i] - attempts[j]).flatten(1).norm(dim=1))
            a, b = masks[i].flatten(1) > 0, masks[j].flatten(1) > 0
            union = (a | b).sum(1)
            iou = (a & b).sum(1) / union.clamp_min(1)
            ious.append(iou[(a.sum(1) > 0) & (b.sum(1) > 0)])
    if not dists:
        return {}
    ious = torch.cat(ious)
    return {
        "pairwise_l2": float(torch.cat(dists).mean()),
        "mask_iou": float(ious.mean()) if len(ious) else 0.0,
    }


def summarise(manifest: pd.DataFrame) -> dict:
    """Run-level numbers from the manifest (one row per counterfactual attempt)."""
    ok = manifest[manifest["success"]]
    summary = {
        "counterfactuals": int(len(manifest)),
        "validity": float(manifest["success"].mean()),
        "validity_by_attempt": {int(a): float(g["success"].mean()) for a, g in manifest.groupby("attempt")},
        "validity_any_attempt": float(manifest.groupby(["sample", "target_class"])["success"].any().mean()),
        "l1": float(ok["l1"].mean()) if len(ok) else None,
        "l2": float(ok["l2"].mean()) if len(ok) else None,
        "changed_area": float(ok["changed_area"].mean()) if len(ok) else None,
        "realism": float(ok["realism"].mean()) if len(ok) else None,
        "steps": float(manifest["steps"].mean()),
        "no_room_by_attempt": {int(a): float(g["no_room"].mean()) for a, g in manifest.groupby("attempt")},
        "evaluations_per_counterfactual": float(manifest["evaluations"].mean()),
        "seconds_per_counterfactual": float(manifest["seconds"].mean()),
    }
    if "feature_density" in manifest and manifest["feature_density"].notna().any():
        by_attempt = {}
        for attempt, group in ok.groupby("attempt"):
            on_feature = group["feature_density"] > 1
            by_attempt[int(attempt)] = {
                "n_valid": int(len(group)),
                "background": float((~on_feature).mean()),
                "feature": float(on_feature.mean()),
            }
        summary["where_changed"] = by_attempt
    return summary
