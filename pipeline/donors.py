"""Donor windows (``search.donors``): a window pasted from a real image of the target class, beside the search.

The latent search follows the gradient at the original. A classifier that reads a small mark's *shape* (a
watermark's glyph, a tag's letters) flips when the mark becomes another mark, and another shape is not a small step
from the original, so the search flips it by rewriting everything around the mark instead. A real image the
classifier assigns to the target class carries such a mark where the shortcut puts it; pasting the right window of
it shows the flip directly (regions of a distractor image, as in Goyal et al. 2019, "Counterfactual visual
explanations"). Per image: the ``donors`` real target-class images nearest to it in pooled latent code; from each,
the window of side ``window`` or twice that, anywhere, whose paste raises the target log-probability most to first
order (input gradient x (donor - original), summed over the window: one backward pass rates every window); each
paste judged on the classifier. With ``leave_evidence`` a window leaves out the donor's own evidence (its feature
mask), so a paste cannot carry the donor's object into the image. The Explainer confines the smallest valid paste
like any attempt and lets it compete with the searched edit on L1. The donor bank is built in pipeline/explain.py
(``donor_bank``).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from pipeline.regions import pixels


@torch.no_grad()
def nearest(explainer, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, donors, C, H, W): per sample the real target-class images nearest to it in pooled latent code; and
    (B, donors, 1, H, W) what of each a paste leaves out: with ``leave_evidence`` its feature mask (nothing where
    the data has none), else nothing. Not grown: where the evidence is all but the mark (a texture around a tag), a
    margin would cut the mark itself."""
    s = explainer.settings
    out = torch.empty(len(x), s.donors, *x.shape[1:], device=x.device, dtype=x.dtype)
    spared = torch.zeros(len(x), s.donors, 1, *x.shape[2:], device=x.device, dtype=x.dtype)
    own = explainer.pooled_code(x)
    for t in target.unique().tolist():
        images, codes, *masks = (v.to(x) for v in explainer.donors[t])
        rows = target == t
        if not len(images):  # no real image of this class: the 'paste' changes nothing and cannot flip
            out[rows] = x[rows, None]
            continue
        k = min(s.donors, len(images))
        closest = torch.cdist(own[rows], codes).topk(k, largest=False).indices  # (b_t, k)
        picked = closest.repeat(1, -(-s.donors // k))[:, : s.donors]
        out[rows] = images[picked]
        if s.leave_evidence and masks:
            spared[rows] = masks[0][picked]
    return out, spared


def search(explainer, x: torch.Tensor, target: torch.Tensor) -> dict:
    """Per sample and donor the best-rated window of each size pasted; per sample the valid paste with the smallest
    L1 (else the most probable), as an attempt's result."""
    s, (b, _, h, w) = explainer.settings, x.shape
    donors, spared = nearest(explainer, x, target)
    with torch.enable_grad():
        xg = x.detach().clone().requires_grad_(True)
        log_p = torch.log_softmax(explainer.classifier(xg), -1).gather(1, target[:, None])
        (grad,) = torch.autograd.grad(log_p.sum(), xg)
    gain = (grad[:, None] * (donors - x[:, None])).sum(2, keepdim=True) * (1 - spared)  # (B, D, 1, H, W)
    gain = gain.flatten(0, 1)
    ys = torch.arange(h, device=x.device).view(1, 1, h, 1)
    xs = torch.arange(w, device=x.device).view(1, 1, 1, w)
    pastes = []
    for share in (s.window, 2 * s.window):
        side = min(h, w, max(2, pixels(share, x)))
        best = F.avg_pool2d(gain, side, stride=1).flatten(1).argmax(1).view(-1, 1, 1, 1)
        top, left = best // (w - side + 1), best % (w - side + 1)
        window = ((ys >= top) & (ys < top + side) & (xs >= left) & (xs < left + side)).to(x.dtype)
        window = window.view(b, s.donors, 1, h, w) * (1 - spared)
        pastes.append(window * donors + (1 - window) * x[:, None])
    candidates = torch.cat(pastes, 1)  # (B, n, C, H, W)
    n = candidates.shape[1]
    p = explainer.p_class(candidates.flatten(0, 1), target.repeat_interleave(n)).view(b, n)
    l1 = (candidates - x[:, None]).abs().flatten(2).mean(2)
    chosen = torch.where(p >= s.goal, l1, 1e6 - p).argmin(1)  # the smallest valid, else the most probable
    rows = torch.arange(b, device=x.device)
    zeros = torch.zeros(b, dtype=torch.long, device=x.device)
    return {
        "x_cf": candidates[rows, chosen],
        "p_before": log_p.detach().exp().squeeze(1),
        "p_after": p[rows, chosen],
        "success": p[rows, chosen] >= s.goal,
        "steps": zeros,
        "no_room": zeros.bool(),
        # the donors' encode, the gradient's forward and backward, one judgement per paste
        "evaluations": zeros + 3 + n,
    }
