"""`cfkd annotate`: start the Streamlit app on a run as a child process and supervise it (no torch here).

The port is checked first, so a taken port is one error line rather than a server that never starts; a stop
signal for this process is passed on to the server, so it never serves on alone."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from pipeline.errors import UserError

APP = Path(__file__).resolve().parent / "app.py"


def port_free(address: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET) as probe:
        try:
            probe.bind((address, port))
        except OSError:
            return False
    return True


def serve(run_dir: str | Path, port: int, address: str, token: str = "") -> int:
    """Run the app until it ends or a stop signal arrives; the exit code as a shell reports it."""
    run_dir = Path(run_dir).resolve()
    if not run_dir.is_dir():
        raise UserError(f"run directory not found: {run_dir}")
    if not port_free(address, port):
        raise UserError(f"port {port} on {address} is in use: stop what holds it or choose --port")
    env = {**os.environ, "CFKD_RUN_DIR": str(run_dir)}
    if token:
        env["CFKD_TOKEN"] = token
    command = [sys.executable, "-m", "streamlit", "run", str(APP), "--server.port", str(port)]
    command += [
        "--server.headless",
        "true",
        "--browser.gatherUsageStats",
        "false",
        "--client.toolbarMode",
        "minimal",  # no Deploy button or developer menu: the expert sees the review, nothing else
        "--server.address",
        address,
    ]
    print(f"annotation app for {run_dir}: http://{address}:{port}" + ("/?token=..." if token else ""))
    server, stopped = subprocess.Popen(command, env=env), []

    def forward(signum, frame):
        stopped.append(signum)
        server.send_signal(signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, forward)
    code = server.wait()
    if stopped:
        print(f"annotation app stopped ({signal.Signals(stopped[0]).name})", file=sys.stderr)
        return 128 + stopped[0]
    return 128 - code if code < 0 else code  # the server killed by signal N: 128 + N
