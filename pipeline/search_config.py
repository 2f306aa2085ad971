"""The counterfactual search's settings (``explain.search``): every knob of pipeline/counterfactual.py, with its
primitive defaults for ablations, and the search the library recommends."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SearchConfig:
    """The counterfactual search (pipeline/counterfactual.py): its primitive defaults, for ablations; the
    recommended search is RECOMMENDED_SEARCH below."""

    attempts: int = 2  # K: structurally different counterfactuals per image
    goal: float = 0.9  # tau: target-class probability (original classifier) that counts as a flip
    aim: float = 0.0  # the search runs on to this probability (if above goal); confinement then keeps what reaches goal
    # ... and on to the original's own confidence in its class: as sure a flip, i.e. the same logit margin on the
    # other side, so the edit goes as far past the boundary as the original lay before it
    mirror: bool = False
    steps: int = 100  # most gradient steps per attempt (early stop makes most attempts far shorter)
    patience: int = (
        25  # give a sample up after this many steps without its target log-odds rising 0.02 (0 = never)
    )
    # with patience: also give a sample up once, at its pace over the last ``patience`` steps, it would not cover
    # this share of the way to the goal (target log-odds) within ``steps``; at or below ``feedback.partial`` nothing
    # it gives up would have been judged (0 = off; 1 = give up what will not flip)
    pace: float = 0.0
    lr: float = 0.1  # Adam on the latent
    temperature: float = 3.0  # softmax temperature of the loss (the SCE authors use 3)
    l1: float = 0.5  # weight of L1(x_cf, x)
    # weight of the change's roughness (total variation per unit of mean absolute change): a real edit is smooth where
    # the image is; the cheapest flip otherwise leaves a halo of old background around the object, which a classifier
    # fine-tuned on the edit can read as the class. Scale-free: it shapes the edit without making it smaller
    tv: float = 0.0
    # roughness is not counted across the original's own edges, so an edit may end where an object or a tag does
    # (a recoloured tag is smooth); without it only an even change of the whole free region is smooth
    tv_edges: bool = False
    prototype: float = (
        1.0  # weight of the pull toward real target-class images in the codec's latent (0 = off)
    )
    patch_prior: float = (
        0.0  # weight of the patch prior's NLL change (realism on the task's own patches; 0 = off)
    )
    project: bool = (
        False  # edit each patch only along its patch-prior component's directions of real variation
    )
    smoothgrad: int = 0  # SmoothGrad copies of the latent per step (0 = off)
    smoothgrad_sigma: float = 0.2  # their noise std, relative to the latent's std
    sparsity: bool = True  # paste the original back where the blurred change is small
    paste_threshold: float = 0.15  # ... below this share of the strongest blurred change
    blur: float = 0.08  # Gaussian blur kernel of change maps, a share of the image side (5 px at 64 px)
    confine: str = "threshold"  # after an attempt: "threshold" or "regions" (module docstring)
    max_regions: int = 5  # "regions": at most this many segments, so at most 2^n - 1 subsets tried
    diversify: bool = True  # attempt k only changes what attempts < k left untouched
    # attempt 1 also searches inside each of the ``windows`` image windows whose occlusion moves the classifier most
    # (side ``window`` x the image side); the valid edit with the smallest L1 wins, so a flip a small tag or stamp
    # carries is not hidden behind a larger edit elsewhere (0 = off; each window costs one more search)
    windows: int = 0
    window: float = 0.25
    # with windows: the best located edit is its own attempt (2), beside the whole-image edit, instead of competing
    # with it on L1, so an image yields both its global and its local explanation
    located_attempt: bool = False
    # attempt 1 also tries pasting a window (side ``window`` or twice that) from each of the ``donors`` real images
    # of the target class nearest the original; the window is the one whose paste a first-order estimate rates best,
    # and the valid edit with the smallest L1 (after confinement) wins (0 = off; 3 + 2 evaluations per donor)
    donors: int = 0
    # with donors: attempt 2 is, per image, the donor paste that lost attempt 1 where it went farther toward the goal
    # than attempt 2's own search (a near-flip judged like any other): a mark carrying most of a shortcut (a ruler,
    # a tag) that a larger edit of the whole image beat in attempt 1 still gets a verdict
    donor_attempt: bool = False
    # with donors: a paste that went at least half the way to the goal without flipping is finished by a search from
    # the pasted image, inside the pasted window grown by ``dilate``, and then competes like any paste: a real mark the
    # classifier reads short of the goal (a ruler beside the evidence) is not beaten by a repaint of the whole image
    donor_finish: bool = False
    # with donors, where the training data has feature masks: a paste leaves the donor's own evidence (its feature
    # mask) out, so it moves what lies around the evidence (a tag, a ruler, a background) and never carries the
    # donor's object into the image, where a teacher would call a second object a shortcut
    leave_evidence: bool = False
    # grow the used region by this share of the image side before blocking it (3 px at 64 px; "threshold" only), and
    # the pasted window donor_finish searches in
    dilate: float = 0.05
    filter_timestep: int = 0  # gradient filtering through the UNet at this timestep (0 = off)
    # one more attempt after the others: channel gains of the whole image (pipeline/cast.py), the edit that shows a
    # colour-cast shortcut (a scanner's, a stain's, a white balance's), which no local edit shows; where a gain
    # is class evidence, distil.cast_vote keeps the casts' verdicts out of training
    cast: bool = True
    # the same cast competes with attempt 1's edits too (with cast: false, instead of its own attempt): the smallest
    # valid edit wins, local or global, so a cast is shown only where it is a smaller change than any local edit
    # that flips (its image then has no room for attempt 2: a cast moves every pixel)
    cast_competes: bool = False
    cast_lr: float = 0.01  # Adam on the three log gains (0 = no change)
    # a cast that reached its level is scaled back to the least that still does (six classifier passes), so a long
    # step saves evaluations without making the cast larger; the least cast also teaches a colour-cast shortcut
    # less well than the one the search found
    cast_shrink: bool = False

    @property
    def casts(self) -> bool:
        """The search tries a colour cast of the whole image, as an attempt of its own or within attempt 1."""
        return self.cast or self.cast_competes

    @property
    def cast_attempt(self) -> int | None:
        """The attempt number the cast's edits get in the manifest (after the others), None without ``cast``."""
        return self.attempts + 1 if self.cast else None

    @property
    def needs_prior(self) -> bool:
        """The search uses a PatchPrior: as a realism term, as a projection of every edit, or both."""
        return self.patch_prior > 0 or self.project


# The recommended search: edits along the directions the task's own patches vary in (project), kept to the whole
# image segments that flip (confine: regions), as sure as the original (mirror), smooth where the image is (tv), no
# pull toward other images (prototype: 0), a stalled sample given up after 12 steps (patience: no evaluations
# spent on a search that no longer moves; pace: nor on one too slow to become even a judged near-flip), and a window
# pasted from one of 4 real target-class images competing with the search's edit (donors: a mark's shape, which no
# gradient points to), the paste that lost but moved the classifier farther judged as attempt 2 (donor_attempt: a
# mark read short of the goal still gets a verdict), and no paste carrying the donor's own evidence
# (leave_evidence). The search's own dataclass keeps its primitive defaults for ablations.
RECOMMENDED_SEARCH = SearchConfig(
    tv=10.0,
    prototype=0.0,
    project=True,
    confine="regions",
    mirror=True,
    patience=12,
    pace=0.5,
    donors=4,
    donor_attempt=True,
    leave_evidence=True,
)
