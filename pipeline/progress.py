"""Per-sample bookkeeping of a batch search (the latent search and the colour-cast search share it): the best
iterate so far, steps taken, steps without progress, and which samples are done."""

from __future__ import annotations

import math

import torch


def log_odds(p: torch.Tensor) -> torch.Tensor:
    p = p.double().clamp(1e-30, 1 - 1e-15)
    return torch.log(p) - torch.log1p(-p)


def makes_progress(p: torch.Tensor, best: torch.Tensor, nats: float = -math.log(0.98)) -> torch.Tensor:
    """Whether the target's log-odds rose by ``nats`` over the best so far. Near p = 1 that is closing 2 % of the
    gap 1 - p (a mirrored search on its way from 0.999 to 0.9999 still moves); near p = 0 it sees a search whose
    margin climbs while p still reads 0.00: a smooth edit (``tv``) of a whole background needs many steps before p
    moves, and 2 of 32 were given up at p = 0.004 and 0.11 that flip at step 85 and 99."""
    return log_odds(p) - log_odds(best) >= nats


class Progress:
    """The best candidate per sample, and when each sample's search ends: at ``level`` (its target probability),
    or after ``patience`` steps without progress (0 = never). With ``pace`` (a share, 0 = off) a sample is also
    given up once, at its pace over the last ``patience`` steps, it would not cover that share of the way from its
    start to ``goal`` (in target log-odds) within the step ``budget``: a search creeping towards an edit that would
    be neither a flip nor a near-flip stops spending network evaluations on it."""

    def __init__(
        self,
        x: torch.Tensor,
        p_before: torch.Tensor,
        level: torch.Tensor,
        patience: int,
        done=None,
        goal: float = 0.5,
        pace: float = 0.0,
        budget: int = 0,
    ):
        self.best, self.best_p, self.level, self.patience = x.clone(), p_before.clone(), level, patience
        self.done = torch.zeros_like(p_before, dtype=torch.bool) if done is None else done.clone()
        self.steps = torch.zeros(len(x), dtype=torch.long, device=x.device)
        self.stalled = torch.zeros_like(self.steps)  # steps since the target log-odds last rose 0.02
        start = log_odds(p_before)
        self.mark = start + pace * (float(log_odds(torch.tensor(goal))) - start)  # what pace must reach
        self.pace, self.budget = pace, budget
        self.improved = torch.zeros_like(self.done)  # set by each ``record``
        # the best target log-odds after each step, every sample still searching
        self.trail: list[torch.Tensor] = []

    def searching(self) -> torch.Tensor:
        """Indices of the samples still searching: only they are computed in the next step."""
        return (~self.done).nonzero().squeeze(1)

    @torch.no_grad()
    def record(self, on: torch.Tensor, current: torch.Tensor, p: torch.Tensor) -> bool:
        """One step's candidates ``current`` (rows ``on``) with their target probabilities; True once all are done."""
        better = p > self.best_p[on]
        progress = makes_progress(p, self.best_p[on])
        self.stalled[on] = torch.where(progress, torch.zeros_like(self.stalled[on]), self.stalled[on] + 1)
        self.best[on[better]], self.best_p[on[better]] = current[better], p[better]
        self.improved = torch.zeros_like(self.done)  # the samples whose best is this step's candidate
        self.improved[on[better]] = True
        self.steps[on] += 1
        self.done |= self.best_p >= self.level
        if self.patience:  # a search that stopped improving will not flip: spare its budget
            self.done |= self.stalled >= self.patience
            if self.pace > 0:
                self.done |= self.out_of_pace()
        return bool(self.done.all())

    def out_of_pace(self) -> torch.Tensor:
        """Samples short of their mark whose pace over the last ``patience`` steps would not reach it in the steps
        left. Every sample still searching has taken the same steps (a finished one never resumes), so one trail
        of the best log-odds serves them all."""
        now = log_odds(self.best_p)
        self.trail.append(now)
        if len(self.trail) <= self.patience:
            return torch.zeros_like(self.done)
        pace = (now - self.trail[-1 - self.patience]) / self.patience
        left = (self.budget - self.steps).clamp_min(0)
        return (now < self.mark) & (now + pace * left < self.mark)

    def step(self, optimizer: torch.optim.Optimizer, params: torch.Tensor) -> None:
        """An optimiser step that leaves finished samples as they are (Adam's momentum would move them)."""
        frozen = params.detach().clone()
        optimizer.step()
        with torch.no_grad():
            params[self.done] = frozen[self.done]
