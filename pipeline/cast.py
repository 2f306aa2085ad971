"""A counterfactual of another family: one colour cast of the whole image (``search.cast``).

A scanner, a staining protocol or a camera's white balance changes every pixel's colour the same way. A classifier
that learnt such a cast flips under that transformation, and no local edit shows it: a recoloured segment leaves
the rest of the image carrying the cast, and a classifier taught that this segment's colour must not flip it goes
on reading the cast everywhere else. The search: per image three channel gains on [0, 1] intensities (optimised as
log gains from 0, the identity), with the latent search's loss (tempered cross-entropy to the target plus L1 to the
original) and its per-sample stop; nothing is confined, the edit is global by nature. With ``cast_shrink`` a cast
that reached its level is then scaled back along its own direction to the least that still reaches it, so a long
step costs no size. Gains keep black black and stay plausible; a full colour matrix with offsets drove tissue to
colours no scanner makes. On greyscale data the classifier sees the channel mean, so the cast is a change of brightness.

Given real images (``colour_basis``), the gains move in the metric of those images' own colour variation: the search
steps in whitened coordinates, so a direction along which no real image's overall colour varies (green on tissue
whose scanners differ in red against blue) barely moves. A cast that no source produces is a colour the classifier
never meets again, and an edit a fine-tune learns on those images alone.
"""

from __future__ import annotations

import torch

from pipeline.progress import Progress


def identity(n: int, device=None) -> torch.Tensor:
    """(n, 3) parameters of the identity transformation: log channel gains of 0."""
    return torch.zeros(n, 3, device=device)


def colour_basis(images: torch.Tensor, eps: float = 1 / 255) -> torch.Tensor:
    """(3, 3) square root of the covariance of real images' mean log colour (images in [-1, 1], (N, 3, H, W)),
    scaled so its largest direction has unit length: log gains = z @ basis moves along the images' own colour
    variation, a step of z along the main one moving the log gains as much."""
    colours = ((images + 1) / 2).clamp_min(eps).log().mean((2, 3)).double()
    values, vectors = torch.linalg.eigh(torch.cov(colours.T).reshape(3, 3))
    root = vectors @ torch.diag(values.clamp_min(0).sqrt()) @ vectors.T
    return (root / values.max().clamp_min(1e-12).sqrt()).float()


def transformed(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """x in [-1, 1] (B, 3, H, W) with each image's channel gains applied to its [0, 1] intensities (unclamped)."""
    return 2 * ((x + 1) / 2 * params.exp()[..., None, None]) - 1


SHRINK_HALVINGS = 6  # the shrunk cast is within 1/64 of its length of the least that reaches the level


def search(explainer, x: torch.Tensor, target: torch.Tensor) -> dict:
    """The smallest cast per image that reaches the explainer's level; the result has the
    fields of ``Explainer.attempt`` plus its change ``mask`` (every pixel the transformation moved)."""
    s = explainer.settings
    with torch.no_grad():
        p_before = explainer.p_class(x, target)
        level = explainer.level(x)
        search = Progress(x, p_before, level, s.patience, goal=s.goal, pace=s.pace, budget=s.steps)
    basis = explainer.colours if explainer.colours is not None else torch.eye(3)
    basis = basis.to(x.device)
    params = identity(len(x), x.device).requires_grad_(True)  # whitened: the log gains are params @ basis
    best = identity(len(x), x.device)  # the log gains of each sample's best iterate
    optimizer = torch.optim.Adam([params], lr=s.cast_lr)
    for _ in range(s.steps):
        on = search.searching()
        raw = transformed(x[on], params[on] @ basis)
        x_cf = explainer.seen(raw)
        logits = explainer.gradient_logits(x_cf)
        loss = explainer.flip_loss(logits, target[on], raw - x[on]).sum()
        optimizer.zero_grad()
        loss.backward()
        p = explainer.judge(logits, x_cf.detach(), target[on])
        finished = search.record(on, x_cf.detach(), p)
        best[search.improved] = (params.detach() @ basis)[search.improved]
        if finished:
            break
        search.step(optimizer, params)
    reached = search.best_p >= level
    halvings = SHRINK_HALVINGS if s.cast_shrink else 0
    x_cf, p_after = shrink(explainer, x, target, best, level, reached, search.best, search.best_p, halvings)
    # the gradient model forward + backward, and the judgement
    per_step = 2 + (0 if explainer.judged_by_gradient_model() else 1)
    return {
        "x_cf": x_cf,
        "p_before": p_before,
        "p_after": p_after,
        "success": p_after >= s.goal,
        "steps": search.steps,
        "no_room": torch.zeros_like(search.done),
        # the start's judgement (and the mirror's level), every step, then the shrink's judgements
        "evaluations": 1 + int(s.mirror) + search.steps * per_step + halvings * reached.long(),
        "mask": ((x_cf - x).abs().sum(1, keepdim=True) > 0).float(),
    }


@torch.no_grad()
def shrink(explainer, x, target, gains, level, reached, x_cf, p_after, halvings: int):
    """Each cast that reached its level scaled back along its own direction (log gains times t in (0, 1], by
    bisection) to the least that still reaches it. A search step can carry a cast past the level, by up to a step's
    length, so the step can be long (few steps) without the cast being larger than it needs to be."""
    rows = reached.nonzero().squeeze(1)
    if not len(rows):
        return x_cf, p_after
    x_cf, p_after = x_cf.clone(), p_after.clone()
    low, high = torch.zeros(len(rows), device=x.device), torch.ones(len(rows), device=x.device)
    for _ in range(halvings):
        mid = (low + high) / 2
        candidate = transformed(x[rows], gains[rows] * mid[:, None]).clamp(-1, 1)
        p = explainer.p_class(candidate, target[rows])
        enough = p >= level[rows]
        high, low = torch.where(enough, mid, high), torch.where(enough, low, mid)
        x_cf[rows[enough]], p_after[rows[enough]] = candidate[enough], p[enough]
    return x_cf, p_after
