"""Stop signals, as a scheduler, a container or Ctrl-C sends them, to the real ``cfkd`` process: the run stops
promptly with one line naming the stage, leaves no half-written stage, releases its lock, and a rerun resumes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import tiny_config

from pipeline import config

CFKD = [sys.executable, "-m", "pipeline.cli"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _start(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        CFKD + argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        start_new_session=True,
    )


def _wait_for_line(process: subprocess.Popen, text: str, limit: float = 240) -> None:
    deadline = time.monotonic() + limit
    for line in process.stdout:
        if text in line:
            return
        assert time.monotonic() < deadline, f"no '{text}' in time"
    pytest.fail(f"the run ended before '{text}': {process.stderr.read()}")


def _stop(process: subprocess.Popen, signum: int, limit: float = 60) -> tuple[int, str]:
    process.send_signal(signum)
    try:
        _, err = process.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"still running {limit} s after {signal.Signals(signum).name}")
    return process.returncode, err


def _write(conf: config.RunConfig, path: Path) -> Path:
    config.dump(conf, path)
    return path


def _start_run(tmp_path: Path, overrides: dict) -> subprocess.Popen:
    """`cfkd run` on the tiny config with ``overrides``, into tmp_path/run."""
    config_file = _write(tiny_config(**overrides), tmp_path / "a.yaml")
    return _start(["run", "--config", str(config_file), "--run-dir", str(tmp_path / "run")])


def test_sigterm_during_explain_stops_cleanly_and_a_rerun_resumes(tmp_path, tiny_codec):
    long = {"explain.enabled": True, "explain.per_pair": 4, "explain.search.steps": 5000}
    long |= {"explain.search.patience": 5000, "generator.source": str(tiny_codec), "distil.enabled": False}
    run = _start_run(tmp_path, long)
    _wait_for_line(run, "[explain] running")
    time.sleep(3)  # inside Lightning's predict loop
    code, err = _stop(run, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM
    assert err.strip().splitlines() == ["interrupted in stage explain (SIGTERM); rerun to resume"]
    assert not list((tmp_path / "run").glob(".*.tmp-*")) and not (tmp_path / "run" / "explain").exists()

    short = long | {"explain.search.steps": 3, "explain.per_pair": 1}
    rerun = subprocess.run(
        CFKD
        + [
            "run",
            "--config",
            str(_write(tiny_config(**short), tmp_path / "b.yaml")),
            "--run-dir",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=600,
    )
    assert rerun.returncode == 0, rerun.stderr
    assert "[classifier] up to date, skipped" in rerun.stdout and "[explain] done" in rerun.stdout


def test_sigint_during_training_stops_cleanly_and_frees_the_run_directory(tmp_path):
    conf = _write(tiny_config(**{"classifier.epochs": 500}), tmp_path / "a.yaml")
    run = _start(["run", "--config", str(conf), "--run-dir", str(tmp_path / "run")])
    _wait_for_line(run, "[classifier] running")
    time.sleep(3)  # inside Lightning's fit loop
    code, err = _stop(run, signal.SIGINT)
    assert code == 128 + signal.SIGINT
    assert err.strip().splitlines() == ["interrupted in stage classifier (SIGINT); rerun to resume"]
    assert not list((tmp_path / "run").glob(".*.tmp-*")) and not (tmp_path / "run" / "classifier").exists()
    from pipeline.rundir import locked

    with locked(tmp_path / "run"):  # the lock went with the process
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serving(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_annotate_refuses_a_busy_port_and_takes_its_server_down_on_sigterm(tmp_path):
    (tmp_path / "run").mkdir()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = subprocess.run(
            CFKD + ["annotate", "--run-dir", str(tmp_path / "run"), "--port", str(port)],
            capture_output=True,
            text=True,
            env=ENV,
            timeout=60,
        )
    assert busy.returncode == 2 and busy.stderr.strip().splitlines() == [
        f"error: port {port} on 127.0.0.1 is in use: stop what holds it or choose --port"
    ]

    port = _free_port()
    app = _start(["annotate", "--run-dir", str(tmp_path / "run"), "--port", str(port)])
    deadline = time.monotonic() + 90
    while not _serving(port):
        assert time.monotonic() < deadline and app.poll() is None, "the app did not start"
        time.sleep(0.5)
    code, _ = _stop(app, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM
    deadline = time.monotonic() + 10
    while _serving(port):  # the server went with it
        assert time.monotonic() < deadline, "the Streamlit server is still serving"
        time.sleep(0.2)


def _workers(root: int) -> set[int]:
    """Processes multiprocessing's spawn started (Lightning's DDP workers) below process ``root``: only this run's,
    so DDP tests running side by side (pytest -n) do not count each other's."""
    parents, forks = {}, set()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            # the parent pid is the 2nd field after the parenthesised command name
            parents[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if b"--multiprocessing-fork" in (proc / "cmdline").read_bytes():
                forks.add(int(proc.name))
        except (OSError, ValueError, IndexError):
            continue

    def below_root(pid: int) -> bool:
        while pid > 1:
            pid = parents.get(pid, 0)
            if pid == root:
                return True
        return False

    return {pid for pid in forks if below_root(pid)}


def _alive(pids: set[int]) -> set[int]:
    """Those of ``pids`` still running as spawned workers (a dead one's pid may be reused by another process)."""
    alive = set()
    for pid in pids:
        try:
            if b"--multiprocessing-fork" in Path(f"/proc/{pid}/cmdline").read_bytes():
                alive.add(pid)
        except OSError:
            continue
    return alive


def test_sigterm_under_ddp_stops_the_workers_too(tmp_path, tiny_codec):
    long = {
        "explain.enabled": True,
        "explain.per_pair": 4,
        "explain.search.steps": 5000,
        "explain.devices": 2,
    }
    long |= {
        "explain.accelerator": "cpu",
        "explain.search.patience": 5000,
        "generator.source": str(tiny_codec),
    }
    run = _start_run(tmp_path, long)
    _wait_for_line(run, "[explain] running")
    deadline = time.monotonic() + 120
    while len(workers := _workers(run.pid)) < 2:  # both DDP workers are up
        assert time.monotonic() < deadline and run.poll() is None, "no DDP workers"
        time.sleep(0.5)
    time.sleep(5)
    code, err = _stop(run, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM
    assert err.strip().splitlines() == ["interrupted in stage explain (SIGTERM); rerun to resume"]
    deadline = time.monotonic() + 10
    while _alive(workers):  # orphans would be re-parented: follow the pids seen, not the tree
        assert time.monotonic() < deadline, "DDP workers outlived the run"
        time.sleep(0.2)
    assert not list((tmp_path / "run").glob(".*.tmp-*"))
