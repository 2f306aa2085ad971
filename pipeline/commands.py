"""What each ``cfkd`` subcommand does: one plain function per command, given its parsed arguments (pipeline.cli
builds the parser and maps subcommands here). Heavy modules are imported inside each function, so ``cfkd --help``
and a bad argument answer without loading torch."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.errors import UserError


def data_square_command(args) -> None:
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


def data_generated_command(args) -> None:
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


def data_check_command(args) -> None:
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


def train_command(args) -> None:
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


def import_command(args) -> None:
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


def evaluate_command(args) -> None:
    from pipeline import evaluate
    from pipeline.data import load_folder

    out = Path(args.out or Path(args.checkpoint) / f"eval_{args.split}")
    metrics = evaluate.run(Path(args.checkpoint), load_folder(args.data), out, args.split)
    print(
        f"accuracy {metrics['accuracy']:.3f}, worst-group {metrics['worst_group_accuracy']:.3f} ({metrics['worst_group']}); wrote {out}"
    )


def generator_train_command(args) -> None:
    from pipeline import codec

    given = {"kind": args.kind, "max_steps": args.steps, "max_minutes": args.minutes, "seed": args.seed}
    config = codec.CodecConfig(**{k: v for k, v in given.items() if v is not None})
    card = codec.train(Path(args.out), config, args.verbose)
    print(json.dumps({k: v for k, v in card.items() if k not in ("config", "corpus")}, indent=2))


def explain_command(args) -> None:
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


def teach_command(args) -> None:
    from pipeline import config, rundir, teach

    run_dir = Path(args.run_dir)
    conf = config.load(run_dir / "config.yaml") if (run_dir / "config.yaml").exists() else config.load(None)
    data_root = rundir.data_root(run_dir, conf.data.root)
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
        conf.feedback.moved_unsure,
        conf.feedback.other_class_unsure,
        conf.feedback.intervention_true,
    )
    print(
        f"{result['annotator']}: {result['labelled']} verdicts ({result.get('true', 0)} true, "
        f"{result.get('spurious', 0)} spurious, {result.get('unsure', 0)} unsure, {result.get('unrealistic', 0)} unrealistic), "
        f"{result['not_flipped']} not "
        f"flipped, {result['abstained']} abstained; wrote {run_dir / 'feedback.sqlite'}"
    )


def annotate_command(args) -> int:
    import os

    from annotation_app import launch

    return launch.serve(args.run_dir, args.port, args.address, args.token or os.environ.get("CFKD_TOKEN", ""))


def feedback_command(args) -> None:
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


def labelstudio_command(args) -> None:
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


def run_command(args) -> None:
    from pipeline import config, runner

    conf = config.load(args.config)
    overrides = {"teacher": args.teacher, "min_labels": args.min_labels}
    feedback = config.to_dict(conf.feedback) | {k: v for k, v in overrides.items() if v is not None}
    conf = config.from_dict(config.to_dict(conf) | {"feedback": feedback})  # checked like a config file
    root = Path(args.run_dir or Path("runs") / conf.name)
    path = runner.run(conf, root, force=args.force, start=args.start, verbose=args.verbose)
    print(f"report: {path}")


def distil_command(args) -> None:
    from pipeline import config, runner

    root = Path(args.run_dir)
    if not (root / "config.yaml").is_file():
        raise UserError(f"{root} is not a run directory (no config.yaml): run `cfkd run` first")
    path = runner.run(config.load(root / "config.yaml"), root, start="distil", verbose=args.verbose)
    print(f"report: {path}")
