"""Headless Chromium driven over the Chrome DevTools protocol on a pipe (``--remote-debugging-pipe``: JSON messages
separated by NUL bytes on file descriptors 3 and 4), so no websocket client is needed. Enough to load a page of a
JavaScript app, wait until its text shows something, and read the documents of its iframes (the MLflow UI shows an
HTML artifact in a sandboxed iframe, which Chromium runs as a separate target)."""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import tempfile
import time


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class Chromium:
    def __init__(self, binary: str, width: int = 1600, height: int = 1000):
        self.profile = tempfile.mkdtemp(prefix="loom-chromium-")
        to_child, self._w = os.pipe()  # we write commands, Chromium reads them on fd 3
        self._r, from_child = os.pipe()  # Chromium writes replies on fd 4
        hi_in, hi_out = os.dup(to_child), os.dup(from_child)  # out of the way of 3 and 4 before dup2

        def child_fds():
            os.dup2(hi_in, 3)
            os.dup2(hi_out, 4)

        self.proc = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe", "--no-first-run",
             f"--user-data-dir={self.profile}", f"--window-size={width},{height}", "about:blank"],
            preexec_fn=child_fds, close_fds=False, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)  # fmt: skip
        for fd in (to_child, from_child, hi_in, hi_out):
            os.close(fd)
        self._buf, self._id = b"", 0
        page = next(t for t in self.send("Target.getTargets")["targetInfos"] if t["type"] == "page")
        self.page = self.attach(page["targetId"])

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30.0):
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        end = time.monotonic() + timeout
        while True:
            while b"\0" not in self._buf:
                ready, _, _ = select.select([self._r], [], [], max(0.0, end - time.monotonic()))
                if not ready:
                    raise TimeoutError(f"Chromium did not answer {method} in {timeout} s")
                chunk = os.read(self._r, 1 << 20)
                if not chunk:
                    raise EOFError("Chromium closed the DevTools pipe")
                self._buf += chunk
            raw, _, self._buf = self._buf.partition(b"\0")
            reply = json.loads(raw)
            if reply.get("id") == self._id:  # events (no id) are dropped
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def attach(self, target_id: str) -> str:
        return self.send("Target.attachToTarget", {"targetId": target_id, "flatten": True})["sessionId"]

    def evaluate(self, expression: str, session: str | None = None):
        r = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session or self.page)
        return r["result"].get("value")

    def open(self, url: str) -> None:
        self.send("Page.navigate", {"url": url}, self.page)

    def wait_text(self, until, timeout: float = 60.0) -> str:
        """The page's ``document.body.innerText`` once ``until(text)`` holds (else the last text, on timeout)."""
        end, text = time.monotonic() + timeout, ""
        while time.monotonic() < end:
            text = self.evaluate("document.body ? document.body.innerText : ''") or ""
            if until(text):
                return text
            time.sleep(0.5)
        return text

    def wait_frame_html(self, until, timeout: float = 60.0) -> str:
        """The HTML of the first iframe whose document satisfies ``until(html)`` (else '' on timeout)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for t in self.send("Target.getTargets")["targetInfos"]:
                if t["type"] != "iframe":
                    continue
                html = self.evaluate("document.documentElement.outerHTML", self.attach(t["targetId"])) or ""
                if until(html):
                    return html
            time.sleep(0.5)
        return ""

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except (TimeoutError, EOFError, RuntimeError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._w)
        os.close(self._r)
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
