"""A minimal Chrome DevTools Protocol client (the websockets package): open a page in
headless Chromium, wait for it to render for real (Streamlit draws over a websocket), read the DOM, screenshot."""

from __future__ import annotations

import base64
import json
import subprocess
import time
import urllib.request
from pathlib import Path

from websockets.sync.client import connect

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-sync",
    "--disable-background-networking",
    "--disable-component-update",
    "--hide-scrollbars",
]


def _session(ws_url: str, url: str, ready: str, timeout: float, width: int, height: int) -> tuple[str, bytes]:
    with connect(ws_url, max_size=64 * 1024 * 1024) as ws:
        counter = 0

        def call(method, **params):
            nonlocal counter
            counter += 1
            ws.send(json.dumps({"id": counter, "method": method, "params": params}))
            while True:
                message = json.loads(ws.recv())
                if message.get("id") == counter:
                    return message.get("result", {})

        def dom() -> str:
            return call("Runtime.evaluate", expression="document.documentElement.outerHTML")["result"][
                "value"
            ]

        call(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )
        call("Page.navigate", url=url)
        deadline, html = time.time() + timeout, ""
        while time.time() < deadline and ready not in html:  # poll until the app has drawn what we wait for
            time.sleep(0.5)
            html = dom()
        time.sleep(2)  # let the images finish loading
        html = dom()
        shot = base64.b64decode(call("Page.captureScreenshot", format="png")["data"])
    return html, shot


def render(
    chromium: str,
    url: str,
    ready: str,
    profile: Path,
    timeout: float = 60,
    width: int = 1280,
    height: int = 900,
):
    """(DOM, PNG bytes) of ``url`` once ``ready`` appears in the DOM (or after ``timeout`` seconds)."""
    process = subprocess.Popen(
        [chromium, *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0", "about:blank"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.time() + 30
        while not port_file.exists() or not port_file.read_text().strip():
            if time.time() > deadline:
                raise TimeoutError("chromium did not open its debugging port")
            time.sleep(0.2)
        port = port_file.read_text().split()[0]
        targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=5).read())
        page = next(t for t in targets if t["type"] == "page")
        return _session(page["webSocketDebuggerUrl"], url, ready, timeout, width, height)
    finally:
        process.terminate()
        process.wait(timeout=30)
