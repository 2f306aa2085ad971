"""``cfkd run``: the stages of a run in order, each skipped when its fingerprint (config + inputs) is unchanged.

data -> data_reference -> classifier -> reference -> evaluate -> dfr -> then for each CFKD round r:
explain (explain/, explain_r<r>/) -> feedback_r<r> -> distil_r<r> (fine-tuned classifier + its evaluation)
-> report. With the human teacher a run stops after explain until the experts have labelled enough.
"""

from __future__ import annotations

import re
import time
from dataclasses import replace
from pathlib import Path

from pipeline import config as cfg
from pipeline import (
    dfr,
    distil,
    evaluate,
    explain,
    feedback,
    generator,
    manifest,
    models,
    report,
    rounds,
    square,
    train,
)
from pipeline.data import FolderData, load_folder
from pipeline.errors import Interrupted, UserError
from pipeline.rundir import RunDir, file_hash, locked, read_json, write_json

STAGES = (
    "data",
    "data_reference",
    "classifier",
    "reference",
    "evaluate",
    "dfr",
    "explain",
    "feedback",
    "distil",
    "report",
)


def stage_kind(name: str) -> str:
    """distil_r2 -> distil: --from and --force act on every round of a stage."""
    match = re.fullmatch(r"(.+)_r\d+", name)
    return match.group(1) if match else name


class Run:
    """One run directory and its resolved config; each stage method returns its fingerprint."""

    def __init__(self, config: cfg.RunConfig, root: Path, redo: set[str], verbose: bool = False, log=print):
        self.config, self.dir, self.redo, self.verbose, self.log = config, RunDir(root), redo, verbose, log
        self.keys: dict[str, str] = {}
        self.trusted: FolderData | None = None  # distil.trusted, loaded by trusted_data

    def _stage(self, name: str, key: str, body) -> str:
        """Run ``body(tmp_folder)`` unless a finished stage with the same key exists."""
        self.keys[name] = key
        if stage_kind(name) not in self.redo and self.dir.finished(name, key):
            self.log(f"[{name}] up to date, skipped")
            return key
        self.log(f"[{name}] running")
        started = time.perf_counter()
        try:
            with self.dir.stage(name, key) as tmp:
                body(tmp)
        except Interrupted as exc:  # the temporary folder is gone; say where the run stopped
            exc.stage = exc.stage or name
            raise
        self.log(f"[{name}] done in {time.perf_counter() - started:.1f} s")
        return key

    # -- data ------------------------------------------------------------------------------------------------
    def data(self) -> FolderData:
        c = self.config.data
        if c.root is None:
            key = cfg.fingerprint("square", c.square)
            self._stage("data", key, lambda tmp: square.generate(tmp, c.square))
            return load_folder(self.dir.path("data"))
        folder = load_folder(c.root)  # validates every row before anything trains on it
        key = cfg.fingerprint("folder", str(folder.root), folder.fingerprint())
        self._stage("data", key, lambda tmp: write_json(tmp / "summary.json", _summary(folder)))
        return folder

    def reference_data(self) -> FolderData | None:
        r, c = self.config.reference, self.config.data
        if not r.enabled or r.weights:
            return None
        if r.root:
            return load_folder(r.root)
        if c.root is not None:
            raise UserError(
                "reference.enabled needs reference.root or reference.weights when data.root is a user dataset"
            )
        unbiased = replace(c.square, poison=r.poison, seed=c.square.seed + 1)  # same kind of data, fresh draw
        self._stage(
            "data_reference", cfg.fingerprint("square", unbiased), lambda tmp: square.generate(tmp, unbiased)
        )
        return load_folder(self.dir.path("data_reference"))

    # -- classifiers -----------------------------------------------------------------------------------------
    def classifier(self, name: str, data: FolderData, weights: str | None) -> str:
        c, d = self.config.classifier, self.config.data
        if weights:
            classes = models.output_classes(c.classes, data.classes)
            key = cfg.fingerprint(name, c.arch, c.mean, c.std, c.preset, d.image_size, d.resize, classes)
            key = cfg.fingerprint(key, file_hash(weights))

            def body(tmp: Path) -> None:
                models.import_weights(
                    weights,
                    c.arch,
                    classes,
                    d.image_size,
                    tmp,
                    c.mean,
                    c.std,
                    c.preset,
                    d.resize,
                    data.grey,
                )

        else:
            key = cfg.fingerprint(name, c, d.image_size, d.resize, data.fingerprint("train"))
            body = lambda tmp: train.run(data, c, d.image_size, tmp, self.verbose, d.resize)  # noqa: E731
        return self._stage(name, key, body)

    def evaluate(self, data: FolderData) -> dict:
        names = [n for n in ("classifier", "reference") if n in self.keys]
        key = cfg.fingerprint("evaluate", [self.keys[n] for n in names], self.keys["data"])

        def body(tmp: Path) -> None:
            for name in names:
                evaluate.run(self.dir.path(name), data, tmp / name, title=name)

        self._stage("evaluate", key, body)
        metrics = {name: read_json(self.dir.path("evaluate") / name / "metrics.json") for name in names}
        for name in names:
            metrics[name]["training"] = models.load_card(self.dir.path(name)).metrics
            metrics[name]["weights"] = models.weights_digest(self.dir.path(name))
        write_json(self.dir.root / "metrics.json", metrics)
        return metrics

    def dfr(self, data: FolderData, reference_data: FolderData | None) -> dict | None:
        """The DFR-style baseline on the biased classifier, evaluated like every other classifier."""
        parts = [self.keys["classifier"], self.keys["data"], self.keys.get("data_reference")]
        key = cfg.fingerprint("dfr", self.config.baseline, *parts)

        def body(tmp: Path) -> None:
            dfr.run(self.dir.path("classifier"), data, reference_data, self.config.baseline, tmp)
            evaluate.run(tmp, data, tmp / "evaluation", title="DFR baseline")

        try:
            self._stage("dfr", key, body)
        except dfr.NoGroups as exc:
            self.log(f"[dfr] skipped: {exc}")
            return None
        return {
            **read_json(self.dir.path("dfr") / "evaluation" / "metrics.json"),
            "fit": self.card_metrics("dfr"),
        }

    # -- CFKD rounds -----------------------------------------------------------------------------------------
    def explain(self, data: FolderData, round: int = 1, model: str = "classifier") -> dict:
        c, gen = self.config.explain, self.config.generator
        c = replace(c, seed=c.seed + round - 1)  # each round explains other images
        name = manifest.folder(round)
        key = cfg.fingerprint(
            "explain", c, gen, generator.fingerprint(gen.source), self.keys[model], self.keys["data"]
        )
        self._stage(name, key, lambda tmp: explain.run(self.dir.path(model), data, c, gen, tmp, self.verbose))
        return read_json(self.dir.path(name) / "desiderata.json")

    def feedback(self, data: FolderData, round: int, require: bool = True) -> bool:
        """Verdicts on the round's counterfactuals into feedback_r<round>/; False while experts still label."""
        f, name, explained = self.config.feedback, f"feedback_r{round}", manifest.folder(round)
        if f.teacher == "human":
            snapshot, need, stale = feedback.progress(self.dir.root, round, f)
            if len(snapshot) < need:
                old = (
                    f" ({stale} earlier verdict(s) were on images explain has since replaced)"
                    if stale
                    else ""
                )
                self.log(
                    f"[feedback] round {round}: {len(snapshot)} of the {need} labels needed{old}; label the "
                    f"counterfactuals, then run the same command again:\n  cfkd annotate --run-dir {self.dir.root}"
                )
                return False
            key = cfg.fingerprint("feedback", f, self.keys[explained], snapshot.to_dict("records"))
        else:
            key = cfg.fingerprint("feedback", f, self.keys[explained], round)
        reference = self.dir.path("reference") if self.config.reference.enabled else None

        def body(tmp: Path) -> None:
            feedback.run(
                self.dir.root,
                round,
                f,
                tmp,
                data.root,
                reference,
                self.config.seed,
                self.config.data.resize,
                require,
            )

        self._stage(name, key, body)
        stale = read_json(self.dir.path(name) / "summary.json").get("stale", 0)
        if stale:
            self.log(
                f"[feedback] round {round}: {stale} verdict(s) were given on counterfactuals this round no longer "
                "shows (explain ran again): kept in the store, not used"
            )
        return True

    def distil(self, data: FolderData, round: int, model: str) -> str:
        """Round ``round``'s distil stage: fine-tune on the verdicts the round policy names; the result and its
        evaluation go to distil_r<round>/."""
        c, name = self.config.distil, f"distil_r{round}"
        taught, start = rounds.taught(c, round), rounds.start(c, model)
        feedback_keys = [self.keys[f"feedback_r{r}"] for r in taught]
        # the trusted set only chooses between the fine-tuned classifiers: setting it retrains none of them
        settings = {k: v for k, v in cfg.to_dict(c).items() if k != "trusted"}
        key = cfg.fingerprint(
            "distil", settings, self.keys[model], self.keys[start], feedback_keys, self.keys["data"]
        )

        cast_attempt = self.config.explain.search.cast_attempt

        def body(tmp: Path) -> None:
            distil.stage(
                self.dir.root,
                taught,
                self.dir.path(start),
                self.dir.path(model),
                data,
                c,
                tmp,
                self.verbose,
                cast_attempt,
                self.config.data.resize,
            )
            evaluate.run(tmp, data, tmp / "evaluation", title=f"after round {round}")

        self._stage(name, key, body)
        return name

    def card_metrics(self, stage: str) -> dict:
        return models.load_card(self.dir.path(stage)).metrics

    def trusted_data(self, data: FolderData) -> FolderData | None:
        """distil.trusted, checked before anything trains: val images, and only classes the classifier knows."""
        root = self.config.distil.trusted
        if not root or not (self.config.distil.enabled and self.config.distil.select):
            return None
        try:
            trusted = load_folder(root)
        except UserError as exc:
            raise UserError(f"distil.trusted: {exc}") from None
        labels = set(trusted.split("val")["label"])
        if not labels:
            raise UserError(f"distil.trusted: {trusted.root} has no 'val' images to choose the result on")
        unknown = sorted(labels - set(data.classes))
        if unknown:
            raise UserError(
                f"distil.trusted: {trusted.root} has labels the classifier does not know: {', '.join(unknown)}"
            )
        return trusted

    def score_on_trusted(self, names: list[str]) -> dict[str, dict]:
        """Accuracy and worst-group accuracy of each named classifier on the trusted set's val split."""
        scores = {}
        for name in names:
            model, card = models.load(self.dir.path(name))
            tested, _ = evaluate.evaluate(model, card, self.trusted, "val")
            scores[name] = {k: tested[k] for k in ("n", "accuracy", "worst_group_accuracy", "worst_group")}
        return scores


def _summary(folder: FolderData) -> dict:
    counts = folder.table.groupby(["split", "label"]).size()
    return {
        "root": str(folder.root),
        "classes": folder.classes,
        "counts": {f"{s}/{label}": int(n) for (s, label), n in counts.items()},
    }


def check_teacher(config: cfg.RunConfig, data: FolderData) -> None:
    """Before anything trains: the simulated teacher has what it judges with."""
    if not (config.explain.enabled and config.distil.enabled) or config.feedback.teacher != "mask":
        return
    if not data.table["feature_mask"].astype(bool).any():
        raise UserError(
            f"feedback.teacher: mask needs a feature_mask column in {data.root / 'metadata.csv'} (white where the "
            "real class evidence is); without masks use feedback.teacher: model (with reference.root or "
            "reference.weights) or human (experts in the app)"
        )


def resolve_redo(force: bool, start: str | None) -> set[str]:
    if force:
        return set(STAGES)
    if start is None:
        return set()
    if start not in STAGES:
        raise UserError(f"--from {start}: unknown stage (stages: {', '.join(STAGES)})")
    return set(STAGES[STAGES.index(start) :])


def run(
    config: cfg.RunConfig,
    root: Path,
    force: bool = False,
    start: str | None = None,
    verbose: bool = False,
    log=print,
) -> Path:
    """Every stage of the default pipeline, holding the run directory's lock; returns the path of report.html."""
    with locked(root):
        return _run_stages(Run(config, root, resolve_redo(force, start), verbose, log))


def _run_stages(r: Run) -> Path:
    config = r.config
    cfg.dump(config, r.dir.root / "config.yaml")
    data = r.data()
    check_teacher(config, data)
    r.trusted = r.trusted_data(data)
    reference_data = r.reference_data()
    r.classifier("classifier", data, config.classifier.weights)
    if config.reference.enabled:
        r.classifier("reference", reference_data or data, config.reference.weights)
    metrics = r.evaluate(data)
    if config.baseline.dfr:
        metrics["dfr"] = r.dfr(data, reference_data)
        if metrics["dfr"] is not None:
            metrics["dfr"]["gain"] = rounds.gain(metrics["dfr"], metrics)
    finished = True
    if config.explain.enabled:
        metrics["explain"] = r.explain(data)
        write_json(r.dir.root / "metrics.json", metrics)
        if config.distil.enabled:
            finished = rounds.run(r, data, metrics)
    metrics["status"] = "complete" if finished else "waiting for feedback"
    write_json(r.dir.root / "metrics.json", metrics)
    path = report.write(r.dir.root, data)
    r.log(f"[report] {path}")
    return path
