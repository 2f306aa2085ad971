import subprocess
import sys

import pytest

from pipeline import cli

SUBCOMMANDS = [
    ["run"],
    ["data", "square"],
    ["data", "check"],
    ["generator", "train"],
    ["explain"],
    ["teach"],
    ["distil"],
    ["annotate"],
    ["feedback", "export"],
    ["feedback", "import"],
    ["train"],
    ["import"],
    ["evaluate"],
]


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([*command, "--help"])
    assert exit_.value.code == 0
    assert "usage: cfkd" in capsys.readouterr().out


def test_console_script_is_installed_and_lists_subcommands():
    out = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for name in (
        "run",
        "data",
        "generator",
        "explain",
        "teach",
        "distil",
        "annotate",
        "feedback",
        "train",
        "import",
        "evaluate",
    ):
        assert name in out


def test_data_square_then_check(tmp_path, capsys):
    assert (
        cli.main(
            ["data", "square", "--out", str(tmp_path / "sq"), "--n", "40", "--size", "32", "--seed", "1"]
        )
        == 0
    )
    assert cli.main(["data", "check", str(tmp_path / "sq")]) == 0
    assert "40 colour images, classes ['0', '1'], ok" in capsys.readouterr().out


def test_bad_input_exits_2_with_one_line(tmp_path, capsys, square_dir):
    (tmp_path / "c.yaml").write_text("classifier: {arch: 3}\n")
    cases = [
        ["run", "--config", str(tmp_path / "c.yaml"), "--run-dir", str(tmp_path / "r")],
        ["data", "square", "--out", str(tmp_path / "x"), "--poison", "2"],
        ["data", "check", str(tmp_path)],
        ["evaluate", "--checkpoint", str(tmp_path), "--data", str(square_dir)],
        [
            "import",
            "--weights",
            str(tmp_path / "none.pt"),
            "--arch",
            "resnet18",
            "--classes",
            "a,b",
            "--out",
            str(tmp_path / "o"),
        ],
        ["train", "--data", str(square_dir), "--out", str(tmp_path / "t"), "--arch", "nonet"],
        ["teach", "--run-dir", str(tmp_path), "--teacher", "mask", "--band", "0.5"],
    ]
    for argv in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err


def test_usage_errors_exit_2():
    with pytest.raises(SystemExit) as exit_:
        cli.main(["run", "--no-such-flag"])
    assert exit_.value.code == 2


def test_internal_error_exits_1_without_traceback(monkeypatch, capsys, tmp_path):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr("pipeline.square.generate", broken)
    assert cli.main(["data", "square", "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert "internal error: RuntimeError: boom" in err and "Traceback" not in err
    assert cli.main(["data", "square", "--out", str(tmp_path / "x"), "--verbose"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_train_and_evaluate_commands(tmp_path, square_dir, capsys):
    ckpt = tmp_path / "ckpt"
    argv = [
        "train",
        "--data",
        str(square_dir),
        "--out",
        str(ckpt),
        "--arch",
        "small_cnn",
        "--epochs",
        "1",
        "--image-size",
        "32",
    ]
    assert cli.main(argv) == 0
    assert cli.main(["evaluate", "--checkpoint", str(ckpt), "--data", str(square_dir)]) == 0
    assert "worst-group" in capsys.readouterr().out
    assert (ckpt / "eval_test" / "metrics.json").exists()
    assert (
        cli.main(
            [
                "import",
                "--weights",
                str(ckpt / "model.safetensors"),
                "--arch",
                "small_cnn",
                "--data",
                str(square_dir),
                "--image-size",
                "32",
                "--preset",
                "half",
                "--out",
                str(tmp_path / "imported"),
            ]
        )
        == 0
    )


def test_feedback_export_and_import(tmp_path, capsys):
    from pipeline import config, manifest
    from pipeline.store import FeedbackStore

    for run in ("a", "b"):  # two run directories that showed the same counterfactual
        (tmp_path / run / "explain").mkdir(parents=True)
        config.dump(config.from_dict({}), tmp_path / run / "config.yaml")
        row = {c: "" for c in manifest.COLUMNS} | {"id": "cf-1", "attempt": 1, "success": True}
        manifest.write([row], tmp_path / run / "explain" / manifest.NAME)
    FeedbackStore(tmp_path / "a" / "feedback.sqlite").add("cf-1", "alice", "true")
    assert (
        cli.main(["feedback", "export", "--run-dir", str(tmp_path / "a"), str(tmp_path / "x.parquet")]) == 0
    )
    assert (
        cli.main(["feedback", "import", "--run-dir", str(tmp_path / "b"), str(tmp_path / "x.parquet")]) == 0
    )
    assert "imported 1 new label events" in capsys.readouterr().out
    assert (
        cli.main(["feedback", "import", "--run-dir", str(tmp_path / "b"), str(tmp_path / "missing.csv")]) == 2
    )


def test_run_and_distil_reject_bad_cfkd_input(tmp_path, capsys):
    assert cli.main(["run", "--min-labels", "0", "--run-dir", str(tmp_path / "r")]) == 2
    assert "feedback.min_labels: got 0" in capsys.readouterr().err
    assert cli.main(["distil", "--run-dir", str(tmp_path / "nothing")]) == 2
    assert "not a run directory" in capsys.readouterr().err
