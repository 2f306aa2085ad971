"""Where an edit lies, in sizes relative to the image: pixel counts from shares of the image side, blurred change
masks, dilation, graph-based segments of the original and their unions, and the roughness of a change. Every size
is a share of the image side (the geometric mean of height and width), so one setting fits every resolution."""

from __future__ import annotations

import math

import numpy as np
import torch
from skimage.segmentation import felzenszwalb
from torch.nn import functional as F


def pixels(share: float, like: torch.Tensor, odd: bool = False) -> int:
    """A size given as a share of the image side (the geometric mean of height and width) in whole pixels."""
    n = max(0, round(share * math.sqrt(like.shape[-2] * like.shape[-1])))
    return max(1, n + (n % 2 == 0)) if odd else n


def blur(change: torch.Tensor, share: float) -> torch.Tensor:
    """Gaussian blur of a (B, 1, H, W) map, kernel ``share`` of the image side, padded by replication:
    torchvision's gaussian_blur reflects at the border, which would mirror a change at the image's edge (a corner
    tag) back inward."""
    size = pixels(share, change, odd=True)
    if size <= 1:
        return change
    sigma = size / 3
    r = torch.arange(size, dtype=change.dtype, device=change.device) - (size - 1) / 2
    k = torch.exp(-(r**2) / (2 * sigma**2))
    k = k / k.sum()
    change = F.conv2d(F.pad(change, (size // 2,) * 4, mode="replicate"), k.view(1, 1, 1, -1))
    return F.conv2d(change, k.view(1, 1, -1, 1))


def change_mask(delta: torch.Tensor, blur_share: float, threshold: float) -> torch.Tensor:
    """1 where the absolute change, blurred by ``blur_share`` of the image side, reaches ``threshold`` x its
    per-image maximum: (B, 1, H, W)."""
    change = blur(delta.abs().sum(1, keepdim=True), blur_share)
    peak = change.flatten(1).amax(1).clamp_min(1e-8).view(-1, 1, 1, 1)
    return (change >= threshold * peak).float()


def segments(x: torch.Tensor, max_regions: int) -> torch.Tensor:
    """Per image a label map (B, H, W) with at most max_regions graph-based segments (Felzenszwalb & Huttenlocher
    2004) of the original: the coarsest-but-one cut of the image into parts an expert would name (object, background).
    The scale doubles until few enough segments remain (it is relative to pixel count, so sizes need no tuning)."""
    pixels = (
        ((x.detach().cpu().float().permute(0, 2, 3, 1) + 1) * 127.5).clamp(0, 255).numpy().astype(np.uint8)
    )
    min_size = max(8, pixels.shape[1] * pixels.shape[2] // 256)
    maps = []
    for image in pixels:
        scale = 32.0
        while (labels := felzenszwalb(image, scale=scale, sigma=0.8, min_size=min_size)).max() >= max_regions:
            scale *= 2
        maps.append(torch.from_numpy(labels.astype(np.int64)))
    return torch.stack(maps).to(x.device)


def subset_masks(labels: torch.Tensor) -> torch.Tensor:
    """All non-empty unions of one image's segments as masks (S, 1, H, W); bit i of subset s keeps segment i."""
    n = int(labels.max()) + 1
    bits = torch.arange(1, 2**n, device=labels.device)
    keep = (bits[:, None] >> torch.arange(n, device=labels.device)) & 1  # (S, n)
    return keep[:, labels].unsqueeze(1).float()  # (S, 1, H, W)


def _neighbours(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Absolute differences to the right and lower neighbour of a (B, C, H, W) tensor."""
    return (t[..., :, 1:] - t[..., :, :-1]).abs(), (t[..., 1:, :] - t[..., :-1, :]).abs()


def edge_weights(x: torch.Tensor, contrast: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per neighbour pair of the original x, near 1 where the image is smooth and near 0 across its edges: exp of
    minus the squared colour difference over ``contrast`` x the image's median neighbour difference (its noise and
    texture level, so the same setting fits a noisy scan and a clean render)."""
    dx, dy = (d.sum(1, keepdim=True) for d in _neighbours(x))
    level = torch.cat([dx.flatten(1), dy.flatten(1)], 1).median(1).values
    scale = (contrast * level).clamp_min(1e-3).view(-1, 1, 1, 1)
    return torch.exp(-((dx / scale) ** 2)), torch.exp(-((dy / scale) ** 2))


def total_variation(delta: torch.Tensor, free: torch.Tensor | None = None, edges=None) -> torch.Tensor:
    """Mean absolute difference between neighbouring pixels of a (B, C, H, W) change, per image: (B,). With a
    (B, 1, H, W) ``free`` mask only pairs of free pixels count: where an attempt may not edit, nothing is rough;
    with ``edges`` (edge_weights of the original) pairs across the original's edges count less."""
    dx, dy = _neighbours(delta)
    if free is not None:
        dx = dx * free[..., :, 1:] * free[..., :, :-1]
        dy = dy * free[..., 1:, :] * free[..., :-1, :]
    if edges is not None:
        dx, dy = dx * edges[0], dy * edges[1]
    return dx.flatten(1).mean(1) + dy.flatten(1).mean(1)


def roughness(
    delta: torch.Tensor, free: torch.Tensor | None = None, edges=None, eps: float = 1e-3
) -> torch.Tensor:
    """Total variation per unit of mean absolute change (both within ``free``), per image: 0 for an even change,
    the same for a change and its double (eps keeps the first step, from no change at all, finite)."""
    inside = delta if free is None else delta * free
    return total_variation(delta, free, edges) / (inside.abs().flatten(1).mean(1) + eps)


def dilate(mask: torch.Tensor, share: float) -> torch.Tensor:
    """Grow a (B, 1, H, W) mask by ``share`` of the image side."""
    n = pixels(share, mask)
    return F.max_pool2d(mask, 2 * n + 1, stride=1, padding=n) if n > 0 else mask
