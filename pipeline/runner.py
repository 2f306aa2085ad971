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

import pandas as pd

from pipeline import config as cfg
from pipeline import dfr, distil, evaluate, explain, generator, models, report, square, teach, train
from pipeline.data import FolderData, load_folder
from pipeline.errors import UserError
from pipeline.feedback import FeedbackStore
from pipeline.rundir import RunDir, file_hash, read_json, write_json

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


def verdict_table(root: Path, round: int, use_true: bool) -> pd.DataFrame:
    """A finished round's usable counterfactuals with their training labels; paths relative to the run directory."""
    folder = explain.folder(round)
    verdicts = pd.read_csv(root / f"feedback_r{round}" / "verdicts.csv", dtype=str)
    manifest = explain.read_manifest(root / folder / "manifest.csv")
    table = distil.training_set(manifest, verdicts, use_true)
    paths = {column: folder + "/" + table[column] for column in ("counterfactual", "original")}
    return table.assign(**paths, round=round)


class Run:
    """One run directory and its resolved config; each stage method returns its fingerprint."""

    def __init__(self, config: cfg.RunConfig, root: Path, redo: set[str], verbose: bool = False, log=print):
        self.config, self.dir, self.redo, self.verbose, self.log = config, RunDir(root), redo, verbose, log
        self.keys: dict[str, str] = {}

    def _stage(self, name: str, key: str, body) -> str:
        """Run ``body(tmp_folder)`` unless a finished stage with the same key exists."""
        self.keys[name] = key
        if stage_kind(name) not in self.redo and self.dir.finished(name, key):
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
            "fit": _card_metrics(self, "dfr"),
        }

    # -- CFKD rounds -----------------------------------------------------------------------------------------
    def explain(self, data: FolderData, round: int = 1, model: str = "classifier") -> dict:
        c, gen = self.config.explain, self.config.generator
        c = replace(c, seed=c.seed + round - 1)  # each round explains other images
        name = explain.folder(round)
        key = cfg.fingerprint(
            "explain", c, gen, generator.fingerprint(gen.source), self.keys[model], self.keys["data"]
        )
        self._stage(name, key, lambda tmp: explain.run(self.dir.path(model), data, c, gen, tmp, self.verbose))
        return read_json(self.dir.path(name) / "desiderata.json")

    def feedback(self, data: FolderData, round: int) -> bool:
        """Verdicts on the round's counterfactuals into feedback_r<round>/; False while experts still label."""
        f, name, explained = self.config.feedback, f"feedback_r{round}", explain.folder(round)
        store = FeedbackStore(self.dir.root / "feedback.sqlite")
        manifest = explain.read_manifest(self.dir.path(explained) / "manifest.csv")
        if f.teacher == "human":
            verdicts = _decided(store.consensus(round, f.min_votes), manifest)
            if len(verdicts) < f.min_labels:
                self.log(
                    f"[feedback] round {round}: {len(verdicts)} of the {f.min_labels} labels needed; label the "
                    f"counterfactuals, then run the same command again:\n  cfkd annotate --run-dir {self.dir.root}"
                )
                return False
            key = cfg.fingerprint("feedback", f, self.keys[explained], verdicts.to_dict("records"))
        else:
            key = cfg.fingerprint("feedback", f, self.keys[explained], round)

        def body(tmp: Path) -> None:
            if f.teacher != "human":
                reference = self.dir.path("reference") if self.config.reference.enabled else None
                teach.run(
                    self.dir.root, f.teacher, data.root, reference, f.noise, round, self.config.seed, f.band
                )
            verdicts = _decided(store.consensus(round, f.min_votes), manifest)
            verdicts.to_csv(tmp / "verdicts.csv", index=False)
            write_json(tmp / "summary.json", feedback_summary(verdicts, manifest))

        self._stage(name, key, body)
        return True

    def distil(self, data: FolderData, round: int, model: str) -> str:
        """Fine-tune on the verdicts of this round (and, with distil.accumulate, of every earlier one) the
        ``model`` it explained, or with distil.start = initial the run's first classifier; the result and its
        evaluation go to distil_r<round>/."""
        c, name = self.config.distil, f"distil_r{round}"
        taught = range(1, round + 1) if c.accumulate else [round]
        start = model if c.start == "latest" else "classifier"
        feedback_keys = [self.keys[f"feedback_r{r}"] for r in taught]
        key = cfg.fingerprint(
            "distil", c, self.keys[model], self.keys[start], feedback_keys, self.keys["data"]
        )

        def body(tmp: Path) -> None:
            tables = [verdict_table(self.dir.root, r, c.use_true) for r in taught]
            fit, held = distil.split_holdout(pd.concat(tables, ignore_index=True), c.holdout, c.seed + round)
            pd.concat([fit.assign(use="train"), held.assign(use="select")]).to_csv(
                tmp / "training_set.csv", index=False
            )
            # Nothing new to teach (this round's counterfactuals were all judged true, or none flipped): the
            # classifier goes on unchanged; fitting again on earlier rounds' verdicts only overfits them.
            if fit.empty or tables[-1].empty:
                classifier, card = models.load(self.dir.path(model))
                models.save(classifier, replace(card, metrics={"skipped": "no new usable verdicts"}), tmp)
            else:
                distil.run(self.dir.path(start), data, fit, held, self.dir.root, c, tmp, self.verbose)
            evaluate.run(tmp, data, tmp / "evaluation", title=f"after round {round}")

        self._stage(name, key, body)
        return name

    def rounds(self, data: FolderData, before: dict) -> tuple[list[dict], bool]:
        """explain -> feedback -> distil -> evaluate, config.distil.rounds times; (per-round metrics, finished)."""
        model, results = "classifier", []
        for n in range(1, self.config.distil.rounds + 1):
            described = self.explain(data, n, model)
            if not self.feedback(data, n):
                return results, False
            model = self.distil(data, n, model)
            results.append(self.round_metrics(n, described, before))
        return results, True

    def closing(self, data: FolderData, rounds: list[dict]) -> dict | None:
        """distil.select: explain and judge the last classifier once more (a round without distil); None while
        experts still label it."""
        n = len(rounds) + 1
        described = self.explain(data, n, rounds[-1]["model"])
        if not self.feedback(data, n):
            return None
        fed = read_json(self.dir.path(f"feedback_r{n}") / "summary.json")
        return {"round": n, "explained": rounds[-1]["model"], "flip_rate": described["validity"], **fed}

    def round_metrics(self, n: int, described: dict, before: dict) -> dict:
        tested = read_json(self.dir.path(f"distil_r{n}") / "evaluation" / "metrics.json")
        fed = read_json(self.dir.path(f"feedback_r{n}") / "summary.json")
        return {
            "round": n,
            "model": f"distil_r{n}",
            "explained": "classifier" if n == 1 else f"distil_r{n - 1}",
            "flip_rate": described["validity"],
            **fed,
            "training": _card_metrics(self, f"distil_r{n}"),
            "test_accuracy": tested["accuracy"],
            "worst_group_accuracy": tested["worst_group_accuracy"],
            "worst_group": tested["worst_group"],
            "per_group": {g: v["accuracy"] for g, v in tested["per_group"].items()},
            "gain": gain(tested, before),
        }


def _card_metrics(r: Run, stage: str) -> dict:
    return models.load_card(r.dir.path(stage)).metrics


def _decided(consensus: pd.DataFrame, manifest: pd.DataFrame) -> pd.DataFrame:
    """Consensus labels of this round's counterfactuals, unsure ones left out."""
    mine = consensus[consensus["cf_id"].isin(manifest["id"]) & (consensus["label"] != "unsure")]
    return mine.reset_index(drop=True)


def feedback_summary(verdicts: pd.DataFrame, manifest: pd.DataFrame) -> dict:
    """Counts per label and feedback accuracy = true / (true + spurious), label-free (DESIGN.md)."""
    counts = verdicts["label"].value_counts()
    true, spurious = int(counts.get("true", 0)), int(counts.get("spurious", 0))
    return {
        "counterfactuals": int(len(manifest)),
        "flipped": int(manifest["success"].sum()),
        "labels": {"true": true, "spurious": spurious, "unsure": int(len(manifest) - true - spurious)},
        "feedback_accuracy": true / (true + spurious) if true + spurious else None,
    }


def gain(after: dict, before: dict) -> dict | None:
    """Share of the gap between the biased and the reference classifier that a correction closes."""
    if "reference" not in before:
        return None
    out = {}
    for key in ("accuracy", "worst_group_accuracy"):
        gap = before["reference"][key] - before["classifier"][key]
        out[key] = (after[key] - before["classifier"][key]) / gap if abs(gap) > 1e-9 else None
    return out


def select(metrics: dict) -> dict:
    """The classifier whose counterfactuals the teacher judged true most often (feedback accuracy, which needs no
    test labels; DESIGN.md). An earlier round wins a tie: as good a judgement with less fine-tuning drift. Its test
    figures come along for the report only."""
    judged = report.judged(metrics)
    names = ["classifier", *(r["model"] for r in metrics["rounds"])]
    scores = [
        (j["feedback_accuracy"], -i) for i, j in enumerate(judged) if j["feedback_accuracy"] is not None
    ]
    best = -max(scores)[1] if scores else len(names) - 1
    tested = metrics["classifier"] if best == 0 else metrics["rounds"][best - 1]
    return {
        "model": names[best],
        "round": best,
        "feedback_accuracy": judged[best]["feedback_accuracy"],
        "test_accuracy": tested.get("accuracy", tested.get("test_accuracy")),
        "worst_group_accuracy": tested["worst_group_accuracy"],
    }


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
    if config.baseline.dfr:
        metrics["dfr"] = r.dfr(data, reference_data)
        if metrics["dfr"] is not None:
            metrics["dfr"]["gain"] = gain(metrics["dfr"], metrics)
    finished = True
    if config.explain.enabled:
        metrics["explain"] = r.explain(data)
        write_json(r.dir.root / "metrics.json", metrics)
        if config.distil.enabled:
            metrics["rounds"], finished = r.rounds(data, metrics)
            if finished and config.distil.select:
                metrics["closing"] = r.closing(data, metrics["rounds"])
                finished = metrics["closing"] is not None
                if finished:
                    metrics["selected"] = select(metrics)
    metrics["status"] = "complete" if finished else "waiting for feedback"
    write_json(r.dir.root / "metrics.json", metrics)
    path = report.write(r.dir.root, data)
    log(f"[report] {path}")
    return path
