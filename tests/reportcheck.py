"""Build a pipeline's report page with DVC and check, in headless Chromium without network, that
every declared plot rendered. Shared by the demo tests (``dvc plots show`` and ``dvc plots
diff``)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dvc_render.base import Renderer

from tests.browser import open_page
from tests.demo_run import dvc

# The page's sections, in reading order (report/page.html).
SECTIONS = ["section-verdict", "section-precisions", "section-tuning", "section-training",
            "section-samples"]
LOCAL = ("file://", "data:", "about:", "blob:")


def declared_renders(project: Path, command: list[str], out: Path) -> dict[str, list[dict]]:
    """``dvc plots <command> --json``: every plot DVC would render, by name; no errors allowed."""
    proc = dvc("plots", *command, "--json", "-o", str(out), cwd=project)
    assert proc.returncode == 0, proc.stderr
    shown = json.loads(proc.stdout)
    assert not shown.get("errors"), shown["errors"]
    return shown["data"]


def check_report(project: Path, command: list[str], tmp: Path) -> dict[str, Any]:
    """``dvc plots <command>`` (show, or diff REV) into ``tmp``, loaded in Chromium offline.

    Asserts: every vega plot DVC declares has exactly one rendered vega view with drawn marks
    and no error; every image declared is on the page and loaded; the page asked for nothing
    but local files and raised no JavaScript error; the sections come in reading order.
    Saves ``tmp/screenshot.png`` and returns what the browser saw (tests/browser.py), plus
    ``html``, the page's path.
    """
    renders = declared_renders(project, command, tmp / "json")
    vega = [name for name, rs in renders.items() if any(r["type"] == "vega" for r in rs)]
    images = [r for rs in renders.values() for r in rs if r["type"] == "image"]
    assert vega and images, sorted(renders)

    html = tmp / "html"
    proc = dvc("plots", *command, "-o", str(html), cwd=project)
    assert proc.returncode == 0, proc.stderr
    ids = [Renderer.remove_special_chars(name) for name in vega]
    state = open_page(html / "index.html", ids, tmp / "screenshot.png")

    for chart in state["charts"]:
        assert chart["found"], f"no div for plot {chart['id']}"
        assert chart["views"] == 1, f"{chart['id']}: {chart['views']} vega views, expected 1"
        assert chart["error"] == "", f"{chart['id']}: {chart['error']}"
        assert chart["width"] > 100 and chart["height"] > 50, chart
        assert chart["items"] > 10, f"{chart['id']}: only {chart['items']} marks drawn"
    assert "failed to render" not in state["text"], state["text"][:2000]
    assert len(state["images"]) == len(images), (len(state["images"]), len(images))
    for image in state["images"]:
        assert image["complete"] and image["width"] > 0, f"image not loaded: {image['src']}"
        assert image["section"] == "section-samples", image
    remote = [url for url in state["requests"] if not url.startswith(LOCAL)]
    assert not remote, f"the page tried the network: {remote}"
    assert not state["exceptions"], state["exceptions"]
    assert not state["console_errors"], state["console_errors"]
    assert state["sections"] == [s for s in SECTIONS if s in state["sections"]], state["sections"]
    assert state["sections"][0] == "section-verdict", state["sections"]
    state["html"] = html / "index.html"
    return state
