"""One real browser: `cfkd annotate` serves a small run and headless Chromium renders the card."""

import os
import re
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
from test_app import make_clustered_run

from annotation_app import services
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


def _shown(html: str) -> str | None:
    """The id of the card on screen (the card header ends in it, as inline code)."""
    found = re.search(r"<code[^>]*>(cf-\d+)</code>", html)
    return found.group(1) if found else None


def test_the_card_works_from_the_keyboard_in_a_real_browser(tmp_path):
    """S labels and moves on, R (which Streamlit keeps for itself) rejects as unrealistic, the left arrow goes back,
    A gives the card's verdict to its cluster; the screenshot is the card at 1280 x 800."""
    run = make_clustered_run(tmp_path / "run")
    groups = services.change_clusters(services.load_round(run, 1).manifest)
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "annotate", "--run-dir", str(run), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    store = FeedbackStore(run / "feedback.sqlite")
    mine = lambda: store.labels().set_index("cf_id")["label"].to_dict()  # noqa: E731
    try:
        url = f"http://127.0.0.1:{port}/?annotator=browser-test"
        _wait(f"http://127.0.0.1:{port}/_stcore/health")
        browser = Browser(CHROMIUM, tmp_path / "profile", width=1280, height=800)
        try:
            dom = browser.open(url, ready=">Undo<")
            time.sleep(2)  # let the images finish loading
            dom, png = browser.dom(), browser.screenshot()
            first = _shown(dom)
            browser.key("s")  # keyboard-only labelling: S marks the card spurious and shows the next one
            second = _shown(browser.wait(lambda html: _shown(html) not in (None, first)))
            browser.key("r")
            browser.wait(lambda html: _shown(html) not in (None, first, second))
            _until(lambda: mine().get(second) == "unrealistic")
            _press(browser, "ArrowLeft", lambda html: _shown(html) == second and _apply_enabled(html))
            time.sleep(0.5)  # the re-rendered button takes its shortcut a moment after it shows
            browser.key("a")
            members = groups.index[
                (groups["cluster"] == groups.at[second, "cluster"]) & (groups.index != second)
            ]
            _until(lambda: all(mine().get(m) == "unrealistic" for m in members if m != first))
        finally:
            browser.close()
        assert all(f">{label}<" in dom for label in ("True", "Spurious", "Unsure", "Unrealistic (R)", "Undo"))
        assert dom.count("<img") >= 6  # original, counterfactual, two change maps and their scales
        assert first in set(groups.index[groups["representative"]])  # the queue starts with a representative
        assert "Deploy" not in dom and "Cards left for you" in dom
        labelled = mine()
        assert labelled[first] == "spurious" and labelled[second] == "unrealistic"
        assert len(labelled) == 2 + sum(m != first for m in members)
        ARTEFACTS.mkdir(exist_ok=True)
        shot = ARTEFACTS / "annotate_card.png"
        shot.write_bytes(png)
        pixels = np.asarray(Image.open(shot).convert("L"), float)
        assert pixels.std() > 10 and pixels.shape == (800, 1280)  # not a blank page; the screen asked for
    finally:
        server.terminate()
        server.wait(timeout=30)


def _press(browser: Browser, key: str, reached, tries: int = 3) -> str:
    """Press ``key`` until the page shows what it should: a key pressed while Streamlit is still re-rendering the
    last answer's buttons can come before their shortcuts are bound again, and a person then presses once more (a
    clean CI run once lost the arrow that way: the card never went back)."""
    for _ in range(tries - 1):
        browser.key(key)
        try:
            return browser.wait(reached, timeout=10)
        except TimeoutError:
            pass
    browser.key(key)
    return browser.wait(reached)


def _apply_enabled(html: str) -> bool:
    at = html.find("Apply to cluster")
    button = html[html.rfind("<button", 0, at) : at]
    return at > 0 and "disabled" not in button


def _until(condition, seconds: float = 15) -> None:
    """Wait for the store to show what the browser did (the click's write lands a moment after the render)."""
    deadline = time.time() + seconds
    while not condition():
        if time.time() > deadline:
            raise TimeoutError("the store never showed the expected verdicts")
        time.sleep(0.1)
