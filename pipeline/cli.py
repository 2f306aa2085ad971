"""The ``cfkd`` command: its parser, a table from subcommand to a plain function of pipeline.commands, and the
exit codes: 0 ok, 2 bad input, 1 internal."""

from __future__ import annotations

import argparse
import sys
import traceback

from pipeline import commands
from pipeline.config_rules import ORACLES
from pipeline.errors import Interrupted, UserError, stop_on_signals


def parser() -> argparse.ArgumentParser:
    # defaults come from the config dataclasses: one copy
    from pipeline.config import ClassifierConfig, DataConfig, FeedbackConfig, SquareConfig

    square, data_defaults, feedback_defaults = SquareConfig(), DataConfig(), FeedbackConfig()
    size_default = str(data_defaults.image_size)
    p = argparse.ArgumentParser(
        prog="cfkd", description="Find and remove Clever-Hans shortcuts in image classifiers."
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--verbose", action="store_true", help="show library banners, warnings and tracebacks"
    )
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "run", help="run the whole pipeline (default: the embedded Square demo)", parents=[common]
    )
    run.add_argument("--config", help="YAML config (default: the embedded default)")
    run.add_argument("--run-dir", help="run directory (default: runs/<config name>)")
    run.add_argument("--force", action="store_true", help="recompute every stage")
    run.add_argument("--from", dest="start", metavar="STAGE", help="recompute this stage and all later ones")
    run.add_argument(
        "--teacher",
        choices=["mask", "model", "human"],
        help="who labels the counterfactuals (feedback.teacher)",
    )
    run.add_argument(
        "--min-labels",
        type=int,
        help="human teacher: labels a round needs before distil (feedback.min_labels)",
    )
    run.set_defaults(func=commands.run_command)

    di = sub.add_parser(
        "distil",
        help="fine-tune a run's classifier on its verdicts again (CFKD rounds, from the distil stage on)",
        parents=[common],
    )
    di.add_argument("--run-dir", required=True)
    di.set_defaults(func=commands.distil_command)

    data = sub.add_parser("data", help="make or check datasets").add_subparsers(
        dest="data_command", required=True
    )
    sq = data.add_parser("square", help="generate the Square dataset in the folder format", parents=[common])
    sq.add_argument("--out", required=True)
    sq.add_argument("--n", type=int, default=square.n, help=f"images in all splits (default {square.n})")
    sq.add_argument(
        "--poison",
        type=float,
        default=square.poison,
        help=f"share of train/val images with confounder == class (default {square.poison})",
    )
    sq.add_argument("--size", type=int, default=square.size, help=f"image side (default {square.size})")
    sq.add_argument(
        "--noise", type=float, default=square.noise, help=f"pixel noise std, 0-255 (default {square.noise})"
    )
    sq.add_argument("--seed", type=int, default=square.seed)
    sq.set_defaults(func=commands.data_square_command)
    for name, (config_class, _, what) in commands._generated().items():
        defaults = config_class()
        generated = data.add_parser(name, help=f"generate {name.capitalize()} ({what})", parents=[common])
        generated.add_argument("--out", required=True)
        generated.add_argument(
            "--n", type=int, default=defaults.n, help="images in all splits (default %(default)s)"
        )
        generated.add_argument(
            "--poison",
            type=float,
            default=defaults.poison,
            help="share of train/val images whose confounder is their own class's (default %(default)s)",
        )
        generated.add_argument("--seed", type=int, default=defaults.seed)
        if hasattr(defaults, "size"):
            generated.add_argument("--size", type=int, help=f"image side (default {defaults.size})")
        generated.set_defaults(func=commands.data_generated_command)
    check = data.add_parser("check", help="validate a folder dataset (metadata.csv)", parents=[common])
    check.add_argument("root")
    check.set_defaults(func=commands.data_check_command)

    gen = sub.add_parser("generator", help="the generative model of the explain stage").add_subparsers(
        dest="generator_command", required=True
    )
    gt = gen.add_parser(
        "train", help="train the embedded generic codec on the procedural corpus", parents=[common]
    )
    gt.add_argument("--out", default="checkpoints/generic-codec")
    # defaults: pipeline.codec.CodecConfig (read when the command runs, so --help stays light)
    gt.add_argument("--kind", choices=["AutoencoderTiny", "AutoencoderKL"])
    gt.add_argument("--steps", type=int, help="most training steps")
    gt.add_argument("--minutes", type=float, help="CPU budget; training stops at steps or minutes")
    gt.add_argument("--seed", type=int)
    gt.set_defaults(func=commands.generator_train_command)

    ex = sub.add_parser("explain", help="SCE-LITE-HQ counterfactuals for a classifier", parents=[common])
    ex.add_argument("--checkpoint", required=True, help="classifier checkpoint directory")
    ex.add_argument("--data", required=True, help="folder dataset")
    ex.add_argument("--out", required=True, help="output folder (images, manifest.csv, desiderata.json)")
    ex.add_argument(
        "--config", help="YAML whose explain: and generator: sections apply (default: the embedded default)"
    )
    ex.set_defaults(func=commands.explain_command)

    te = sub.add_parser(
        "teach", help="label a run's counterfactuals with a simulated teacher", parents=[common]
    )
    te.add_argument("--run-dir", required=True)
    te.add_argument("--teacher", required=True, choices=["mask", "model"], help="mask oracle or model oracle")
    te.add_argument(
        "--reference", help="reference classifier for the model oracle (default: <run-dir>/reference)"
    )
    te.add_argument(
        "--noise",
        type=float,
        default=feedback_defaults.noise,
        help="share of verdicts flipped at random (imperfect expert)",
    )
    te.add_argument(
        "--oracle",
        choices=ORACLES,
        help="how the mask teacher judges (default: the run's feedback.oracle)",
    )
    te.add_argument("--round", type=int, default=1)
    te.add_argument("--seed", type=int, default=0)
    te.add_argument(
        "--band", type=float, help="unsure between 1/band and band (default: the run's feedback.band)"
    )
    te.set_defaults(func=commands.teach_command)

    an = sub.add_parser(
        "annotate", help="start the expert annotation app (Streamlit) on a run", parents=[common]
    )
    an.add_argument("--run-dir", default="runs/default")
    an.add_argument("--port", type=int, default=8501)
    an.add_argument(
        "--address", default="127.0.0.1", help="interface to listen on (0.0.0.0 to share on a network)"
    )
    an.add_argument("--token", help="access token the app asks for (or CFKD_TOKEN)")
    an.set_defaults(func=commands.annotate_command)

    fb = sub.add_parser("feedback", help="export or merge the label events of a run").add_subparsers(
        dest="feedback_command", required=True
    )
    for name, text in (
        ("export", "write every label event to CSV or Parquet"),
        ("import", "merge an export (no duplicates)"),
    ):
        command = fb.add_parser(name, help=text, parents=[common])
        command.add_argument("--run-dir", required=True)
        command.add_argument("file", help="a .csv or .parquet file")
        command.set_defaults(func=commands.feedback_command)
    for name, text in (
        (
            "labelstudio-export",
            "write a round as a Label Studio import (tasks .json + labelling config .xml)",
        ),
        ("labelstudio-import", "merge a Label Studio JSON export as label events (no duplicates)"),
    ):
        command = fb.add_parser(name, help=text, parents=[common])
        command.add_argument("--run-dir", required=True)
        if name == "labelstudio-export":
            command.add_argument("--round", type=int, default=1, help="the round to export (default 1)")
        command.add_argument("file", help="a .json file")
        command.set_defaults(func=commands.labelstudio_command)

    tr = sub.add_parser("train", help="train a classifier on a folder dataset", parents=[common])
    tr.add_argument("--data", required=True, help="folder dataset")
    tr.add_argument("--out", required=True, help="checkpoint directory to write")
    tr.add_argument(
        "--arch", help=f"torchvision model name, timm:<name> or small_cnn (default {ClassifierConfig().arch})"
    )
    tr.add_argument("--epochs", type=int)
    tr.add_argument("--batch-size", type=int)
    tr.add_argument("--lr", type=float)
    tr.add_argument("--balanced", action="store_true", default=None, help="class-balanced sampling")
    tr.add_argument("--image-size", default=size_default, help="side, or H,W (default %(default)s)")
    tr.add_argument("--resize", default=data_defaults.resize, choices=["pad", "crop", "stretch"])
    tr.add_argument("--seed", type=int)
    tr.set_defaults(func=commands.train_command)

    im = sub.add_parser(
        "import",
        help="import your own classifier weights (safetensors, .pt state_dict or TorchScript)",
        parents=[common],
    )
    im.add_argument("--weights", required=True)
    im.add_argument(
        "--arch",
        required=True,
        help="torchvision model name the weights belong to, timm:<name>, or small_cnn",
    )
    norm = im.add_argument_group("input normalisation the model was trained with (one of)")
    norm.add_argument("--preset", choices=["imagenet", "half"], help="imagenet, or half (mean = std = 0.5)")
    norm.add_argument("--mean", help="per-channel means on the [0, 1] scale, e.g. 0.485,0.456,0.406")
    norm.add_argument("--std", help="per-channel standard deviations, e.g. 0.229,0.224,0.225")
    im.add_argument(
        "--data", help="folder dataset the model predicts (its classes, sorted, unless --classes)"
    )
    im.add_argument("--classes", help="comma-separated class names in the model's output order")
    im.add_argument("--image-size", default=size_default, help="input side, or H,W (default %(default)s)")
    im.add_argument(
        "--resize",
        default=data_defaults.resize,
        choices=["pad", "crop", "stretch"],
        help="how other shapes reach the input size (default %(default)s)",
    )
    im.add_argument("--out", required=True)
    im.set_defaults(func=commands.import_command)

    ev = sub.add_parser(
        "evaluate", help="accuracy, per-group and worst-group accuracy, confusion matrix", parents=[common]
    )
    ev.add_argument(
        "--checkpoint", required=True, help="checkpoint directory (model.safetensors + card.json)"
    )
    ev.add_argument("--data", required=True, help="folder dataset")
    ev.add_argument("--split", default="test", choices=["train", "val", "test"])
    ev.add_argument("--out", help="output folder (default: <checkpoint>/eval_<split>)")
    ev.set_defaults(func=commands.evaluate_command)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from pipeline import quiet

    quiet.configure(args.verbose)
    try:
        with stop_on_signals():
            return args.func(args) or 0
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Interrupted as exc:
        where = f" in stage {exc.stage}" if exc.stage else ""
        print(f"interrupted{where} ({exc}); rerun to resume", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:  # the reader went away (`cfkd data check ... | head`): nothing left to say
        sys.stderr.close()
        return 141
    except OSError as exc:  # the file system refused (permission, no space, not a folder): the user's to fix
        if args.verbose:
            traceback.print_exc()
        target = f": {exc.filename}" if exc.filename else ""
        print(f"error: {exc.strerror or exc}{target}", file=sys.stderr)
        return UserError.exit_code
    except Exception as exc:  # a bug of ours: one line by default, the traceback with --verbose
        if args.verbose:
            traceback.print_exc()
        print(
            f"internal error: {type(exc).__name__}: {exc} (rerun with --verbose for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
