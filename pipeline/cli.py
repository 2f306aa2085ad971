"""The ``cfkd`` command: a table from subcommand to a plain function. Exit codes: 0 ok, 2 bad input, 1 internal."""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

from pipeline.errors import Interrupted, UserError, stop_on_signals


def _data_square(args) -> None:
    from pipeline import square
    from pipeline.config import from_dict

    sq = from_dict(
        {"data": {"square": {k: getattr(args, k) for k in ("n", "poison", "noise", "size", "seed")}}}
    ).data.square
    table = square.generate(args.out, sq)
    print(f"wrote {len(table)} images to {args.out}")


def _generated():
    """The benchmark datasets `cfkd data NAME` makes with the common options (Square has its own command)."""
    from pipeline.generators import GENERATORS

    return {name: entry for name, entry in GENERATORS.items() if name != "square"}


def _data_generated(args) -> None:
    import dataclasses

    if not 0 <= args.poison <= 1:
        raise UserError(f"--poison {args.poison}: expected a share in [0, 1]")
    if args.n < 20:
        raise UserError(f"--n {args.n}: expected at least 20 images")
    config_class, generate, _ = _generated()[args.data_command]
    given = {k: getattr(args, k, None) for k in ("n", "poison", "seed", "size")}
    names = {f.name for f in dataclasses.fields(config_class)}
    config = config_class(**{k: v for k, v in given.items() if v is not None and k in names})
    if getattr(config, "size", 16) < 16:
        raise UserError(f"--size {config.size}: expected at least 16 px")
    table = generate(args.out, config)
    print(
        f"wrote {len(table)} {args.data_command} images ({', '.join(sorted(set(table['label'])))}) to {args.out}"
    )


def _data_check(args) -> None:
    from pipeline.data import load_folder

    folder = load_folder(args.root)
    counts = folder.table.groupby(["split", "label"]).size().to_dict()
    kind = "greyscale" if folder.grey else "colour"
    print(f"{folder.root}: {len(folder.table)} {kind} images, classes {folder.classes}, ok")
    for (split, label), n in sorted(counts.items()):
        print(f"  {split:5s} {label}: {n}")


def _numbers(text: str | None, what: str, kind=float) -> list | None:
    """A comma list on the command line ("0.485,0.456,0.406", "64,96")."""
    if text is None:
        return None
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{what}: expected comma-separated numbers, got '{text}'") from None


def _image_size(text: str) -> int | list[int]:
    sides = _numbers(text, "--image-size", int)
    return sides[0] if len(sides) == 1 else sides


def _train(args) -> None:
    from pipeline import train
    from pipeline.config import from_dict
    from pipeline.data import load_folder

    raw = {
        k: v
        for k, v in vars(args).items()
        if k in ("arch", "epochs", "batch_size", "lr", "balanced", "seed") and v is not None
    }
    data = {"image_size": _image_size(args.image_size), "resize": args.resize}
    config = from_dict({"classifier": raw, "data": data})
    result = train.run(
        load_folder(args.data),
        config.classifier,
        config.data.image_size,
        Path(args.out),
        args.verbose,
        config.data.resize,
    )
    print(f"wrote {result.directory} ({result.card.metrics})")


def _import(args) -> None:
    from pipeline import models

    if not args.data and not args.classes:
        raise UserError(
            "cfkd import needs --data (a dataset to check against), --classes (output order), or both"
        )
    from pipeline.config import from_dict
    from pipeline.data import load_folder

    classifier = {
        "arch": args.arch,
        "weights": args.weights,
        "mean": _numbers(args.mean, "--mean"),
        "std": _numbers(args.std, "--std"),
        "preset": args.preset,
    }
    data = {"image_size": _image_size(args.image_size), "resize": args.resize}
    c = from_dict(
        {"classifier": classifier, "data": data, "reference": {"enabled": False}}
    )  # checked as config
    folder = load_folder(args.data) if args.data else None
    given = [n.strip() for n in args.classes.split(",") if n.strip()] if args.classes else None
    classes = models.output_classes(given, folder.classes) if folder else given
    card = models.import_weights(
        args.weights,
        args.arch,
        classes,
        c.data.image_size,
        Path(args.out),
        c.classifier.mean,
        c.classifier.std,
        c.classifier.preset,
        c.data.resize,
        folder.grey if folder else None,
    )
    print(
        f"imported {args.weights} as {card.arch} ({card.channels} channel(s), mean {card.mean}, std {card.std}) "
        f"with classes {card.classes} into {args.out}"
    )


def _evaluate(args) -> None:
    from pipeline import evaluate
    from pipeline.data import load_folder

    out = Path(args.out or Path(args.checkpoint) / f"eval_{args.split}")
    metrics = evaluate.run(Path(args.checkpoint), load_folder(args.data), out, args.split)
    print(
        f"accuracy {metrics['accuracy']:.3f}, worst-group {metrics['worst_group_accuracy']:.3f} ({metrics['worst_group']}); wrote {out}"
    )


def _generator_train(args) -> None:
    from pipeline import codec

    given = {"kind": args.kind, "max_steps": args.steps, "max_minutes": args.minutes, "seed": args.seed}
    config = codec.CodecConfig(**{k: v for k, v in given.items() if v is not None})
    card = codec.train(Path(args.out), config, args.verbose)
    print(json.dumps({k: v for k, v in card.items() if k not in ("config", "corpus")}, indent=2))


def _explain(args) -> None:
    from pipeline import config, explain
    from pipeline.data import load_folder

    conf = config.load(args.config)
    summary = explain.run(
        Path(args.checkpoint),
        load_folder(args.data),
        conf.explain,
        conf.generator,
        Path(args.out),
        args.verbose,
    )
    print(
        f"{summary['counterfactuals']} counterfactuals, validity {summary['validity']:.3f}; wrote {args.out}"
    )


def _teach(args) -> None:
    from pipeline import config, teach

    run_dir = Path(args.run_dir)
    conf = config.load(run_dir / "config.yaml") if (run_dir / "config.yaml").exists() else config.load(None)
    data_root = Path(conf.data.root) if conf.data.root else run_dir / "data"
    reference = Path(args.reference) if args.reference else run_dir / "reference"
    # --band goes through the config's own check, as feedback.band would
    band = (
        conf.feedback.band
        if args.band is None
        else config.from_dict({"feedback": {"band": args.band}}).feedback.band
    )
    noise = config.from_dict({"feedback": {"noise": args.noise}}).feedback.noise
    oracle = args.oracle or conf.feedback.oracle
    result = teach.run(
        run_dir,
        args.teacher,
        data_root,
        reference,
        noise,
        args.round,
        args.seed,
        band,
        conf.data.resize,
        oracle,
        conf.feedback.unrealistic,
        conf.feedback.partial,
    )
    print(
        f"{result['annotator']}: {result['labelled']} verdicts ({result.get('true', 0)} true, "
        f"{result.get('spurious', 0)} spurious, {result.get('unsure', 0)} unsure, {result.get('unrealistic', 0)} unrealistic), "
        f"{result['not_flipped']} not "
        f"flipped, {result['abstained']} abstained; wrote {run_dir / 'feedback.sqlite'}"
    )


def _annotate(args) -> int:
    import os

    from annotation_app import launch

    return launch.serve(args.run_dir, args.port, args.address, args.token or os.environ.get("CFKD_TOKEN", ""))


def _feedback(args) -> None:
    from pipeline import manifest
    from pipeline.store import FeedbackStore

    run_dir = Path(args.run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir} is not a run directory (no config.yaml)")
    store = FeedbackStore(run_dir / "feedback.sqlite")
    if args.feedback_command == "export":
        print(f"exported {store.export(args.file)} label events to {args.file}")
        return
    # a verdict is only for a counterfactual this run has shown: ids from every round's manifest
    known = {i for r in manifest.rounds(run_dir) for i in manifest.read_round(run_dir, r)["id"]}
    print(f"imported {store.import_(args.file, known)} new label events from {args.file}")


def _labelstudio(args) -> None:
    from pipeline import config, labelstudio

    run_dir = Path(args.run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir} is not a run directory (no config.yaml)")
    if args.feedback_command == "labelstudio-export":
        partial = config.load(run_dir / "config.yaml").feedback.partial
        n, written = labelstudio.export(run_dir, args.round, Path(args.file), partial)
        print(f"exported {n} tasks of round {args.round} to {args.file}; labelling config: {written}")
        return
    added, skipped = labelstudio.import_export(run_dir, Path(args.file))
    print(f"imported {added} new label events from {args.file} ({skipped} annotations without a verdict)")


def _run(args) -> None:
    from pipeline import config, runner

    conf = config.load(args.config)
    overrides = {"teacher": args.teacher, "min_labels": args.min_labels}
    feedback = config.to_dict(conf.feedback) | {k: v for k, v in overrides.items() if v is not None}
    conf = config.from_dict(config.to_dict(conf) | {"feedback": feedback})  # checked like a config file
    root = Path(args.run_dir or Path("runs") / conf.name)
    path = runner.run(conf, root, force=args.force, start=args.start, verbose=args.verbose)
    print(f"report: {path}")


def _distil(args) -> None:
    from pipeline import config, runner

    root = Path(args.run_dir)
    if not (root / "config.yaml").is_file():
        raise UserError(f"{root} is not a run directory (no config.yaml): run `cfkd run` first")
    path = runner.run(config.load(root / "config.yaml"), root, start="distil", verbose=args.verbose)
    print(f"report: {path}")


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
    run.set_defaults(func=_run)

    di = sub.add_parser(
        "distil",
        help="fine-tune a run's classifier on its verdicts again (CFKD rounds, from the distil stage on)",
        parents=[common],
    )
    di.add_argument("--run-dir", required=True)
    di.set_defaults(func=_distil)

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
    sq.set_defaults(func=_data_square)
    for name, (config_class, _, what) in _generated().items():
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
        generated.set_defaults(func=_data_generated)
    check = data.add_parser("check", help="validate a folder dataset (metadata.csv)", parents=[common])
    check.add_argument("root")
    check.set_defaults(func=_data_check)

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
    gt.set_defaults(func=_generator_train)

    ex = sub.add_parser("explain", help="SCE-LITE-HQ counterfactuals for a classifier", parents=[common])
    ex.add_argument("--checkpoint", required=True, help="classifier checkpoint directory")
    ex.add_argument("--data", required=True, help="folder dataset")
    ex.add_argument("--out", required=True, help="output folder (images, manifest.csv, desiderata.json)")
    ex.add_argument(
        "--config", help="YAML whose explain: and generator: sections apply (default: the embedded default)"
    )
    ex.set_defaults(func=_explain)

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
        choices=["density", "intervention"],
        help="how the mask teacher judges (default: the run's feedback.oracle)",
    )
    te.add_argument("--round", type=int, default=1)
    te.add_argument("--seed", type=int, default=0)
    te.add_argument(
        "--band", type=float, help="unsure between 1/band and band (default: the run's feedback.band)"
    )
    te.set_defaults(func=_teach)

    an = sub.add_parser(
        "annotate", help="start the expert annotation app (Streamlit) on a run", parents=[common]
    )
    an.add_argument("--run-dir", default="runs/default")
    an.add_argument("--port", type=int, default=8501)
    an.add_argument(
        "--address", default="127.0.0.1", help="interface to listen on (0.0.0.0 to share on a network)"
    )
    an.add_argument("--token", help="access token the app asks for (or CFKD_TOKEN)")
    an.set_defaults(func=_annotate)

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
        command.set_defaults(func=_feedback)
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
        command.set_defaults(func=_labelstudio)

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
    tr.set_defaults(func=_train)

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
    im.set_defaults(func=_import)

    ev = sub.add_parser(
        "evaluate", help="accuracy, per-group and worst-group accuracy, confusion matrix", parents=[common]
    )
    ev.add_argument(
        "--checkpoint", required=True, help="checkpoint directory (model.safetensors + card.json)"
    )
    ev.add_argument("--data", required=True, help="folder dataset")
    ev.add_argument("--split", default="test", choices=["train", "val", "test"])
    ev.add_argument("--out", help="output folder (default: <checkpoint>/eval_<split>)")
    ev.set_defaults(func=_evaluate)
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
