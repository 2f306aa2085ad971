"""Confinement: after a search, the smallest part of its edit that still does what the edit did, so a search that
moved object and background together becomes the one edit that suffices (often the background alone), and the next
attempt gets the rest whole. Two ways (``search.confine``): "threshold" bisects the strongest share of the blurred
change that still reaches the need; "regions" cuts the original into a few segments (Felzenszwalb graph
segmentation) and keeps the valid union of segments with the smallest L1 change.

``judge(x, target)`` is the original classifier's probability of each image's target class; ``settings`` the
search's (blur, paste threshold, dilation, max regions). Each result counts its ``evaluations``: judge calls per
sample.
"""

from __future__ import annotations

import torch

from pipeline.regions import blur, dilate, segments, subset_masks


@torch.no_grad()
def by_threshold(judge, settings, x, x_cf, target, need, iterations: int = 8) -> dict:
    """Paste back as much as possible: bisect, per sample, the largest threshold t (share of the strongest
    blurred change) such that keeping only the change above t still reaches ``need``, the target probability
    the kept edit must have (``Explainer.needed``; NaN: not confined, no bisection). Confines attempt 1 to the region it
    needs, which leaves the rest free for the next attempt. ``evaluations``: classifier calls per sample."""
    delta = x_cf - x
    change = blur(delta.abs().sum(1, keepdim=True), settings.blur)
    peak = change.flatten(1).amax(1).clamp_min(1e-8).view(-1, 1, 1, 1)
    low = torch.full_like(peak, settings.paste_threshold)  # this threshold is known to work (or fail)
    high = torch.ones_like(peak)
    rows = (~need.isnan()).nonzero().squeeze(1)
    for _ in range(iterations if len(rows) else 0):
        mid = (low[rows] + high[rows]) / 2
        p = judge(x[rows] + (change[rows] >= mid * peak[rows]) * delta[rows], target[rows])
        ok = (p >= need[rows]).view(-1, 1, 1, 1)
        low[rows], high[rows] = torch.where(ok, mid, low[rows]), torch.where(ok, high[rows], mid)
    mask = (change >= low * peak).float() * (delta.abs().sum(1, keepdim=True) > 0)
    confined = x + mask * delta
    used = dilate(mask, settings.dilate)
    evaluations = torch.ones(len(x), dtype=torch.long, device=x.device)  # the confined edit's judgement
    evaluations[rows] += iterations
    return {
        "x_cf": confined,
        "p_after": judge(confined, target),
        "mask": mask,
        "used": used,
        "evaluations": evaluations,
    }


@torch.no_grad()
def by_regions(judge, settings, x, x_cf, target, need) -> dict:
    """Keep, per sample, the subset of the original's segments with the smallest L1 change that still reaches
    ``need`` (as by_threshold()); samples without such a subset fall back to by_threshold(). The kept segments are
    blocked whole."""
    delta = x_cf - x
    evaluations = torch.zeros(len(x), dtype=torch.long, device=x.device)
    found = {}
    valid_rows = (~need.isnan()).nonzero().flatten()
    labels = segments(x[valid_rows], settings.max_regions) if len(valid_rows) else []
    for i, label_map in zip(valid_rows.tolist(), labels):
        masks = subset_masks(label_map)
        best, p, evaluations[i] = smallest_valid(judge, x[i], delta[i], target[i], need[i], masks)
        if best is not None:
            found[i] = (masks[best], p)
    result = {
        "x_cf": x_cf.clone(),
        "p_after": torch.empty(len(x), device=x.device),
        "mask": torch.empty_like(x[:, :1]),
        "used": torch.empty_like(x[:, :1]),
        "evaluations": evaluations,
    }
    rest = torch.tensor([i for i in range(len(x)) if i not in found], dtype=torch.long, device=x.device)
    if len(rest):  # no segments to pay for where nothing is confined
        fallback = by_threshold(judge, settings, x[rest], x_cf[rest], target[rest], need[rest])
        fallback["evaluations"] += evaluations[rest]  # the unions tried before falling back
        for key, value in fallback.items():
            result[key][rest] = value
    for i, (region, p) in found.items():
        result["x_cf"][i] = x[i] + region * delta[i]
        result["p_after"][i] = p
        result["mask"][i] = region * (delta[i].abs().sum(0, keepdim=True) > 0)
        result["used"][i] = region
    return result


def smallest_valid(judge, x, delta, target, need, masks, chunk: int = 8) -> tuple:
    """Among the region masks (S, 1, H, W), the one whose share of the edit ``delta`` reaches ``need`` with the
    smallest L1 change: (its index or None, its probability, classifier evaluations). Masks are tried from the
    smallest change up, ``chunk`` at a time, so the search stops at the first chunk holding a valid one."""
    l1 = (masks * delta.abs()).flatten(1).sum(1)
    order = l1.argsort(stable=True)  # ties: the lower index first, as argmin
    for start in range(0, len(order), chunk):
        tried = order[start : start + chunk]
        p = judge(x + masks[tried] * delta, target.expand(len(tried)))
        valid = (p >= need).nonzero().flatten()
        if len(valid):
            return tried[valid[0]], p[valid[0]], start + len(tried)
    return None, None, len(order)
