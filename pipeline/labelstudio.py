"""Label Studio interop: a round as a Label Studio import (tasks + labelling config), and Label Studio's JSON export
merged back into the feedback store as label events.

The tasks carry their images inline (PNG data URLs), so the file imports into any Label Studio project without
storage set-up; ``data`` keeps the counterfactual id and round, so each verdict comes back to the exact image it was
given on. The import is all-or-none and idempotent: an annotation's event id is derived from its task, its id and
its last update, so importing the same export twice adds nothing, and an annotation changed in Label Studio later
comes back as a newer event that wins.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from pipeline import change_maps, manifest
from pipeline.errors import UserError
from pipeline.store import KEYS, LABELS, MAX_LISTED, MEANINGS, FeedbackStore, event_time


def label_config() -> str:
    """The Label Studio labelling interface: the four pictures and one required choice among the four verdicts."""
    choices = "\n".join(
        f'    <Choice value="{label}" hotkey="{KEYS[label].lower()}" hint="{MEANINGS[label]}"/>'
        for label in LABELS
    )
    return f"""<View>
  <Header value="$pair"/>
  <View style="display: flex; gap: 8px">
    <Image name="original" value="$original" zoom="true"/>
    <Image name="counterfactual" value="$counterfactual" zoom="true"/>
    <Image name="brightness_change" value="$difference"/>
    <Image name="colour_change" value="$colour_change"/>
  </View>
  <Choices name="verdict" toName="counterfactual" choice="single" showInLine="true" required="true">
{choices}
  </Choices>
</View>
"""


def _data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def tasks(run_dir: Path, round: int, partial: float = 1.0) -> list[dict]:
    """One task per counterfactual of the round a verdict is for (``manifest.judged``)."""
    folder = Path(run_dir) / manifest.folder(round)
    table = manifest.judged(manifest.read(folder), partial)
    out = []
    for row in table.itertuples():
        paths = {k: folder / getattr(row, k) for k in ("original", "counterfactual", "difference")}
        out.append(
            {
                "data": {
                    "cf_id": row.id,
                    "round": round,
                    "pair": f"{row.source_class} -> {row.target_class}, attempt {row.attempt}",
                    **{k: _data_url(p.read_bytes()) for k, p in paths.items()},
                    "colour_change": _data_url(
                        change_maps.colour_change_png(paths["original"], paths["counterfactual"])
                    ),
                }
            }
        )
    return out


def export(run_dir: Path, round: int, path: Path, partial: float = 1.0) -> tuple[int, Path]:
    """Write the round's tasks to ``path`` (JSON) and the labelling config beside it (.xml)."""
    path = Path(path)
    if not path.parent.is_dir():
        raise UserError(f"cannot export to {path}: folder {path.parent} does not exist")
    found = tasks(run_dir, round, partial)
    if not found:
        raise UserError(f"round {round} of {run_dir} has no counterfactual that flipped the classifier")
    path.write_text(json.dumps(found))
    config = path.with_suffix(".xml")
    config.write_text(label_config())
    return len(found), config


def _annotator(annotation: dict) -> str:
    who = annotation.get("completed_by")
    if isinstance(who, dict):
        who = who.get("email") or who.get("username") or who.get("id")
    if who is None or str(who).strip() == "":
        raise ValueError("no completed_by (the Label Studio user)")
    return f"labelstudio:{'user-' + str(who) if isinstance(who, int) else str(who).strip()}"


def _verdict(annotation: dict) -> str | None:
    """The one verdict of an annotation, None for one without a choice (skipped in Label Studio)."""
    picked = [
        choice
        for result in annotation.get("result") or []
        if result.get("type") == "choices"
        for choice in (result.get("value") or {}).get("choices") or []
    ]
    if not picked:
        return None
    if len(picked) > 1:
        raise ValueError(f"{len(picked)} verdicts {picked}: expected one")
    if picked[0] not in LABELS:
        raise ValueError(f"verdict '{picked[0]}': expected one of {', '.join(LABELS)}")
    return picked[0]


def _event(task: dict, annotation: dict, known: dict[str, int]) -> dict | None:
    data = task.get("data") or {}
    cf_id = str(data.get("cf_id") or "").strip()
    if not cf_id:
        raise ValueError("the task has no data.cf_id (was it exported by cfkd?)")
    if cf_id not in known:
        raise ValueError(f"unknown counterfactual '{cf_id}'")
    if str(data.get("round", known[cf_id])) != str(known[cf_id]):
        raise ValueError(f"'{cf_id}' belongs to round {known[cf_id]}, not {data.get('round')}")
    label = _verdict(annotation)
    if label is None or annotation.get("was_cancelled"):
        return None
    when = event_time(annotation.get("updated_at") or annotation.get("created_at") or "")
    return {
        "event_id": f"labelstudio-{task.get('id')}-{annotation.get('id')}-{when}",
        "cf_id": cf_id,
        "round": known[cf_id],
        "annotator": _annotator(annotation),
        "label": label,
        "comment": "Label Studio",
        "created_at": when,
    }


def import_export(run_dir: Path, path: Path) -> tuple[int, int]:
    """Merge a Label Studio JSON export into the run's store: (events added, annotations without a verdict). Every
    annotation is checked first; any problem is named by task and annotation, and nothing is imported."""
    path = Path(path)
    try:
        exported = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read Label Studio export {path}: {exc}") from None
    if not isinstance(exported, list):
        raise UserError(f"{path}: a Label Studio JSON export is a list of tasks")
    known = {i: r for r in manifest.rounds(run_dir) for i in manifest.read_round(run_dir, r)["id"]}
    events, problems, skipped = [], [], 0
    for n, task in enumerate(exported, start=1):
        if not isinstance(task, dict):
            problems.append(f"task {n}: not a task object")
            continue
        for annotation in task.get("annotations") or []:
            try:
                event = _event(task, annotation, known)
            except (ValueError, TypeError, AttributeError) as exc:
                problems.append(f"task {task.get('id', n)}, annotation {annotation.get('id', '?')}: {exc}")
                continue
            skipped += event is None
            events += [event] if event else []
    if problems:
        more = f"; ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise UserError(
            f"{path}: {len(problems)} bad annotation(s), nothing imported: {'; '.join(problems[:MAX_LISTED])}{more}"
        )
    return FeedbackStore(Path(run_dir) / "feedback.sqlite").add_many(events), skipped
