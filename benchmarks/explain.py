"""Benchmark of the explain stage on the embedded default: SCE-LITE-HQ against each ablation and a pixel-space
baseline, on the same images in one run; plus seconds per counterfactual at 64, 128 and 256 px.

Writes benchmarks/results/explain.json and explain.png.

    .venv/bin/python benchmarks/explain.py [--per-pair 16] [--run-dir runs/bench-explain]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from pipeline import config, explain, generator, models, quiet, runner  # noqa: E402
from pipeline.counterfactual import Explainer, PixelCodec  # noqa: E402
from pipeline.data import load_folder  # noqa: E402
from pipeline.patchprior import PatchPrior  # noqa: E402

HERE = Path(__file__).resolve().parent
# SCE (pixel space, per-dataset DDPM): 15 differentiated denoising steps per gradient step, 50-100 steps, 2 attempts.
# Per attempt and gradient step: 15 UNet forward + 15 backward, classifier forward + backward.
SCE_EVALUATIONS_PER_ATTEMPT = {"steps_50": 50 * (2 * 15 + 2), "steps_100": 100 * (2 * 15 + 2)}


def variants(base: config.ExplainConfig) -> dict[str, config.ExplainConfig]:
    s = base.search
    return {
        "sce-lite-hq": base,
        # both smoothing switches measured whatever the default (the embedded default has none since v3)
        "surrogate": dataclasses.replace(base, surrogate=True, search=dataclasses.replace(s, smoothgrad=0)),
        "no-smoothing": dataclasses.replace(
            base, surrogate=False, search=dataclasses.replace(s, smoothgrad=0)
        ),
        "smoothgrad-only": dataclasses.replace(
            base, surrogate=False, search=dataclasses.replace(s, smoothgrad=2)
        ),
        "no-prototype": dataclasses.replace(base, search=dataclasses.replace(s, prototype=0.0)),
        "no-projection": dataclasses.replace(base, search=dataclasses.replace(s, project=False)),
        # realism against validity: the EPLL patch prior at three weights (0 = the default)
        **{
            f"patch-prior-{w:g}": dataclasses.replace(base, search=dataclasses.replace(s, patch_prior=w))
            for w in (1.0, 3.0, 30.0)
        },
        # confinement by graph segments of the original, the search aiming past the goal for slack
        "regions": dataclasses.replace(
            base, search=dataclasses.replace(s, confine="regions", aim=max(s.aim, 0.99))
        ),
        "no-diversification": dataclasses.replace(base, search=dataclasses.replace(s, diversify=False)),
        "no-sparsity": dataclasses.replace(base, search=dataclasses.replace(s, sparsity=False)),
        # same loss and search, no generative model at all: no codec (see run_variant) and no patch prior, whose
        # Gaussian mixture is a generative model of the task's patches
        "pixel-baseline": dataclasses.replace(base, search=dataclasses.replace(s, project=False)),
        # the patch projection in pixel space: which share of the realism is the codec's, which the projection's
        "pixel-projected": base,
        "reference-classifier": base,  # the method on the unbiased reference: its strategy should be the square
    }


def run_variant(name, checkpoint, data, c, gen, out) -> dict:
    if name.startswith("pixel-"):  # swap the codec for the identity: the search happens on pixels
        original = generator.load
        generator.load = lambda *a, **k: PixelCodec()
        try:
            return explain.run(checkpoint, data, c, gen, out)
        finally:
            generator.load = original
    return explain.run(checkpoint, data, c, gen, out)


def scaling(
    checkpoint: Path,
    codec_source: str,
    sizes=(64, 128, 256),
    steps: int = 8,
    repeats: int = 2,
) -> dict:
    """Seconds per counterfactual (fixed number of steps, goal out of reach) as the image grows, in the batches the
    explain stage uses (explain.batch_size, capped on the CPU to a fixed number of pixels)."""
    model, _ = models.load(checkpoint)  # small_cnn pools globally, so it takes any size
    codec = generator.load(codec_source)
    explain_config = config.load(None).explain
    settings = dataclasses.replace(explain_config.search, attempts=1, steps=steps, goal=0.999999)
    out, batches = {}, {}
    for size in sizes:
        batch = batches[f"{size}px"] = explain.batch_size(explain_config, size)
        x = torch.rand(batch, 3, size, size) * 2 - 1
        target = torch.zeros(batch, dtype=torch.long)
        # the default projects edits, which needs a prior fitted on the images at this size
        prior = PatchPrior.fit(x, samples=5000) if settings.needs_prior else None
        explainer = Explainer(codec, model, settings, prior=prior)
        explainer(x[:2], target[:2])  # warm-up
        timings = []
        for _ in range(repeats):  # the fastest of a few runs: other processes only ever add time
            started = time.perf_counter()
            explainer(x, target)
            timings.append(time.perf_counter() - started)
        out[f"{size}px"] = min(timings) / batch
    base = out[f"{sizes[0]}px"]
    out["batch"] = batches
    out["ratio_to_pixel_ratio"] = {f"{s}px": (out[f"{s}px"] / base) / (s * s / sizes[0] ** 2) for s in sizes}
    # the least-squares slope of log seconds over log pixels: 1 = linear, below 1 = better than linear
    pixels, seconds = np.log([s * s for s in sizes]), np.log([out[f"{s}px"] for s in sizes])
    out["exponent"] = float(np.polyfit(pixels, seconds, 1)[0])
    return out


def plot(results: dict, path: Path) -> None:
    names = list(results)
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.2))
    for ax, (key, label) in zip(
        axes,
        [
            ("validity", "validity"),
            ("realism", "realism ratio (lower = more real)"),
            ("l1", "L1 per pixel"),
            ("evaluations_per_counterfactual", "network evaluations / CF"),
        ],
    ):
        ax.barh(names, [results[n][key] or 0 for n in names])
        ax.set_title(label, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-pair", type=int, default=16)
    parser.add_argument("--run-dir", default="runs/bench-explain")
    parser.add_argument("--only", nargs="*", help="variants to run (default: all; none: the scaling only)")
    parser.add_argument("--tag", default="", help="suffix for the result files and folders (a partial rerun)")
    args = parser.parse_args()
    quiet.configure(False)
    base = config.load(None)
    # the classifier under test: the default run's biased classifier (stages reused when already finished)
    runner.run(
        dataclasses.replace(base, explain=dataclasses.replace(base.explain, enabled=False)),
        Path(args.run_dir),
    )
    checkpoint, data = Path(args.run_dir) / "classifier", load_folder(Path(args.run_dir) / "data")
    c = dataclasses.replace(base.explain, per_pair=args.per_pair)
    results = {}
    for name, variant in variants(c).items():
        if args.only is not None and name not in args.only:  # --only alone: the scaling only
            continue
        started = time.perf_counter()
        model = Path(args.run_dir) / "reference" if name == "reference-classifier" else checkpoint
        out = Path(args.run_dir) / "bench" / (f"{name}-{args.tag}" if args.tag else name)
        summary = run_variant(name, model, data, variant, base.generator, out)
        summary["bench_seconds"] = round(time.perf_counter() - started, 1)
        results[name] = summary
        keys = (
            "validity_by_attempt",
            "realism",
            "l1",
            "steps",
            "evaluations_per_counterfactual",
            "where_changed",
        )
        print(name, json.dumps({k: summary.get(k) for k in keys}), file=sys.stderr, flush=True)
    ours = results.get("sce-lite-hq", {}).get("evaluations_per_counterfactual")
    report = {
        "benchmark": "explain: SCE-LITE-HQ vs ablations vs pixel baseline on the embedded default's biased classifier",
        "per_pair": args.per_pair,
        "codec": json.loads((generator.resolve(base.generator.source) / "cfkd_card.json").read_text()),
        "variants": results,
        "sce_evaluations_per_counterfactual": SCE_EVALUATIONS_PER_ATTEMPT,
        "evaluation_ratio_vs_sce_50_steps": SCE_EVALUATIONS_PER_ATTEMPT["steps_50"] / ours if ours else None,
        "seconds_per_counterfactual_by_size": scaling(checkpoint, base.generator.source),
        "threads": torch.get_num_threads(),
    }
    stem = f"explain-{args.tag}" if args.tag else "explain"
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / f"{stem}.json").write_text(json.dumps(report, indent=2, default=float))
    if results:  # --only alone measures the scaling, nothing to plot
        plot(results, HERE / "results" / f"{stem}.png")
    print(json.dumps({k: v for k, v in report.items() if k not in ("variants", "codec")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
