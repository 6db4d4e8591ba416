"""Headless Chromium for the tests, driven over the DevTools protocol on a pipe (no extra package).

``open_page(html_file, screenshot)`` loads a local page with the network cut off three ways
(a proxy that points nowhere, a host resolver that resolves nothing, and DevTools' offline
network emulation), waits until every chart on the page has either rendered or failed, and
returns what a reader would see: the DOM facts the tests assert on, every request the page
tried to make, the JavaScript errors it raised, and a full-page screenshot.

Chromium is Debian's ``chromium`` package (``.ci/run`` installs it when missing); set
``CHROMIUM`` to use another binary.
"""
from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from base64 import b64decode
from pathlib import Path
from typing import Any

FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--disable-extensions", "--no-first-run",
    "--no-default-browser-check",
    "--hide-scrollbars", "--mute-audio", "--window-size=1400,1000",
    # any network request fails: a proxy on the discard port, and no name resolves
    "--proxy-server=http://127.0.0.1:9", "--proxy-bypass-list=<-loopback>",
    "--host-resolver-rules=MAP * ~NOTFOUND",
]

# Facts about the page, gathered in the page (JSON-serialisable); CHART_IDS is filled in.
STATE_JS = r"""
(() => {
  const charts = CHART_IDS.map(id => {
    const div = document.getElementById(id);
    if (!div) return {id, found: false, views: 0, width: 0, height: 0, items: 0, text: '',
                      error: '', section: null};
    const marks = div.querySelectorAll('svg.marks, canvas.marks');
    const svg = marks[0];
    const box = svg ? svg.getBoundingClientRect() : {width: 0, height: 0};
    return {
      id, found: true,
      views: marks.length,
      width: box.width, height: box.height,
      items: svg ? svg.querySelectorAll('path, rect, line, text, circle').length : 0,
      text: svg ? svg.textContent : '',
      error: [...div.querySelectorAll('.plot-error')].map(e => e.textContent).join(' | '),
      section: (div.closest('section') || {}).id || null,
    };
  });
  const images = [...document.querySelectorAll('img')].map(img => ({
    src: img.getAttribute('src'), complete: img.complete, width: img.naturalWidth,
    section: (img.closest('section') || {}).id || null,
  }));
  const sections = [...document.querySelectorAll('section.report-section')].map(s => s.id);
  return {charts, images, sections, ready: document.readyState,
          text: document.body ? document.body.innerText : ''};
})()
"""


def chromium_binary() -> str:
    """The Chromium to drive; a clear failure (not a skip) when there is none."""
    binary = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which(
        "chromium-browser")
    if not binary:
        raise RuntimeError("no chromium found: the report page is tested in a real browser; "
                           "install Debian's chromium (`apt-get install -y chromium`, as .ci/run "
                           "does) or set CHROMIUM to a Chromium binary")
    return binary


class DevTools:
    """A Chromium process and its DevTools pipe (fd 3: commands in, fd 4: replies out)."""

    def __init__(self, profile: Path, log_file: Path) -> None:
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        # above 4, so the dup2 below never overwrites one of them with the other
        hi_r = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD_CLOEXEC, 10)
        hi_w = fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(to_chrome_r)
        os.close(from_chrome_w)

        def child_fds() -> None:  # runs in the child between fork and exec
            os.dup2(hi_r, 3)
            os.dup2(hi_w, 4)

        self._log = open(log_file, "wb")
        cmd = [chromium_binary(), *FLAGS, f"--user-data-dir={profile}",
               "--remote-debugging-pipe", "about:blank"]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=self._log, preexec_fn=child_fds, close_fds=False)
        os.close(hi_r)
        os.close(hi_w)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []

    def send(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 60.0) -> dict[str, Any]:
        """One DevTools command; its result (events that arrive meanwhile are kept)."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def _read(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            if time.monotonic() > deadline:
                raise TimeoutError("chromium did not answer in time")
            ready, _, _ = select.select([self._from_chrome], [], [], 0.5)
            if ready:
                chunk = os.read(self._from_chrome, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"chromium exited (code {self.proc.poll()})")
                self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
        except Exception:  # noqa: BLE001 - it may already be gone; kill below
            pass
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._to_chrome, self._from_chrome):
            os.close(fd)
        self._log.close()


def open_page(html_file: Path, chart_ids: list[str], screenshot: Path,
              timeout: float = 90.0) -> dict[str, Any]:
    """Load ``html_file`` offline, wait for its charts, screenshot it; return what was seen.

    Keys: ``charts`` (per id of ``chart_ids``, the ids of the divs that should hold a vega
    chart: found, number of vega views, size, drawn items, the chart's text, error text,
    section), ``images`` (src, loaded, natural width, section), ``sections``
    (ids in page order), ``text`` (the page's visible text), ``requests`` (every URL the page
    asked for), ``exceptions`` and ``console_errors``.
    """
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        tools = DevTools(Path(profile), screenshot.with_suffix(".chromium.log"))
        try:
            target = tools.send("Target.createTarget", {"url": "about:blank"})["targetId"]
            session = tools.send("Target.attachToTarget",
                                 {"targetId": target, "flatten": True})["sessionId"]
            for domain in ("Page", "Runtime", "Network", "Log"):
                tools.send(f"{domain}.enable", session=session)
            tools.send("Network.emulateNetworkConditions",
                       {"offline": True, "latency": 0, "downloadThroughput": -1,
                        "uploadThroughput": -1}, session=session)
            tools.send("Page.navigate", {"url": html_file.resolve().as_uri()}, session=session)
            expression = STATE_JS.replace("CHART_IDS", json.dumps(chart_ids))
            state = wait_until_settled(tools, session, expression, timeout)
            size = tools.send("Page.getLayoutMetrics", session=session)["cssContentSize"]
            tools.send("Emulation.setDeviceMetricsOverride",
                       {"width": 1400, "height": int(size["height"]) + 1,
                        "deviceScaleFactor": 1, "mobile": False}, session=session)
            shot = tools.send("Page.captureScreenshot", {"format": "png"}, session=session)
            screenshot.write_bytes(b64decode(shot["data"]))
        finally:
            tools.close()
    events = tools.events
    state["requests"] = [e["params"]["request"]["url"] for e in events
                         if e.get("method") == "Network.requestWillBeSent"]
    state["exceptions"] = [e["params"]["exceptionDetails"] for e in events
                           if e.get("method") == "Runtime.exceptionThrown"]
    state["console_errors"] = [
        " ".join(str(a.get("value", a.get("description", ""))) for a in e["params"]["args"])
        for e in events if e.get("method") == "Runtime.consoleAPICalled"
        and e["params"].get("type") in ("error", "assert")]
    state["console_errors"] += [e["params"]["entry"]["text"] for e in events
                                if e.get("method") == "Log.entryAdded"
                                and e["params"]["entry"].get("level") == "error"]
    return state


def wait_until_settled(tools: DevTools, session: str, expression: str, timeout: float,
                       quiet: float = 8.0) -> dict[str, Any]:
    """Poll the page until it has loaded and every chart has a view or an error, or until
    nothing on it has changed for ``quiet`` seconds after loading (a chart whose library never
    loaded stays empty for good: no need to wait out ``timeout``)."""
    deadline = time.monotonic() + timeout
    last, since = None, time.monotonic()
    while True:
        state = evaluate(tools, session, expression)
        loaded = state["ready"] == "complete"
        settled = loaded and all(c["views"] or c["error"] for c in state["charts"]) and all(
            i["complete"] for i in state["images"])
        progress = json.dumps([state["charts"], state["images"]], sort_keys=True)
        if progress != last or not loaded:
            last, since = progress, time.monotonic()
        stalled = time.monotonic() - since > quiet
        if settled or stalled or time.monotonic() > deadline:
            time.sleep(0.5)  # let the last views finish laying out before the screenshot
            return evaluate(tools, session, expression)
        time.sleep(0.25)


def evaluate(tools: DevTools, session: str, expression: str) -> Any:
    result = tools.send("Runtime.evaluate", {"expression": expression, "returnByValue": True},
                        session=session)
    if "exceptionDetails" in result:
        raise RuntimeError(f"page evaluation failed: {result['exceptionDetails']}")
    return result["result"]["value"]
