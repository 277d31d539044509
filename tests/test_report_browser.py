"""The comparison page (:mod:`segsr_jax.report`) in a real headless Chromium: it loads with no
console error and no request beyond the file itself, every image decodes, and dragging a slider
changes what is drawn.

Chromium is Debian's ``chromium`` package, fetched without root by ``scripts/fetch_chromium.sh``
into the cache (``~/.cache/segsr_jax/chromium``; about 15 s and 400 MB the first time, then
cached), and driven through the DevTools protocol over ``--remote-debugging-pipe`` with the
standard library only. Skipped where there is no apt (not Debian) or the Debian registry
cannot be reached.
"""

import base64
import io
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segsr_jax import report

FETCH = Path(__file__).resolve().parents[1] / "scripts" / "fetch_chromium.sh"
TIMEOUT = 60.0


@pytest.fixture(scope="module")
def chromium() -> str:
    """The launcher of the fetched Chromium (see the module docstring)."""
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        pytest.skip("Chromium comes from Debian's registry: this system has no apt-get/dpkg-deb")
    done = subprocess.run(["bash", str(FETCH)], capture_output=True, text=True, timeout=600)
    if done.returncode == 3:  # the registry could not be reached
        pytest.skip(f"scripts/fetch_chromium.sh could not download Chromium: {done.stderr}")
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


class DevTools:
    """A Chromium driven over the DevTools pipe (fd 3: commands in, fd 4: replies and events
    out; each message JSON followed by a NUL byte)."""

    def __init__(self, launcher: str, profile: Path):
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        args = [
            "--headless",
            "--no-sandbox",  # no setuid sandbox without root; we load only our own file
            "--disable-gpu",
            "--hide-scrollbars",
            "--no-first-run",
            "--remote-debugging-pipe",
            f"--user-data-dir={profile}",
            "--window-size=1000,900",
            "about:blank",
        ]
        # bash moves the pipe ends to fds 3 and 4, where Chromium expects them (dash's
        # redirections take single-digit fds only).
        self.proc = subprocess.Popen(
            ["bash", "-c", f'exec "$0" "$@" 3<&{to_chrome_r} 4>&{from_chrome_w}', launcher, *args],
            pass_fds=(to_chrome_r, from_chrome_w),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict] = []
        self.session = None

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            ready, _, _ = select.select([self._from_chrome], [], [], max(0, deadline - time.time()))
            if not ready:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self._from_chrome, 1 << 20)
            if not chunk:
                raise ConnectionError("Chromium closed the DevTools pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, **params) -> dict:
        """Run one command (on the attached page, once there is one); returns its result."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if self.session is not None:
            message["sessionId"] = self.session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        deadline = time.time() + TIMEOUT
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                assert "error" not in reply, (method, reply["error"])
                return reply["result"]
            self.events.append(reply)

    def wait_for(self, method: str) -> dict:
        """The first event ``method`` (already received or coming)."""
        deadline = time.time() + TIMEOUT
        while True:
            for event in self.events:
                if event.get("method") == method:
                    return event
            self.events.append(self._read_message(deadline))

    def evaluate(self, expression: str):
        """The value of a JS expression in the page."""
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, result
        return result["result"]["value"]

    def screenshot(self, rect: dict) -> np.ndarray:
        """The pixels of ``rect`` (CSS pixels) as uint8 RGB."""
        clip = {k: rect[k] for k in ("x", "y", "width", "height")} | {"scale": 1}
        shot = self.send("Page.captureScreenshot", format="png", clip=clip)
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(shot["data"]))).convert("RGB"))

    def close(self):
        try:
            self.send("Browser.close")
        except (ConnectionError, TimeoutError):
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_chrome)
        os.close(self._from_chrome)


def _page(path: Path) -> None:
    """A page with two images of very different content, a segmentation and metrics."""
    yy, xx = np.mgrid[:150, :200]
    stripes = np.where((xx // 10 + yy // 10) % 2, 230, 20).astype(np.uint8)
    before = np.stack([stripes, stripes // 2, 255 - stripes], -1)
    after = np.stack([xx * 255 // 199, yy * 255 // 149, np.full_like(xx, 128)], -1).astype(np.uint8)
    labels = (xx // 70).astype(np.uint8)  # three vertical bands
    item = report.ReportImage(
        "scene",
        {"bicubic": before, "SegSR": after},
        [("bicubic", "SegSR")],
        labels=labels,
        overlay_on="SegSR",
        metrics={"SegSR": {"psnr": 21.5}, "bicubic": {"psnr": 20.25}},
    )
    report.write_report(
        path, [item], title="browser test", class_names=("sky", "grass", "brick"), columns=["psnr"]
    )


def test_page_loads_renders_and_the_slider_moves(chromium, tmp_path):
    _page(tmp_path / "index.html")
    browser = DevTools(chromium, tmp_path / "profile")
    try:
        targets = browser.send("Target.getTargets")["targetInfos"]
        page = next(t for t in targets if t["type"] == "page")
        browser.session = browser.send(
            "Target.attachToTarget", targetId=page["targetId"], flatten=True
        )["sessionId"]
        for domain in ("Runtime", "Log", "Page", "Network"):
            browser.send(f"{domain}.enable")
        browser.send("Page.navigate", url=(tmp_path / "index.html").as_uri())
        browser.wait_for("Page.loadEventFired")

        shown = browser.evaluate(
            "[...document.images].map(i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight])"
        )
        assert len(shown) == 3  # the two slider images and the overlay
        assert all(done and w == 200 and h == 150 for _, done, w, h in shown), shown
        legend = browser.evaluate(
            "[...document.querySelectorAll('.legend li')].map(li => li.textContent)"
        )
        assert [text.split(" (")[0] for text in legend] == ["sky", "grass", "brick"]

        rect = browser.evaluate(
            "(() => { const r = document.querySelector('figure.cmp').getBoundingClientRect();"
            " return {x: r.x, y: r.y, width: r.width, height: r.height}; })()"
        )
        assert rect["width"] >= 200 and rect["height"] >= 150
        first, again = browser.screenshot(rect), browser.screenshot(rect)
        np.testing.assert_array_equal(first, again)  # nothing changes by itself
        # A real click on the slider near its left end (as a user drags it there).
        x, y = rect["x"] + 0.1 * rect["width"], rect["y"] + rect["height"] / 2
        for kind in ("mousePressed", "mouseReleased"):
            browser.send(
                "Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1
            )
        assert int(browser.evaluate("document.querySelector('figure.cmp input').value")) < 20
        moved = browser.screenshot(rect)
        changed = np.any(np.abs(moved.astype(int) - first.astype(int)) > 30, axis=-1).mean()
        assert changed > 0.25, changed  # ~40% of the width now shows the other image

        problems = [
            e
            for e in browser.events
            if e.get("method") == "Runtime.exceptionThrown"
            or (
                e.get("method") == "Runtime.consoleAPICalled"
                and e["params"]["type"] in ("error", "assert", "warning")
            )
            or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")
        ]
        assert not problems, problems
        requested = [
            e["params"]["request"]["url"]
            for e in browser.events
            if e.get("method") == "Network.requestWillBeSent"
        ]
        assert requested and all(u.startswith(("file:", "data:")) for u in requested), requested
    finally:
        browser.close()
