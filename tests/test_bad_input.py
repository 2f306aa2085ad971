"""Bad input, one case per row: every case ends in exactly one ``error:`` line and exit code 2, never a traceback.

Each case builds its input in a fresh folder and returns the command line; add a row for every new case found.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from pipeline import cli, config, manifest, models
from pipeline.store import FeedbackStore


def _card(tmp: Path, square_dir: Path, **change) -> list[str]:
    """A valid small_cnn checkpoint with one card field changed."""
    model = models.build("small_cnn", 2, 32)
    card = models.ModelCard(arch="small_cnn", classes=["0", "1"], image_size=[32, 32], stem="standard")
    models.save(model, card, tmp / "ckpt")
    raw = json.loads((tmp / "ckpt" / models.CARD).read_text()) | change
    (tmp / "ckpt" / models.CARD).write_text(json.dumps(raw))
    return ["evaluate", "--checkpoint", str(tmp / "ckpt"), "--data", str(square_dir)]


def _dataset_with(tmp: Path, square_dir: Path, csv_text=None, image=None) -> Path:
    data = tmp / "data"
    shutil.copytree(square_dir, data)
    if csv_text is not None:
        (data / "metadata.csv").write_text(csv_text(data / "metadata.csv"))
    if image is not None:
        first = (data / "metadata.csv").read_text().splitlines()[1].split(",")[0]
        image(data / first)
    return data


def _file_as_folder(tmp: Path) -> list[str]:
    (tmp / "file").write_text("x")
    return ["data", "square", "--out", str(tmp / "file" / "sub")]


def _bomb(path: Path) -> None:
    """A PNG whose header claims more pixels than Pillow will decode (a decompression bomb): 14000 x 14000."""
    Image.new("1", (14000, 14000)).save(path)


def _import(tmp: Path, weights: Path) -> list[str]:
    return [
        "import",
        "--weights",
        str(weights),
        "--arch",
        "small_cnn",
        "--classes",
        "a,b",
        "--preset",
        "half",
    ] + [
        "--image-size",
        "32",
        "--out",
        str(tmp / "out"),
    ]


def _nan_weights(tmp: Path) -> list[str]:
    state = models.build("small_cnn", 2, 32).state_dict()
    state = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in state.items()}
    save_file(state, tmp / "w.safetensors")
    return _import(tmp, tmp / "w.safetensors")


def _run_dir(tmp: Path) -> Path:
    """A run directory with one round of one counterfactual, 'cf-a'."""
    root = tmp / "run"
    (root / "explain").mkdir(parents=True)
    config.dump(config.from_dict({}), root / "config.yaml")
    row = {c: "" for c in manifest.COLUMNS} | {
        "id": "cf-a",
        "sample": "train-0",
        "attempt": 1,
        "success": True,
    }
    manifest.write([row], root / "explain" / manifest.NAME)
    return root


def _import_events(tmp: Path, **change) -> list[str]:
    root = _run_dir(tmp)
    event = {
        "event_id": "e1",
        "cf_id": "cf-a",
        "round": "1",
        "annotator": "ann",
        "label": "true",
        "comment": "",
        "created_at": "2026-11-30T10:00:00+00:00",
    } | change
    (tmp / "events.csv").write_text(",".join(event) + "\n" + ",".join(event.values()) + "\n")
    return ["feedback", "import", "--run-dir", str(root), str(tmp / "events.csv")]


def _conflicting_event(tmp: Path) -> list[str]:
    argv = _import_events(tmp)
    FeedbackStore(tmp / "run" / "feedback.sqlite").add_many(
        [{"event_id": "e1", "cf_id": "cf-a", "annotator": "ann", "label": "spurious"}]
    )
    return argv


def _yaml(tmp: Path, text: str) -> list[str]:
    (tmp / "c.yaml").write_text(text)
    return ["run", "--config", str(tmp / "c.yaml"), "--run-dir", str(tmp / "run")]


def _trusted(tmp: Path, square_dir: Path, csv_text) -> list[str]:
    """A run on Square whose distil.trusted set is a copy of it with its metadata.csv rewritten."""
    trusted = _dataset_with(tmp, square_dir, csv_text=csv_text)
    return _yaml(tmp, f"data:\n  root: {square_dir}\n  image_size: 32\ndistil:\n  trusted: {trusted}\n")


def _generator(tmp: Path, tiny_biased, tiny_codec, spoil) -> list[str]:
    checkpoint, data = tiny_biased
    codec = tmp / "codec"
    shutil.copytree(tiny_codec, codec)
    spoil(codec)
    (tmp / "c.yaml").write_text(f"generator:\n  source: {codec}\nexplain:\n  per_pair: 1\n")
    return [
        "explain",
        "--checkpoint",
        str(checkpoint),
        "--data",
        str(data.root),
        "--config",
        str(tmp / "c.yaml"),
    ] + [
        "--out",
        str(tmp / "out"),
    ]


def _truncate(folder: Path) -> None:
    weights = next(folder.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:200])


CASES = {
    # data
    "decompression bomb in a dataset": (
        lambda t, f: ["data", "check", str(_dataset_with(t, f["square_dir"], image=_bomb))],
        "unreadable image",
    ),
    "semicolon-separated metadata.csv": (
        lambda t, f: [
            "data",
            "check",
            str(_dataset_with(t, f["square_dir"], csv_text=lambda p: p.read_text().replace(",", ";"))),
        ],
        "separated by semicolons",
    ),
    "unwritable --out": (
        lambda t, f: _file_as_folder(t),
        "Not a directory",
    ),
    # weights and cards
    "empty .pt": (
        lambda t, f: (t / "w.pt").write_bytes(b"") or _import(t, t / "w.pt"),
        "cannot read weights",
    ),
    "all-NaN weights": (lambda t, f: _nan_weights(t), "NaN"),
    "card image_size 'abc'": (lambda t, f: _card(t, f["square_dir"], image_size="abc"), "image_size"),
    "card image_size -5": (lambda t, f: _card(t, f["square_dir"], image_size=-5), "image_size"),
    "card std 0": (lambda t, f: _card(t, f["square_dir"], std=[0, 0, 0]), "std"),
    "card classes '01'": (lambda t, f: _card(t, f["square_dir"], classes="01"), "classes"),
    "generator without weights": (
        lambda t, f: _generator(
            t, f["tiny_biased"], f["tiny_codec"], lambda c: [p.unlink() for p in c.glob("*.safetensors")]
        ),
        "cannot load its weights",
    ),
    "generator with truncated safetensors": (
        lambda t, f: _generator(t, f["tiny_biased"], f["tiny_codec"], _truncate),
        "cannot load its weights",
    ),
    # configs
    "run name with NUL": (lambda t, f: _yaml(t, 'name: "a\\0b"\n'), "control characters"),
    "duplicate YAML key": (
        lambda t, f: _yaml(t, "data:\n  image_size: 32\n  image_size: 64\n"),
        "given twice",
    ),
    "YAML syntax error": (lambda t, f: _yaml(t, "data: [1,\n  x: 2\n"), "line 3, column 1"),
    "trusted set that is no dataset": (
        lambda t, f: _yaml(t, f"data:\n  root: {f['square_dir']}\ndistil:\n  trusted: {t / 'nowhere'}\n"),
        "distil.trusted: no metadata.csv",
    ),
    "trusted set without val images": (
        lambda t, f: _trusted(t, f["square_dir"], lambda p: p.read_text().replace(",val,", ",test,")),
        "has no 'val' images",
    ),
    "trusted set with a label the classifier lacks": (
        lambda t, f: _trusted(t, f["square_dir"], lambda p: re.sub(r"\.png,1,", ".png,7,", p.read_text())),
        "labels the classifier does not know: 7",
    ),
    "teach --noise 1.5": (
        lambda t, f: ["teach", "--run-dir", str(_run_dir(t)), "--teacher", "mask", "--noise", "1.5"],
        "feedback.noise",
    ),
    # the feedback store
    "export into a missing folder": (
        lambda t, f: ["feedback", "export", "--run-dir", str(_run_dir(t)), str(t / "nowhere" / "e.csv")],
        "does not exist",
    ),
    "import: unknown counterfactual": (
        lambda t, f: _import_events(t, cf_id="cf-zzz"),
        "unknown counterfactual",
    ),
    "import: time not-a-time": (
        lambda t, f: _import_events(t, created_at="not-a-time"),
        "not an ISO 8601 time",
    ),
    "import: round -7": (lambda t, f: _import_events(t, round="-7"), "rounds count from 1"),
    "import: round one": (lambda t, f: _import_events(t, round="one"), "not a whole number"),
    "import: unknown label": (lambda t, f: _import_events(t, label="maybe"), "expected one of"),
    "import: event id taken by another event": (
        lambda t, f: _conflicting_event(t),
        "already names another event",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_error_line(case, tmp_path, capsys, request):
    make, message = CASES[case]
    fixtures = {name: request.getfixturevalue(name) for name in ("square_dir",)}
    if "generator" in case:
        fixtures |= {name: request.getfixturevalue(name) for name in ("tiny_biased", "tiny_codec")}
    argv = make(tmp_path, fixtures)
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert message in err[0], err[0]


def test_a_rejected_import_adds_nothing(tmp_path, capsys):
    """All or nothing: one bad row among good ones, and not one event lands."""
    root = _run_dir(tmp_path)
    header = "event_id,cf_id,round,annotator,label,comment,created_at\n"
    good = "e1,cf-a,1,ann,true,,2026-11-30T10:00:00+00:00\n"
    (tmp_path / "events.csv").write_text(header + good + "e2,cf-a,1,ann,spurious,,yesterday\n")
    assert cli.main(["feedback", "import", "--run-dir", str(root), str(tmp_path / "events.csv")]) == 2
    assert "row 3" in capsys.readouterr().err
    assert FeedbackStore(root / "feedback.sqlite").events().empty


def test_a_locked_run_directory_names_its_holder(tmp_path, capsys):
    import os

    from pipeline.rundir import locked

    with locked(tmp_path / "run"):
        assert cli.main(["run", "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"in use by another cfkd run (PID {os.getpid()})" in err[0]


def test_the_app_names_a_file_that_is_not_an_image_and_moves_on(tmp_path, monkeypatch):
    """A manifest entry inside the run directory that is not an image: one line on its card, no traceback, and
    the card can still be judged."""
    from test_app import app, labels, make_run

    run = make_run(tmp_path / "run", n=2)
    (run / "explain" / "counterfactuals" / "0.png").write_text("not a png")
    at = app(monkeypatch, run)
    assert not at.exception
    assert len(at.error) == 1 and "0.png cannot be shown: not a readable image" in at.error[0].value
    at.button(key="label-unsure").click().run()
    assert not at.exception and labels(run) == {"cf-0": "unsure"}


def test_a_run_where_nothing_flips_says_what_to_change_every_time(tmp_path, tiny_codec, capsys):
    """The demo's settings (distil.select on) with a search too short to flip anything: one line, every rerun."""
    from conftest import tiny_config

    conf = tiny_config(
        **{
            "explain.enabled": True,
            "explain.per_pair": 1,
            "explain.search.steps": 2,
            "explain.search.lr": 1e-9,
        },
        **{"generator.source": str(tiny_codec), "distil.rounds": 1},
    )
    config.dump(conf, tmp_path / "c.yaml")
    argv = ["run", "--config", str(tmp_path / "c.yaml"), "--run-dir", str(tmp_path / "run")]
    for _ in range(2):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "none of the" in err[0] and "flipped the classifier" in err[0], err
