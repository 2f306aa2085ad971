"""A patch prior for the explainer's realism term: EPLL (Zoran & Weiss 2011), a Gaussian mixture over small colour
patches of the task's unlabelled training images.

A generic codec can decode any colour: on Square it flips a classifier that reads the background's brightness by
tinting the grey background green or purple, an edit no real image shows. Every patch of a real Square background
lies on the grey axis with independent pixel noise; a tinted patch is far off it in the mixture's Mahalanobis
metric, while a brighter or darker grey patch sits near another component. Penalising the change in patch
negative log-likelihood therefore steers the search toward edits real images make, without training the generator
on the task (the design keeps the codec generic) and without labels.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from sklearn.mixture import GaussianMixture
from torch import nn
from torch.nn import functional as F


def patches(x: torch.Tensor, size: int) -> torch.Tensor:
    """Half-overlapping size x size patches of a (B, C, H, W) batch: (B, L, C * size * size)."""
    return F.unfold(x, size, stride=max(1, size // 2)).transpose(1, 2)


def tiles(x: torch.Tensor, size: int) -> torch.Tensor:
    """Non-overlapping size x size patches of x, zero-padded to whole tiles: (B, L, C * size * size)."""
    h, w = x.shape[-2:]
    x = F.pad(x, (0, -w % size, 0, -h % size))
    return F.unfold(x, size, stride=size).transpose(1, 2)


def untile(p: torch.Tensor, size: int, h: int, w: int) -> torch.Tensor:
    """Inverse of tiles(): (B, L, D) back to (B, C, h, w)."""
    padded = (h + -h % size, w + -w % size)
    return F.fold(p.transpose(1, 2), padded, size, stride=size)[..., :h, :w]


def principal_projectors(precision_chol: torch.Tensor, floor: float = 4.0) -> torch.Tensor:
    """(K, D, D) orthogonal projectors onto each component's directions of real variation: the eigenvectors of its
    covariance whose variance is at least ``floor`` x the component's median eigenvalue (the pixel-noise level),
    and always the strongest one (a saturated patch still may get brighter or darker)."""
    precision = precision_chol.double() @ precision_chol.double().transpose(1, 2)
    values, vectors = torch.linalg.eigh(torch.linalg.inv(precision))  # ascending
    keep = values >= floor * values.median(dim=1, keepdim=True).values
    keep[:, -1] = True
    basis = vectors * keep[:, None, :]
    return (basis @ basis.transpose(1, 2)).float()


class PatchPrior(nn.Module):
    """Negative log-likelihood of an image's patches under a fitted mixture, averaged per patch and dimension."""

    def __init__(
        self, means: torch.Tensor, precision_chol: torch.Tensor, log_weights: torch.Tensor, size: int
    ):
        super().__init__()
        self.size = size
        self.register_buffer("means", means)  # (K, D)
        self.register_buffer("precision_chol", precision_chol)  # (K, D, D): precision = L @ L.T
        log_det = torch.diagonal(precision_chol, dim1=1, dim2=2).log().sum(1)
        self.register_buffer("constant", log_weights + log_det - means.shape[1] / 2 * math.log(2 * math.pi))
        self.register_buffer("projectors", principal_projectors(precision_chol))  # (K, D, D)

    @classmethod
    def fit(
        cls,
        images: torch.Tensor,
        size: int | None = None,
        components: int = 12,
        samples: int = 20000,
        seed: int = 0,
    ) -> PatchPrior:
        """Fit on random patches of real images in [-1, 1] (N, C, H, W); labels are never used. The patch side
        defaults to a sixteenth of the image side, 4 to 8 px: a full covariance costs the 4th power of the side."""
        size = size or min(8, max(4, round(math.sqrt(images.shape[-2] * images.shape[-1]) / 16)))
        bank = patches(images, size).flatten(0, 1)
        rows = torch.randperm(len(bank), generator=torch.Generator().manual_seed(seed))[:samples]
        mixture = GaussianMixture(components, covariance_type="full", reg_covar=1e-4, random_state=seed)
        mixture.fit(bank[rows].double().numpy())
        as_tensor = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731
        return cls(
            as_tensor(mixture.means_),
            as_tensor(mixture.precisions_cholesky_),
            as_tensor(np.log(mixture.weights_)),
            size,
        )

    def _component_log_likelihood(self, p: torch.Tensor) -> torch.Tensor:
        """(B, L, K) log weight + log density of every patch under every component."""
        centred = p[:, :, None, :] - self.means  # (B, L, K, D)
        mahalanobis = torch.einsum("blkd,kde->blke", centred, self.precision_chol).pow(2).sum(-1)
        return self.constant - mahalanobis / 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B,) mean negative log-likelihood per patch dimension."""
        log_likelihood = torch.logsumexp(self._component_log_likelihood(patches(x, self.size)), dim=-1)
        return -log_likelihood.mean(1) / self.means.shape[1]

    @torch.no_grad()
    def assign(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L) the most likely component of each non-overlapping patch of x (padded to whole patches), which
        decides the directions an edit of that patch may take."""
        return self._component_log_likelihood(tiles(x, self.size)).argmax(-1)

    def project(self, delta: torch.Tensor, assignment: torch.Tensor) -> torch.Tensor:
        """The edit ``delta`` with every patch projected onto the principal directions of its component: on
        Square a background patch may only get brighter or darker (its one direction far above the pixel-noise
        floor), never tinted; a patch on the square keeps its several directions."""
        h, w = delta.shape[-2:]
        p = tiles(delta, self.size)  # (B, L, D)
        flat, which = p.reshape(-1, p.shape[-1]), assignment.reshape(-1)
        # tiles grouped by component, one matmul per component: linear in the pixel count and cache-friendly
        # (projecting every tile with all K projectors costs K times the work and memory)
        order = which.argsort()
        counts = torch.bincount(which, minlength=len(self.projectors)).tolist()
        groups = flat[order].split(counts)
        projected = torch.cat([g @ self.projectors[k] for k, g in enumerate(groups)])
        projected = projected[order.argsort()].view_as(p)
        return untile(projected, self.size, h, w)
