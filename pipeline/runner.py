"""``cfkd run``: the stages of a run in order, each skipped when its fingerprint (config + inputs) is unchanged.

data -> data_reference -> classifier -> reference -> evaluate -> explain -> report
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from pipeline import config as cfg
from pipeline import evaluate, explain, generator, models, report, square, train
from pipeline.data import FolderData, load_folder
from pipeline.errors import UserError
from pipeline.rundir import RunDir, file_hash, read_json, write_json

STAGES = ("data", "data_reference", "classifier", "reference", "evaluate", "explain", "report")


class Run:
    """One run directory and its resolved config; each stage method returns its fingerprint."""

    def __init__(self, config: cfg.RunConfig, root: Path, redo: set[str], verbose: bool = False, log=print):
        self.config, self.dir, self.redo, self.verbose, self.log = config, RunDir(root), redo, verbose, log
        self.keys: dict[str, str] = {}

    def _stage(self, name: str, key: str, body) -> str:
        """Run ``body(tmp_folder)`` unless a finished stage with the same key exists."""
        self.keys[name] = key
        if name not in self.redo and self.dir.finished(name, key):
            self.log(f"[{name}] up to date, skipped")
            return key
        self.log(f"[{name}] running")
        started = time.perf_counter()
        with self.dir.stage(name, key) as tmp:
            body(tmp)
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
        c, size = self.config.classifier, self.config.data.image_size
        if weights:
            key = cfg.fingerprint(name, c.arch, size, data.classes, file_hash(weights))
            body = lambda tmp: models.import_weights(weights, c.arch, data.classes, size, tmp)  # noqa: E731
        else:
            key = cfg.fingerprint(name, c, size, data.fingerprint("train"))
            body = lambda tmp: train.run(data, c, size, tmp, self.verbose)  # noqa: E731
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
        write_json(self.dir.root / "metrics.json", metrics)
        return metrics

    def explain(self, data: FolderData) -> dict:
        c, gen = self.config.explain, self.config.generator
        key = cfg.fingerprint(
            "explain", c, gen, generator.fingerprint(gen.source), self.keys["classifier"], self.keys["data"]
        )
        self._stage(
            "explain",
            key,
            lambda tmp: explain.run(self.dir.path("classifier"), data, c, gen, tmp, self.verbose),
        )
        return read_json(self.dir.path("explain") / "desiderata.json")


def _summary(folder: FolderData) -> dict:
    counts = folder.table.groupby(["split", "label"]).size()
    return {
        "root": str(folder.root),
        "classes": folder.classes,
        "counts": {f"{s}/{label}": int(n) for (s, label), n in counts.items()},
    }


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
    """Every stage of the default pipeline; returns the path of report.html."""
    r = Run(config, root, resolve_redo(force, start), verbose, log)
    cfg.dump(config, r.dir.root / "config.yaml")
    data = r.data()
    reference_data = r.reference_data()
    r.classifier("classifier", data, config.classifier.weights)
    if config.reference.enabled:
        r.classifier("reference", reference_data or data, config.reference.weights)
    metrics = r.evaluate(data)
    if config.explain.enabled:
        metrics["explain"] = r.explain(data)
        write_json(r.dir.root / "metrics.json", metrics)
    path = report.write(r.dir.root, data)
    log(f"[report] {path}")
    return path
