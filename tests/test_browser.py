"""One real browser: `cfkd annotate` serves a small run and headless Chromium renders the card."""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from cdp import Browser
from PIL import Image
from test_app import make_run

from pipeline.store import FeedbackStore

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTEFACTS = Path(__file__).resolve().parent / "artifacts"

pytestmark = pytest.mark.skipif(
    CHROMIUM is None and os.environ.get("CI") != "true",
    reason="chromium not installed (.ci/run installs it; CI never skips)",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, seconds: float = 90) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(url)


def test_card_renders_in_a_real_browser(tmp_path):
    run = make_run(tmp_path / "run")
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "annotate", "--run-dir", str(run), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}/?annotator=browser-test"
        _wait(f"http://127.0.0.1:{port}/_stcore/health")
        browser = Browser(CHROMIUM, tmp_path / "profile")
        try:
            dom = browser.open(url, ready=">Undo<")
            time.sleep(2)  # let the images finish loading
            dom, png = browser.dom(), browser.screenshot()
            browser.key("s")  # keyboard-only labelling: S marks the card spurious and shows the next one
            browser.wait(lambda html: "cf-1" in html)
        finally:
            browser.close()
        assert all(f">{label}<" in dom for label in ("True", "Spurious", "Unsure", "Undo"))
        assert dom.count("<img") >= 4  # original, counterfactual, change map, colour bar
        assert "cf-0" in dom
        ARTEFACTS.mkdir(exist_ok=True)
        shot = ARTEFACTS / "annotate_card.png"
        shot.write_bytes(png)
        pixels = np.asarray(Image.open(shot).convert("L"), float)
        assert pixels.std() > 10  # not a blank page
        assert FeedbackStore(run / "feedback.sqlite").labels()[["cf_id", "label"]].values.tolist() == [
            ["cf-0", "spurious"]
        ]
    finally:
        server.terminate()
        server.wait(timeout=30)
