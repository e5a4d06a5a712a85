"""A headless Debian chromium driven over the DevTools protocol (a websocket), for page tests.

No browser is downloaded and no driver is needed: chromium from apt, the ``websockets``
package (from uvicorn[standard]). The browser's network is cut off: every host name except
127.0.0.1 resolves to nothing and any proxied request goes to a dead port, so a page that
tried to reach the internet would fail to render; every request the page makes is recorded
(``requests``) so a test can assert none left the service.
"""

from __future__ import annotations

import itertools
import json
import re
import shutil
import subprocess
import tempfile
import time
from typing import Any

import httpx
from websockets.sync.client import connect

__all__ = ["CHROMIUM", "Browser"]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-default-apps",
    # the network cut off: nothing but 127.0.0.1 resolves, and proxied traffic goes nowhere
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    "--proxy-server=127.0.0.1:9",
    "--proxy-bypass-list=127.0.0.1",
    "--remote-debugging-port=0",
    "--remote-allow-origins=*",
]
_LISTENING = re.compile(r"DevTools listening on (ws://\S+)")


class Browser:
    """``with Browser() as browser: browser.open(url); browser.wait_for("js expression")``."""

    def __init__(self, timeout_s: float = 30.0) -> None:
        if CHROMIUM is None:
            raise RuntimeError("chromium is not installed")
        self.timeout_s = timeout_s
        self.requests: list[str] = []
        self.failed: list[tuple[str, str]] = []
        self.console: list[str] = []
        self._ids = itertools.count(1)
        self._urls: dict[str, str] = {}
        self._profile = tempfile.mkdtemp(prefix="monoquant-chromium-")
        self._process = subprocess.Popen(
            [CHROMIUM, *_FLAGS, f"--user-data-dir={self._profile}", "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        browser_ws = self._read_devtools_url()
        port = browser_ws.split(":")[2].split("/")[0]
        page = next(t for t in httpx.get(f"http://127.0.0.1:{port}/json/list").json() if t["type"] == "page")
        self._connection = connect(page["webSocketDebuggerUrl"], max_size=64 * 1024 * 1024, open_timeout=timeout_s)
        self._socket = self._connection.__enter__()
        for domain in ("Page", "Runtime", "Network"):
            self.send(f"{domain}.enable")

    def _read_devtools_url(self) -> str:
        deadline = time.monotonic() + self.timeout_s
        assert self._process.stderr is not None
        while time.monotonic() < deadline:
            line = self._process.stderr.readline()
            if not line and self._process.poll() is not None:
                raise RuntimeError(f"chromium exited with code {self._process.returncode}")
            found = _LISTENING.search(line)
            if found:
                return found.group(1)
        raise RuntimeError("chromium did not open its DevTools port")

    def _handle_event(self, message: dict[str, Any]) -> None:
        method, params = message.get("method"), message.get("params", {})
        if method == "Network.requestWillBeSent":
            self.requests.append(params["request"]["url"])
            self._urls[params["requestId"]] = params["request"]["url"]
        elif method == "Network.loadingFailed":
            self.failed.append((self._urls.get(params["requestId"], "?"), params.get("errorText", "")))
        elif method == "Runtime.consoleAPICalled":
            self.console.append(" ".join(str(arg.get("value", arg.get("description"))) for arg in params["args"]))
        elif method == "Runtime.exceptionThrown":
            self.console.append("exception: " + json.dumps(params["exceptionDetails"])[:500])

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        """One DevTools command; events arriving meanwhile are recorded."""
        command_id = next(self._ids)
        self._socket.send(json.dumps({"id": command_id, "method": method, "params": params}))
        while True:
            message = json.loads(self._socket.recv(timeout=self.timeout_s))
            if message.get("id") == command_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self._handle_event(message)

    def open(self, url: str) -> None:
        """Navigate and wait until the new document has loaded."""
        self.send("Page.navigate", url=url)
        self.wait_for(f"location.href === {json.dumps(url)} && document.readyState === 'complete'")

    def evaluate(self, expression: str) -> Any:
        """The value of a JS expression (awaited when it is a promise)."""
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout_s: float | None = None) -> Any:
        """Poll a JS expression until it is truthy; returns its value."""
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        last_error = None
        while True:
            try:
                value = self.evaluate(expression)
            except RuntimeError as exc:  # the page is not there yet (an element missing...)
                value, last_error = None, exc
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out waiting for {expression!r}; last error: {last_error}; console: {self.console[-10:]}"
                )
            time.sleep(0.1)

    def close(self) -> None:
        try:
            self._connection.__exit__(None, None, None)
        finally:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
            shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
