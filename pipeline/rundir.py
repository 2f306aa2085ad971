"""The run directory contract: one folder per stage, written under a temporary name and renamed when complete;
a finished stage whose fingerprint (config + inputs) matches is skipped. One process at a time works in a run
directory: it holds an OS file lock for the whole run."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import filelock

from pipeline.errors import UserError

DONE = "stage.json"  # written last inside a stage folder: its fingerprint and summary
LOCK, HOLDER = (
    ".lock",
    ".lock.pid",
)  # the OS lock, and who holds it (apart: opening the lock file truncates it)


def write_json(path: Path, obj) -> None:
    """Write JSON atomically (temporary file in the same folder, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
        json.dump(obj, tmp, indent=2)
    os.replace(tmp.name, path)


def file_hash(path: str | Path) -> str:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}") from None


def data_root(run_dir: str | Path, root: str | None) -> Path:
    """A run's data folder: the config's ``data.root``, or, when it names none, the one the run generated."""
    return Path(root) if root else Path(run_dir) / "data"


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, stage: str) -> Path:
        return self.root / stage

    def finished(self, stage: str, key: str) -> bool:
        marker = self.path(stage) / DONE
        try:
            return read_json(marker).get("key") == key
        except (FileNotFoundError, json.JSONDecodeError):
            return False

    @contextmanager
    def stage(self, stage: str, key: str) -> Iterator[Path]:
        """Yield a fresh temporary folder; on success mark it with ``key`` and move it into place."""
        for stale in self.root.glob(f".{stage}.tmp-*"):  # left by a killed run: never trusted
            shutil.rmtree(stale, ignore_errors=True)
        tmp = self.root / f".{stage}.tmp-{os.getpid()}"
        tmp.mkdir()
        try:
            yield tmp
            write_json(tmp / DONE, {"stage": stage, "key": key})
            final = self.path(stage)
            if final.exists():
                old = self.root / f".{stage}.old-{os.getpid()}"
                final.rename(old)
                shutil.rmtree(old)
            tmp.rename(final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def locked(root: str | Path) -> Iterator[None]:
    """Hold the run directory's lock (released by the OS even when the process is killed); a second run on the
    same directory stops at once, naming the holder."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(root / LOCK)
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        try:
            holder = f"PID {(root / HOLDER).read_text().strip()}"
        except OSError:
            holder = "another process"
        raise UserError(
            f"run directory {root} is in use by another cfkd run ({holder}); wait for it to finish or stop it"
        ) from None
    try:
        (root / HOLDER).write_text(str(os.getpid()))
        yield
    finally:
        lock.release()
