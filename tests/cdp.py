"""A minimal Chrome DevTools Protocol client (the websockets package): drive headless Chromium for real —
Streamlit draws over a websocket, so the page is read once it has rendered, not after a fixed budget."""

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


class Browser:
    def __init__(self, chromium: str, profile: Path, width: int = 1280, height: int = 900):
        self.process = subprocess.Popen(
            [chromium, *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0", "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        port_file, deadline = profile / "DevToolsActivePort", time.time() + 30
        while not port_file.exists() or not port_file.read_text().strip():
            if time.time() > deadline:
                self.close()
                raise TimeoutError("chromium did not open its debugging port")
            time.sleep(0.2)
        port = port_file.read_text().split()[0]
        targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=5).read())
        self.ws = connect(
            next(t for t in targets if t["type"] == "page")["webSocketDebuggerUrl"], max_size=2**26
        )
        self.counter = 0
        self.call(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )

    def call(self, method: str, **params) -> dict:
        self.counter += 1
        self.ws.send(json.dumps({"id": self.counter, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == self.counter:
                return message.get("result", {})

    def dom(self) -> str:
        result = self.call("Runtime.evaluate", expression="document.documentElement.outerHTML")
        return result.get("result", {}).get("value", "")  # empty while a navigation swaps documents

    def shows(self, text: str) -> bool:
        """Whether the rendered page's text contains ``text`` (cheap enough to poll every few milliseconds)."""
        expression = f"document.body ? document.body.innerText.includes({json.dumps(text)}) : false"
        return bool(self.call("Runtime.evaluate", expression=expression).get("result", {}).get("value"))

    def open(self, url: str, ready: str, timeout: float = 60) -> str:
        """Navigate and wait until ``ready`` appears in the DOM; return the DOM."""
        self.call("Page.navigate", url=url)
        return self.wait(lambda html: ready in html, timeout)

    def wait(self, condition, timeout: float = 30, poll: float = 0.01) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            html = self.dom()
            if condition(html):
                return html
            time.sleep(poll)
        raise TimeoutError("the page never reached the expected state")

    ARROWS = {"ArrowLeft": 37, "ArrowRight": 39}

    def key(self, key: str) -> None:
        """Press and release a letter key or an arrow key, as a person typing."""
        arrow = key in self.ARROWS
        code, vk = (key, self.ARROWS[key]) if arrow else (f"Key{key.upper()}", ord(key.upper()))
        typed = {} if arrow else {"text": key}
        self.call(
            "Input.dispatchKeyEvent", type="keyDown", key=key, code=code, windowsVirtualKeyCode=vk, **typed
        )
        self.call("Input.dispatchKeyEvent", type="keyUp", key=key, code=code, windowsVirtualKeyCode=vk)

    def screenshot(self) -> bytes:
        return base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])

    def close(self) -> None:
        if hasattr(self, "ws"):
            self.ws.close()
        self.process.terminate()
        self.process.wait(timeout=30)
