"""report.html: one self-contained page (images embedded as base64 PNG) telling the story of a run.

Each section is a function (run directory, data) -> HTML or None; later stages append their own."""

from __future__ import annotations

import base64
import datetime
import html
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline import change_maps, feedback, manifest  # noqa: E402
from pipeline.data import FolderData  # noqa: E402
from pipeline.evaluate import group_names  # noqa: E402
from pipeline.rounds import judged, same_classifier  # noqa: E402
from pipeline.rundir import read_json  # noqa: E402
from pipeline.store import LABELS  # noqa: E402

CLASSIFIERS = {
    "classifier": "classifier (trained on the given data)",
    "reference": "reference (unbiased data)",
}
STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f3f3f3}img{max-width:100%}h2{border-bottom:1px solid #ddd;padding-bottom:4px}
.note{color:#666;font-size:90%}"""


def png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return img_tag(buffer.getvalue())


def img_tag(data: bytes, alt: str = "") -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def summary_section(root: Path, data: FolderData) -> str | None:
    path = root / "metrics.json"
    if not path.exists():
        return None
    metrics = read_json(path)
    rows = []
    for name, m in metrics.items():
        if name not in CLASSIFIERS:
            continue
        training = m.get("training", {})
        rows.append(
            {
                "classifier": CLASSIFIERS[name],
                "test accuracy": m["accuracy"],
                "worst-group accuracy": m["worst_group_accuracy"],
                "worst group": m["worst_group"],
                **{f"class {c}": v for c, v in m["per_class"].items()},
                "train accuracy": training.get("train_acc"),
                "val accuracy": training.get("val_acc"),
            }
        )
    groups = pd.DataFrame(
        {
            CLASSIFIERS[n]: {g: v["accuracy"] for g, v in m["per_group"].items()}
            for n, m in metrics.items()
            if n in CLASSIFIERS
        }
    )
    return (
        "<h2>Accuracy</h2><p class=note>Test split; a group is a label x group-attribute cell. A classifier that takes a "
        "shortcut scores well where the shortcut agrees with the label and fails in the group where it does not.</p>"
        + pd.DataFrame(rows).to_html(index=False, float_format="%.3f", na_rep="")
        + "<h3>Per group</h3>"
        + groups.to_html(float_format="%.3f")
    )


def samples_section(root: Path, data: FolderData, per_cell: int = 6) -> str:
    table = data.table.assign(cell=group_names(data.table))
    cells = sorted(table["cell"].unique())
    fig, axes = plt.subplots(len(cells), per_cell, figsize=(per_cell * 1.1, len(cells) * 1.2), squeeze=False)
    for row, cell in zip(axes, cells):
        members = table[table["cell"] == cell].head(per_cell)
        for ax, rel in zip(row, list(members["path"]) + [None] * per_cell):
            ax.axis("off")
            if rel is not None:
                ax.imshow(Image.open(data.root / rel).convert("RGB"))
        row[0].set_title(cell, fontsize=8, loc="left")
    return "<h2>Data</h2><p class=note>Samples per class x group.</p>" + png(fig)


def curves_section(root: Path, data: FolderData) -> str | None:
    logs = {
        n: root / n / "logs" / "metrics.csv"
        for n in CLASSIFIERS
        if (root / n / "logs" / "metrics.csv").exists()
    }
    if not logs:
        return None
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 3.2))
    for name, path in logs.items():
        epochs = pd.read_csv(path).groupby("epoch").mean(numeric_only=True)
        for metric, ax in (("loss", loss_ax), ("acc", acc_ax)):
            for split, style in (("train", "-"), ("val", "--")):
                column = f"{split}_{metric}"
                if column in epochs:
                    ax.plot(epochs.index, epochs[column], style, label=f"{name} {split}")
    for ax, title in ((loss_ax, "loss"), (acc_ax, "accuracy")):
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.legend(fontsize=7)
    return "<h2>Training</h2>" + png(fig)


def evaluation_section(root: Path, data: FolderData) -> str | None:
    plots = [(n, root / "evaluate" / n / "evaluation.png") for n in CLASSIFIERS]
    plots = [(n, p) for n, p in plots if p.exists()]
    if not plots:
        return None
    return "<h2>Confusion matrices</h2>" + "".join(
        f"<h3>{CLASSIFIERS[n]}</h3>{img_tag(p.read_bytes(), n)}" for n, p in plots
    )


def explain_section(root: Path, data: FolderData) -> str | None:
    folder = root / "explain"
    if not (folder / "desiderata.json").exists():
        return None
    d = read_json(folder / "desiderata.json")
    rows = {
        "counterfactuals (image x target x attempt)": d["counterfactuals"],
        "validity (flip rate), all attempts": d["validity"],
        **{f"validity, attempt {a}": v for a, v in d["validity_by_attempt"].items()},
        "validity, any attempt": d["validity_any_attempt"],
        "proximity: mean |change| per pixel (L1, [-1, 1])": d["l1"],
        "proximity: L2 per image": d["l2"],
        "sparsity: changed area": d["changed_area"],
        "realism: kNN distance ratio (1 = like real images)": d["realism"],
        "diversity: pairwise L2 between attempts": d.get("diversity", {}).get("pairwise_l2"),
        "diversity: IoU of attempts' change masks": d.get("diversity", {}).get("mask_iou"),
        "gradient steps per counterfactual": d["steps"],
        "network evaluations per counterfactual": d["evaluations_per_counterfactual"],
        "counterfactuals per second": d["counterfactuals_per_second"],
        "surrogate agreement with the classifier": d.get("surrogate_agreement"),
    }
    for attempt, share in d.get("no_room_by_attempt", {}).items():
        rows[f"attempt {attempt}: no region left by earlier attempts"] = share
    for attempt, where in d.get("where_changed", {}).items():
        rows[f"attempt {attempt}: valid ones changing mainly the background"] = where["background"]
        rows[f"attempt {attempt}: valid ones changing mainly the true feature"] = where["feature"]
    table = pd.DataFrame({"value": rows}).to_html(float_format="%.3f", na_rep="-")
    grids = "".join(
        f"<h3>{_pair_title(p.stem, data.classes)}</h3>{img_tag(p.read_bytes(), p.stem)}"
        for p in sorted(folder.glob("grid_*.png"))
    )
    return (
        "<h2>Counterfactuals (SCE-LITE-HQ)</h2><p class=note>Minimal edits in the generator's latent that flip the "
        "classifier; attempt k may only change what earlier attempts left untouched. Change maps: red = brighter, "
        "blue = darker; 'x' marks an attempt that did not reach the goal.</p>" + table + grids
    )


def _pair_title(stem: str, classes: list[str]) -> str:
    """grid_<source index>_to_<target index> -> 'source -> target' with the class names."""
    source, _, target = stem.removeprefix("grid_").partition("_to_")
    try:
        source, target = classes[int(source)], classes[int(target)]
    except (ValueError, IndexError):
        pass
    return f"{html.escape(str(source))} &rarr; {html.escape(str(target))}"


def verdict_counts(f: dict) -> str:
    """true / spurious / unsure / unrealistic as the teacher gave them, then not flipped, abstained (no verdict) and stale (given
    on images the round no longer shows)."""
    if not f:
        return ""
    labels = f.get("labels", {})
    given = "/".join(str(labels.get(k, 0)) for k in LABELS)
    stale = f", {f['stale']} stale, not used" if f.get("stale") else ""
    near = f"{f['partial']} near-flips judged, " if f.get("partial") else ""
    return f"{given} ({near}{f.get('not_flipped', 0)} not flipped, {f.get('abstained', 0)} abstained{stale})"


def _result_line(selected: dict) -> str:
    """The run's result and why it was chosen: on the trusted set's labels, or by the teacher's judgements."""
    name = f"<code>{html.escape(selected['model'])}</code>"
    if selected.get("by") == "trusted":
        trusted = selected["trusted"]
        score = trusted["scores"][selected["model"]]
        return (
            f"<p><b>Result:</b> {name}, the classifier with the best worst-group accuracy on the "
            f"{trusted['images']} val images of the trusted set <code>{html.escape(str(trusted['root']))}</code> "
            f"({score['worst_group_accuracy']:.2f}, accuracy {score['accuracy']:.2f}; the run's first classifier "
            "competed).</p>"
        )
    score = selected.get("feedback_accuracy")
    why = (
        "the corrected classifier whose counterfactuals the teacher judged true most often, and on a tie "
        "spurious least often per explained image"
        if selected.get("round")
        else "the classifier the run started from: no round changed it"
    )
    shown = "- (no edit judged true or spurious)" if score is None else f"{score:.2f}"
    return f"<p><b>Result:</b> {name}, {why} (feedback accuracy {shown}; chosen without test labels).</p>"


def _round_rows(metrics: dict) -> pd.DataFrame:
    """One row per classifier of the CFKD story: before, after each round, the DFR baseline, the reference."""
    rounds = metrics.get("rounds", [])
    # the feedback on a classifier comes from the next round (or the closing judgement)
    fed = {r["explained"]: r for r in judged(metrics)}
    chosen = (metrics.get("selected") or {}).get("model")
    on_trusted = ((metrics.get("selected") or {}).get("trusted") or {}).get("scores")

    def row(name, m, stage):
        f = fed.get(stage, {})
        gain = m.get("gain") or {}
        return {
            "classifier": name,
            "test accuracy": m.get("accuracy", m.get("test_accuracy")),
            "worst-group accuracy": m.get("worst_group_accuracy"),
            "gap closed (accuracy)": gain.get("accuracy"),
            "gap closed (worst group)": gain.get("worst_group_accuracy"),
            "flip rate": f.get("flip_rate"),
            "feedback accuracy": f.get("feedback_accuracy"),
            "true / spurious / unsure / unrealistic": verdict_counts(f),
            "rejected as unrealistic": f.get("unrealistic_share"),
            "expert actions": f.get("expert_actions") or None,
            "realism proxy (kNN ratio)": f.get("realism"),
            **(
                {"worst group, trusted set": on_trusted.get(stage, {}).get("worst_group_accuracy")}
                if on_trusted
                else {}
            ),
            **({"selected": "yes" if stage == chosen else ""} if chosen else {}),
        }

    tested = [metrics["classifier"], *rounds]
    names = ["before (biased)", *(f"after round {r['round']}" for r in rounds)]
    stages = ["classifier", *(f"distil_r{r['round']}" for r in rounds)]
    rows = []
    for i, (name, m, stage) in enumerate(zip(names, tested, stages)):
        first = same_classifier(tested, i, len(tested))[0]  # the selection's rule: one digest, one classifier
        rows.append(row(f"{name} (same weights as {names[first]})" if first != i else name, m, stage))
    if metrics.get("dfr"):
        rows.append(row("DFR-style baseline (uses group labels)", metrics["dfr"], "dfr"))
    if "reference" in metrics:
        rows.append(row("reference (unbiased data)", metrics["reference"], "reference"))
    return pd.DataFrame(rows)


def _round_plots(metrics: dict) -> str:
    rounds = metrics["rounds"]
    x = list(range(len(rounds) + 1))
    acc = [metrics["classifier"]["accuracy"], *(r["test_accuracy"] for r in rounds)]
    worst = [metrics["classifier"]["worst_group_accuracy"], *(r["worst_group_accuracy"] for r in rounds)]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.4))
    left.plot(x, acc, "o-", label="test accuracy")
    left.plot(x, worst, "s-", label="worst-group accuracy")
    for name, style in (("reference", ":"), ("dfr", "--")):
        if metrics.get(name):
            left.axhline(metrics[name]["accuracy"], ls=style, c="grey", label=f"{name} accuracy")
    left.set(xlabel="round (0 = before)", ylim=(0, 1.02), title="accuracy after each round")
    left.legend(fontsize=7)
    pairs = [
        (r["feedback_accuracy"], a, r["round"])
        for r, a in zip(judged(metrics), acc)
        if r["feedback_accuracy"] is not None
    ]
    right.plot([p[0] for p in pairs], [p[1] for p in pairs], "o-")
    for fa, a, n in pairs:
        right.annotate(f"explained in round {n}", (fa, a), fontsize=7)
    right.set(
        xlabel="feedback accuracy (true / labelled)",
        ylabel="test accuracy",
        xlim=(-0.02, 1.02),
        title="label-free feedback accuracy vs test accuracy",
    )
    return png(fig)


def _actions_plot(metrics: dict) -> str:
    """Worst-group accuracy after each round against the expert actions spent so far (verdict key presses; a
    verdict given to a whole cluster counts once): what the correction cost in expert time."""
    rounds = metrics.get("rounds", [])
    if not any(r.get("expert_actions") for r in rounds):
        return ""
    spent = [0]
    for r in rounds:
        spent.append(spent[-1] + int(r.get("expert_actions") or 0))
    worst = [metrics["classifier"]["worst_group_accuracy"], *(r["worst_group_accuracy"] for r in rounds)]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(spent, worst, "o-")
    for x, y, n in zip(spent, worst, range(len(spent))):
        ax.annotate("before" if n == 0 else f"round {n}", (x, y), fontsize=7)
    if metrics.get("reference"):
        ax.axhline(metrics["reference"]["worst_group_accuracy"], ls=":", c="grey", label="reference")
        ax.legend(fontsize=7)
    ax.set(xlabel="expert actions (verdict key presses)", ylabel="worst-group accuracy", ylim=(0, 1.02))
    ax.set_title("correction against expert time", fontsize=9)
    return "<h3>Expert actions</h3>" + png(fig)


COLOURS = {"spurious": "tab:red", "true": "tab:green", "unsure": "tab:grey", "unrealistic": "tab:purple"}


def _verdict_grid(root: Path, round: dict, samples: int = 8) -> str | None:
    explained = root / manifest.folder(round["round"])
    if not feedback.verdicts_path(root, round["round"]).exists():
        return None
    verdicts = feedback.read_verdicts(root, round["round"]).head(samples)
    entries = manifest.read(explained).set_index("id")
    if verdicts.empty:
        return None
    fig, axes = plt.subplots(4, len(verdicts), figsize=(len(verdicts) * 1.3, 5.6), squeeze=False)
    for column, v in zip(axes.T, verdicts.itertuples()):
        entry = entries.loc[v.cf_id]
        pictures = [
            change_maps.read(explained / entry[k]) for k in ("original", "counterfactual", "difference")
        ]
        pictures.append(change_maps.colour_change(pictures[0], pictures[1]))
        for ax, picture in zip(column, pictures):
            ax.imshow(picture)
            ax.axis("off")
        column[0].set_title(v.label, fontsize=8, color=COLOURS.get(v.label, "black"))
    return (
        f"<h3>Round {round['round']}: verdicts (rows: original, counterfactual, brightness change, colour "
        "change)</h3>" + png(fig)
    )


def cfkd_section(root: Path, data: FolderData) -> str | None:
    path = root / "metrics.json"
    metrics = read_json(path) if path.exists() else {}
    if "rounds" not in metrics and not metrics.get("dfr"):
        return None
    waiting = ""
    if metrics.get("status") == "waiting for feedback":
        waiting = (
            f"<p><b>Waiting for feedback:</b> label this round's counterfactuals with "
            f"<code>cfkd annotate --run-dir {html.escape(str(root))}</code>, then run again.</p>"
        )
    table = _round_rows(metrics).to_html(index=False, float_format="%.3f", na_rep="-")
    plots = (_round_plots(metrics) + _actions_plot(metrics)) if metrics.get("rounds") else ""
    grids = "".join(g for g in (_verdict_grid(root, r) for r in judged(metrics)) if g)
    if metrics.get("selected"):
        waiting += _result_line(metrics["selected"])
    return (
        "<h2>CFKD rounds</h2><p class=note>Each round explains the current classifier, the teacher labels every "
        "counterfactual that flipped it (true = real class evidence, spurious = shortcut), and the classifier is "
        "fine-tuned on the spurious ones with their source label (with distil.use_true also on the true ones with "
        "their target label). Feedback accuracy (true / labelled) needs no "
        "test labels. Gap closed = share of the distance between the biased and the reference classifier. The "
        "DFR-style baseline retrains the last layer on group-balanced validation data: it needs group labels, "
        "CFKD does not.</p>" + waiting + table + plots + grids
    )


SECTIONS = [
    summary_section,
    cfkd_section,
    samples_section,
    curves_section,
    evaluation_section,
    explain_section,
]


def write(root: Path, data: FolderData) -> Path:
    parts = [section(root, data) for section in SECTIONS]
    config = (root / "config.yaml").read_text() if (root / "config.yaml").exists() else ""
    page = (
        f"<!doctype html><html><head><meta charset=utf-8><title>cfkd report: {html.escape(root.name)}</title>"
        f"<style>{STYLE}</style></head><body><h1>cfkd report: {html.escape(root.name)}</h1>"
        f"<p class=note>{datetime.datetime.now():%Y-%m-%d %H:%M} &middot; data: {html.escape(str(data.root))}</p>"
        + "".join(p for p in parts if p)
        + f"<h2>Configuration</h2><details><summary>config.yaml</summary><pre>{html.escape(config)}</pre></details>"
        + "</body></html>"
    )
    path = root / "report.html"
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(page)
    tmp.replace(path)
    return path
