"""SCE-LITE-HQ: counterfactuals by optimising the latent of a pretrained autoencoder.

For a batch of images x (in [-1, 1]) and target classes, each attempt k = 1..K:
  1. z0 = E(x); z = z0 is optimised with Adam; the candidate is x_cf = x + m * free * (D(z) - D(z0)), so every
     pixel the optimisation leaves alone stays exact even with a lossy codec ("HQ" at any resolution);
  2. sparsity: m pastes the original back wherever the blurred change map is below a threshold relative to its
     strongest region (RePaint-style), an L1 term keeps the edit small and an optional roughness term smooth;
  3. smoothing: the gradient comes from a smooth surrogate of the classifier and/or is averaged over noisy latent
     copies (SmoothGrad); success is always judged on the original classifier;
  4. optional gradient filtering: the candidate passes a partial noise/denoise step of a diffusion UNet;
  5. per-sample early stop at the goal probability; the best iterate is kept; finished samples stop changing;
  6. diversification: attempt k may only change pixels (free = 1) that attempts 1..k-1 left untouched;
  7. optional located windows: attempt 1 also searches inside the windows whose occlusion moves the classifier
     most, and the valid candidate with the smallest L1 wins (a flip a small tag carries is not hidden behind a
     larger edit elsewhere);
  8. optional donor windows: attempt 1 also tries pasting one window of a real image the classifier assigns to the
     target class (a tag, stamp or patch transplanted from where the donor has it), and again the smallest valid
     edit wins: a flip carried by a small mark's shape, which no gradient at the original points to
     (pipeline/donors.py). With ``donor_finish`` a paste that went half the way without flipping is searched on
     inside its window first; with ``donor_attempt`` a paste that lost but went half the way is attempt 2.
Between 5 and 6 each attempt is confined (pipeline/confinement.py) to the smallest part of its edit that still flips.
With ``cast`` one more attempt follows: the channel gains of the whole image that flip it (pipeline/cast.py); with
``cast_competes`` that cast is one more candidate of attempt 1 instead, and the smallest valid edit wins.
Every knob of the search (``explain.search``) is documented on its dataclass, ``SearchConfig`` in pipeline/search_config.py.
"""

from __future__ import annotations

import functools
import time

import torch
from torch import nn
from torch.nn import functional as F

from pipeline import cast, confinement, donors, manifest
from pipeline.generator import pooled
from pipeline.progress import Progress, log_odds
from pipeline.regions import (
    change_mask,
    dilate,
    edge_weights,
    pixels,
    roughness,
)
from pipeline.search_config import SearchConfig as Settings

# the share of the way to the goal (target log-odds) a paste that did not flip must have gone to be searched on
# (donor_finish) or judged as attempt 2 (donor_attempt): half, as feedback.partial's default judges near-flips
HALF_WAY = 0.5


def copies_of(settings: Settings) -> int:
    """Latent copies per sample and step (SmoothGrad's noisy copies, or the latent alone)."""
    return max(1, settings.smoothgrad)


def searching(t: torch.Tensor | None, on: torch.Tensor, copies: int) -> torch.Tensor | None:
    """The rows ``on`` of a per-sample tensor, once per latent copy (None stays None)."""
    return None if t is None else t[on].repeat(copies, *([1] * (t.dim() - 1)))


def valid_l1(x: torch.Tensor, result: dict) -> torch.Tensor:
    """Per sample the mean absolute change of a result's edit, infinite where it did not flip: the smallest wins."""
    l1 = (result["x_cf"] - x).abs().flatten(1).mean(1)
    return torch.where(result["success"], l1, torch.full_like(l1, float("inf")))


def way(result: dict, goal: float) -> torch.Tensor:
    """Per sample the share of the way to the goal a result went in target log-odds, as the manifest records it
    (1 for a flip): the figure ``feedback.partial`` judges near-flips by."""
    share = manifest.progress(
        *(result[k].detach().float().cpu().numpy() for k in ("p_before", "p_after")), goal
    )
    share = torch.from_numpy(share).to(result["p_after"].device)
    return torch.where(result["success"], torch.ones_like(share), share)


def pick(take: torch.Tensor, first: dict, second: dict) -> dict:
    """Per sample ``second``'s result where ``take``, else ``first``'s; both searches are paid for."""
    merged = {}
    for key, value in first.items():
        if key in ("steps", "evaluations"):
            merged[key] = value + second[key]
        else:
            merged[key] = torch.where(take.view(-1, *([1] * (value.dim() - 1))), second[key], value)
    return merged


class Explainer(nn.Module):
    """Holds the codec, the original classifier and the gradient model (classifier or surrogate)."""

    def __init__(
        self,
        codec,
        classifier: nn.Module,
        settings: Settings,
        surrogate: nn.Module | None = None,
        denoiser=None,
        prototypes: dict[int, torch.Tensor] | None = None,
        prior: nn.Module | None = None,
        donors: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
        colours: torch.Tensor | None = None,
    ):
        super().__init__()
        self.codec, self.classifier, self.settings = codec, classifier.eval(), settings
        # target class -> (real images the classifier assigns to it, their pooled latent codes)
        self.donors = donors or {}
        # (3, 3) basis of the real images' colour variation the cast attempt moves in (pipeline/cast.py); None: the
        # three channels alike
        self.colours = colours
        if settings.donors > 0 and not self.donors:
            raise ValueError("explain.search.donors needs real images of each target class")
        self.prototypes = prototypes or {}  # target class -> pooled latent codes of real images of that class
        self.surrogate = surrogate.eval() if surrogate is not None else None
        # (unet, scheduler) or None; the UNet is a submodule so that moving the explainer to a GPU moves it too
        self.unet, self.scheduler = denoiser if denoiser is not None else (None, None)
        self.prior = prior if settings.needs_prior else None  # PatchPrior fitted on real images
        if self.prior is None and settings.needs_prior:
            raise ValueError("explain.search.patch_prior / project need a PatchPrior fitted on real images")
        for module in (self.classifier, self.surrogate):
            if module is not None:
                module.requires_grad_(False)
        # channels-last convolutions: measured 1.3-1.5x faster on the CPU here (64 and 256 px), and the layout
        # tensor cores prefer on GPUs
        for module in (self.codec, self.classifier, self.surrogate):
            if module is not None:
                module.to(memory_format=torch.channels_last)

    @property
    def _filters(self) -> bool:
        """Gradients pass through the UNet's denoising pass (search.filter_timestep)."""
        return self.unet is not None and self.settings.filter_timestep > 0

    def judged_by_gradient_model(self) -> bool:
        """The gradient's logits are the original classifier's on the noise-free candidate itself (no surrogate, no
        filtering, no noisy copies): judging the candidate needs no further classifier call."""
        return self.surrogate is None and not self.settings.smoothgrad and not self._filters

    def gradient_logits(self, x_cf: torch.Tensor) -> torch.Tensor:
        """Logits of the model the search follows: the surrogate or the classifier (after the UNet's pass)."""
        if self._filters:
            x_cf = self._filter(x_cf)
        return (self.surrogate or self.classifier)(x_cf)

    def _filter(self, x: torch.Tensor) -> torch.Tensor:
        """One partial noise/denoise pass: x_t = sqrt(a) x + sqrt(1 - a) eps; x0 = (x_t - sqrt(1 - a) eps_hat) / sqrt(a)."""
        t = torch.full((x.shape[0],), self.settings.filter_timestep, device=x.device, dtype=torch.long)
        a = self.scheduler.alphas_cumprod.to(x.device)[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x + (1 - a).sqrt() * torch.randn_like(x)
        return (x_t - (1 - a).sqrt() * self.unet(x_t, t).sample) / a.sqrt()

    def attempt(
        self, x: torch.Tensor, target: torch.Tensor, free: torch.Tensor, generator: torch.Generator
    ) -> dict:
        """One attempt for a batch: returns the best counterfactual per sample and its statistics."""
        s = self.settings
        with torch.no_grad():
            z0 = self.codec.encode(x)
            d0 = self.codec.decode(z0)
            p_before = self.p_class(x, target)
            level = self.level(x)
            proto = self._prototype(z0, target)
            nll0 = self.prior(x) if s.patch_prior > 0 else None
            assignment = self.prior.assign(x) if s.project else None
            edges = edge_weights(x) if s.tv > 0 and s.tv_edges else None
        z = z0.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([z], lr=s.lr)
        no_room = (
            free.flatten(1).mean(1) < 0.01
        )  # earlier attempts used (almost) everything: nothing to search
        search = Progress(
            x, p_before, level, s.patience, done=no_room, goal=s.goal, pace=s.pace, budget=s.steps
        )
        copies = copies_of(s)
        sigma = s.smoothgrad_sigma * z0.std()
        for _ in range(0 if search.done.all() else s.steps):
            # only the samples still searching are computed: a batch otherwise runs every sample for as many
            # steps as its slowest one needs (measured on the demo: 26 steps on average, 100 for the slowest)
            on = search.searching()
            repeat = functools.partial(searching, on=on, copies=copies)
            # 1. candidate(s): SmoothGrad evaluates noisy copies of the latent and averages their gradients
            zs = repeat(z)
            if s.smoothgrad:
                zs = zs + sigma * torch.randn(zs.shape, generator=generator, device=z.device)
            delta = self._realistic(self.codec.decode(zs) - repeat(d0), repeat(assignment))
            x_rep, free_rep = repeat(x), repeat(free)
            # 2. sparsity: the candidate keeps only the region of strong change; the gradient still reaches every
            #    free pixel (straight-through), or an all-zero first change could never grow
            edit = free_rep * delta
            if s.sparsity:
                keep = change_mask(edit.detach(), s.blur, s.paste_threshold)
                edit = keep * edit + (1 - keep) * (edit - edit.detach())
            x_cf = self.seen(x_rep + edit)
            # 3. loss: tempered cross-entropy to the target + L1 proximity of the unclamped edit
            logits = self.gradient_logits(x_cf)
            objective = self.flip_loss(logits, repeat(target), edit)
            # roughness within the free region, before paste-back: neither mask's edges are part of the edit
            if s.tv > 0:
                near = None if edges is None else tuple(repeat(e) for e in edges)
                objective = objective + s.tv * roughness(delta, free_rep, near)
            # realism: stay near real images of the target class (Van Looveren & Klaise 2021)
            if proto is not None:
                pull = pooled(self.codec.encode(x_cf)) - repeat(proto)
                objective = objective + s.prototype * pull.pow(2).mean(1)
            if nll0 is not None:  # realism: patches real images have (EPLL), relative to the original's
                objective = objective + s.patch_prior * (self.prior(x_cf) - repeat(nll0))
            loss = objective.sum() / copies
            optimizer.zero_grad()
            loss.backward()
            # 4. judge the noise-free candidate on the original classifier; keep the best iterate
            with torch.no_grad():
                if not s.smoothgrad:
                    current = x_cf
                else:
                    assigned = None if assignment is None else assignment[on]
                    current = self.candidate(x[on], z[on], d0[on], free[on], assigned)
                p = self.judge(logits, current, target[on])
            if search.record(on, current, p):
                break
            search.step(optimizer, z)
        return {
            "x_cf": search.best,
            "p_before": p_before,
            "p_after": search.best_p,
            "success": (search.best_p >= s.goal) & ~no_room,
            "steps": search.steps,
            "no_room": no_room,
            # encode, reference decode, the start's judgement (and the mirror's level), then every step
            "evaluations": 3 + int(s.mirror) + search.steps * self.evaluations_per_step(),
        }

    @torch.no_grad()
    def level(self, x: torch.Tensor) -> torch.Tensor:
        """Per sample, the target probability the search runs to: max(goal, aim), or with mirror the original's
        confidence in its own class when that is higher (capped at 1 - 1e-6, which float32 still resolves; a search
        that cannot get there keeps its best iterate once it stalls)."""
        s = self.settings
        level = torch.full((x.shape[0],), max(s.goal, s.aim), device=x.device)
        if s.mirror:
            own = torch.softmax(self.classifier(x), -1).amax(1).clamp_max(1 - 1e-6)
            level = torch.maximum(level, own)
        return level

    @torch.no_grad()
    def _prototype(self, z0: torch.Tensor, target: torch.Tensor, k: int = 5) -> torch.Tensor | None:
        """Per sample, the mean pooled code of the k real target-class images nearest to the original."""
        if self.settings.prototype <= 0 or not self.prototypes:
            return None
        own = pooled(z0)
        out = torch.empty_like(own)
        for t in target.unique().tolist():
            bank = self.prototypes[t].to(own)
            rows = target == t
            nearest = torch.cdist(own[rows], bank).topk(min(k, len(bank)), largest=False).indices
            out[rows] = bank[nearest].mean(1)
        return out

    def _realistic(self, delta: torch.Tensor, assignment: torch.Tensor | None) -> torch.Tensor:
        """The decoded change, projected patch by patch onto directions real images vary in (when enabled)."""
        if assignment is None:
            return delta
        return self.prior.project(delta, assignment)

    @torch.no_grad()
    def candidate(self, x, z, d0, free, assignment=None):
        delta = self._realistic(self.codec.decode(z) - d0, assignment)
        keep = (
            change_mask(delta * free, self.settings.blur, self.settings.paste_threshold)
            if self.settings.sparsity
            else torch.ones_like(free)
        )
        return (x + keep * free * delta).clamp(-1, 1)

    @staticmethod
    def seen(raw: torch.Tensor) -> torch.Tensor:
        """What the classifier sees of an unclamped candidate: pixels clamped to [-1, 1], yet the gradient passes
        the clamp (straight-through). With a hard clamp a pixel pushed past white gets no gradient, and on a bright
        background most of the change ended up there, invisible and stuck (a search stalled at p = 0.2)."""
        return raw - (raw - raw.clamp(-1, 1)).detach()

    def flip_loss(self, logits: torch.Tensor, target: torch.Tensor, change: torch.Tensor) -> torch.Tensor:
        """Per sample: tempered cross-entropy to the target plus the L1 size of the unclamped change (so change
        beyond the pixel range costs too)."""
        s = self.settings
        ce = F.cross_entropy(logits / s.temperature, target, reduction="none")
        return ce + s.l1 * change.abs().flatten(1).mean(1)

    @torch.no_grad()
    def judge(self, logits, candidate, target) -> torch.Tensor:
        """A step's candidates' target probability on the original classifier: the step's own logits when they
        are that classifier's on the candidate itself (``judged_by_gradient_model``), else one more classifier pass."""
        if self.judged_by_gradient_model():
            return torch.softmax(logits.detach(), -1).gather(1, target[:, None]).squeeze(1)
        return self.p_class(candidate, target)

    @torch.no_grad()
    def p_class(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The classifier's probability of class target[i] for image i."""
        return torch.softmax(self.classifier(x), -1).gather(1, target[:, None]).squeeze(1)

    @torch.no_grad()
    def locate(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(B, windows, 1, H, W) masks of the windows whose occlusion (filled with the image's median colour) moves
        the classifier's target-against-rest log-odds most, either way: where the decision lives; and the
        classifier calls per image that took."""
        s, (b, _, h, w) = self.settings, x.shape
        side = max(2, pixels(s.window, x))
        stride = max(1, side // 2)
        tops = sorted({*range(0, max(1, h - side + 1), stride), max(0, h - side)})
        lefts = sorted({*range(0, max(1, w - side + 1), stride), max(0, w - side)})
        boxes = [(top, left) for top in tops for left in lefts]
        fill = x.flatten(2).median(2).values[..., None, None]
        base = log_odds(self.p_class(x, target))
        moves = []
        for top, left in boxes:
            occluded = x.clone()
            occluded[..., top : top + side, left : left + side] = fill.expand(
                -1, -1, min(side, h - top), min(side, w - left)
            )
            moves.append((log_odds(self.p_class(occluded, target)) - base).abs())
        best = torch.stack(moves, 1).topk(min(s.windows, len(boxes)), dim=1).indices  # (B, k)
        masks = torch.zeros(b, best.shape[1], 1, h, w, device=x.device)
        for i, row in enumerate(best.tolist()):
            for j, k in enumerate(row):
                top, left = boxes[k]
                masks[i, j, :, top : top + side, left : left + side] = 1
        return masks, 1 + len(boxes)

    @torch.no_grad()
    def pooled_code(self, x: torch.Tensor) -> torch.Tensor:
        """The images' pooled latent codes (as the prototypes and donors are indexed)."""
        return pooled(self.codec.encode(x))

    def smaller(self, x: torch.Tensor, found: dict, other: dict) -> dict:
        """Per sample the valid result with the smaller L1 of the two (``found`` where neither is valid); both
        searches are paid for."""

        return pick(valid_l1(x, other) < valid_l1(x, found), found, other)

    def first_attempt(self, x, target, free, generator) -> tuple[list[dict], dict | None]:
        """Attempt 1, with ``donors`` against the smallest valid donor window (pipeline/donors.py) and with
        ``cast_competes`` against the smallest valid colour cast (pipeline/cast.py). Also, with ``donor_attempt``,
        the paste where it lost (None otherwise): attempt 2's rival."""
        found, runner_up = self.searched_first(x, target, free, generator), None
        if self.settings.donors > 0:
            pasted = donors.search(self, x, target)
            if self.settings.donor_finish:
                pasted = self.finished(x, target, pasted, generator)
            if self.settings.donor_attempt:
                runner_up = {k: v.clone() for k, v in pasted.items()}
            pasted = self._confined(x, target, pasted, rows=pasted["success"])  # only a flip wins
            won = valid_l1(x, pasted) < valid_l1(x, found[0])
            found[0] = pick(won, found[0], pasted)
            if runner_up is not None:
                runner_up["lost"] = ~won
        if self.settings.cast_competes:
            colour = cast.search(self, x, target)
            found[0] = self.smaller(x, found[0], colour | {"used": torch.ones_like(colour["mask"])})
        return found, runner_up

    def finished(self, x, target, pasted: dict, generator) -> dict:
        """The donor pastes that went at least half the way to the goal but did not flip, each searched on from the
        pasted image inside its window grown by ``dilate``; per sample the finished paste where it flips."""
        short = ~pasted["success"] & (way(pasted, self.settings.goal) >= HALF_WAY)
        if not short.any():
            return pasted
        window = ((pasted["x_cf"] - x).abs().sum(1, keepdim=True) > 0).to(x.dtype)
        free = dilate(window, self.settings.dilate) * short.view(-1, 1, 1, 1).to(x.dtype)
        on = self.attempt(pasted["x_cf"], target, free, generator)  # rows not short have no room: no steps
        paid = pasted["evaluations"] + torch.where(short, on["evaluations"], 0)
        taken = pick(short & on["success"], pasted, on | {"p_before": pasted["p_before"]})
        return taken | {"evaluations": paid, "steps": on["steps"]}

    def second_attempt(self, x, target, free, generator, runner_up: dict) -> dict:
        """Attempt 2, or per sample the donor paste that lost attempt 1 where it went at least half the way to the
        goal (a judged near-flip): a real mark that carries most of a shortcut (a ruler, a tag), but not enough to
        win attempt 1 against an edit of the whole image, is shown and judged on its own. The search runs only
        where the paste is not taken (its result would be dropped)."""
        lost = runner_up.pop("lost")
        runner_up["evaluations"] = torch.zeros_like(runner_up["evaluations"])  # paid for in attempt 1
        # a near-flip is confined to what moved the decision; where the paste won attempt 1 it is not attempt 2
        paste = self._confined(x, target, runner_up, rows=lost)
        take = lost & (way(paste, self.settings.goal) >= HALF_WAY)
        free = free * (~take).view(-1, 1, 1, 1).to(free.dtype)  # no room: those rows take no step
        searched = self._confined(x, target, self.attempt(x, target, free, generator))
        return pick(take, searched, paste)

    def searched_first(self, x, target, free, generator) -> list[dict]:
        """Attempt 1's search over the whole image and, with ``windows``, inside each located window; per sample
        the valid candidate with the smallest L1 after confinement (the whole-image search where none is valid).
        With ``located_attempt`` the whole-image edit is attempt 1 and the best window's edit attempt 2."""
        s, b = self.settings, x.shape[0]
        if s.windows <= 0:
            return [self._confined(x, target, self.attempt(x, target, free, generator))]
        windows, occlusions = self.locate(x, target)
        frees = torch.cat([free, *(windows[:, j] * free for j in range(windows.shape[1]))])
        n = frees.shape[0] // b
        xs, targets = x.repeat(n, 1, 1, 1), target.repeat(n)
        result = self._confined(xs, targets, self.attempt(xs, targets, frees, generator))
        l1 = valid_l1(xs, result).view(n, b)
        steps, evaluations = result["steps"].view(n, b), result["evaluations"].view(n, b)
        # every candidate's search is paid for, and the occlusion passes that placed the windows
        if s.located_attempt:  # the whole image's own result, then the smallest valid window edit
            best = l1[1:].argmin(0) + 1
            located = {k: v[best * b + torch.arange(b, device=x.device)] for k, v in result.items()}
            whole = {k: v[:b] for k, v in result.items()}
            return [
                whole,
                located | {"steps": steps[1:].sum(0), "evaluations": evaluations[1:].sum(0) + occlusions},
            ]
        paid = {"steps": steps.sum(0), "evaluations": evaluations.sum(0) + occlusions}
        chosen = torch.where(torch.isinf(l1.min(0).values), 0, l1.argmin(0)) * b + torch.arange(
            b, device=x.device
        )
        picked = {k: v[chosen] for k, v in result.items()}
        return [picked | paid]

    def needed(self, result: dict, keep: float = 0.9) -> torch.Tensor:
        """Per sample, the target probability a confined edit must keep: the goal for a flip; for an attempt that
        fell short but moved the classifier, ``keep`` of its gain in target log-odds, so a near-flip is shown (and
        judged) as the region that moved the decision; NaN (not confined) for one that did not move it."""
        start, end = log_odds(result["p_before"]), log_odds(result["p_after"])
        near = torch.sigmoid(start + keep * (end - start)).to(result["p_after"].dtype)
        nan = torch.full_like(near, float("nan"))
        need = torch.where(end > start, near, nan)
        return torch.where(result["success"], torch.full_like(near, self.settings.goal), need)

    def _confined(self, x, target, result: dict, rows: torch.Tensor | None = None) -> dict:
        """An attempt's result confined (sparsity) with its change mask and the region later attempts avoid; with
        ``rows`` (a per-sample mask) only those rows are confined: a candidate kept only if it flips, or only where
        it lost attempt 1, costs no confinement elsewhere."""
        if self.settings.sparsity:
            confine = (
                confinement.by_regions if self.settings.confine == "regions" else confinement.by_threshold
            )
            need = self.needed(result)
            if rows is not None:
                need = torch.where(rows, need, torch.full_like(need, float("nan")))
            confined = confine(self.p_class, self.settings, x, result["x_cf"], target, need)
            result["evaluations"] = result.get("evaluations", 0) + confined.pop("evaluations")
            result.update(confined)
        else:
            result["mask"] = ((result["x_cf"] - x).abs().sum(1, keepdim=True) > 0).float()
            result["used"] = dilate(result["mask"], self.settings.dilate)
        return result

    def forward(self, x: torch.Tensor, target: torch.Tensor, seed: int = 0) -> list[dict]:
        """All attempts for a batch; each result also carries its change mask and wall seconds."""
        generator = torch.Generator(device=x.device).manual_seed(seed)
        x = x.contiguous(memory_format=torch.channels_last)
        free = torch.ones_like(x[:, :1])
        results, runner_up = [], None
        while len(results) < self.settings.attempts:
            started = time.perf_counter()
            if len(results) == 1 and runner_up is not None:
                found = [self.second_attempt(x, target, free, generator, runner_up)]
            elif results:
                found = [self._confined(x, target, self.attempt(x, target, free, generator))]
            else:
                found, runner_up = self.first_attempt(x, target, free, generator)
            seconds = (time.perf_counter() - started) / len(found)
            for result in found[: self.settings.attempts - len(results)]:
                used = result.pop("used")
                results.append(result | {"seconds": seconds})
                if self.settings.diversify:
                    free = free * (1 - used)
        if self.settings.cast:
            started = time.perf_counter()
            results.append(cast.search(self, x, target))
            results[-1]["seconds"] = time.perf_counter() - started
        return results

    def evaluations_per_step(self) -> int:
        """Network evaluations (forward or backward passes) per gradient step per sample: a hardware-free cost."""
        copies = copies_of(self.settings)
        decoder, model = 2 * copies, 2 * copies  # forward + backward each
        unet = 2 * copies if self._filters else 0
        encoder = 2 * copies if self.settings.prototype > 0 and self.prototypes else 0
        # the judgement of the candidate on the original classifier (+ its noise-free decode with SmoothGrad)
        check = 0 if self.judged_by_gradient_model() else 1 + (1 if self.settings.smoothgrad else 0)
        return decoder + model + unet + encoder + check


class PixelCodec(nn.Module):
    """The identity 'codec': the same search directly in pixel space (the baseline without a generator)."""

    kind = "pixels"

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z
