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

from pipeline.data import FolderData  # noqa: E402
from pipeline.evaluate import group_names  # noqa: E402
from pipeline.rundir import read_json  # noqa: E402

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
        f"<h3>{html.escape(p.stem[5:]).replace('_to_', ' &rarr; ')}</h3>{img_tag(p.read_bytes(), p.stem)}"
        for p in sorted(folder.glob("grid_*.png"))
    )
    return (
        "<h2>Counterfactuals (SCE-LITE-HQ)</h2><p class=note>Minimal edits in the generator's latent that flip the "
        "classifier; attempt k may only change what earlier attempts left untouched. Change maps: red = brighter, "
        "blue = darker; 'x' marks an attempt that did not reach the goal.</p>" + table + grids
    )


SECTIONS = [summary_section, samples_section, curves_section, evaluation_section, explain_section]


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
