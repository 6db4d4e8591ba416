"""Render the report's charts to PNG, offline, for places without a browser (PR comment, README).

    dvc plots diff origin/main --json -o plots_json > plots.json   # or: dvc plots show --json
    python -m stages.report_images --plots plots.json --out charts

Takes what ``dvc plots show --json`` / ``dvc plots diff --json`` print (the vega-lite specs
DVC fills from the templates of dvc.yaml, data inline) and turns every vega chart into
``<out>/<chart id>.png`` with ``vl-convert-python`` (Vega-Lite compiled and drawn in-process:
no browser, no network; a spec that would load data from a URL is refused), stored as an
indexed-colour PNG. ``<out>/charts.md`` lists the charts in the report's reading order (the
verdict first) as Markdown, for a PR comment or a job summary.
Image plots (sample detections) are files already and are left out.

Exit codes: 0 every chart rendered; 2 the input is not DVC's plots JSON (nothing written);
1 a chart failed to render (named; charts already written stay, each written atomically).
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import re
from pathlib import Path
from typing import Any, Iterable

from stages.common import StageError, atomic_path, main_guard, write_text_atomic

log = logging.getLogger(__name__)

VEGA_LITE = "5.21"  # vl-convert's bundle nearest the page's vega-lite 5.23 (report/vendor.json)
SCALE = 2.0  # pixels per vega pixel: sharp on high-density screens
CONFIG = {"background": "white"}  # readable on dark themes too (vega's default is transparent)
PALETTE = 48  # colours of the written PNG (see compact_png)
# Reading order of the report page (report/page.html): verdict, precisions, training, rest.
ORDER = (r"verdict", r"per_class|precision_recall", r"dvclive|plots/metrics")


class InputError(ValueError):
    """The input is not ``dvc plots ... --json`` output (exit 2)."""


def read_plots_json(path: str | Path) -> dict[str, list[dict[str, Any]]]:
    """The ``data`` of DVC's plots JSON: plot name -> renders; InputError when it is not."""
    try:
        shown = json.loads(Path(path).read_text())
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from exc
    except ValueError as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(shown, dict) or not isinstance(shown.get("data"), dict):
        raise InputError(f"{path}: not the output of `dvc plots show --json` (no 'data' object)")
    for error in shown.get("errors") or []:
        log.warning("DVC could not load a plot: %s", error)
    return shown["data"]


def chart_specs(data: dict[str, list[dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
    """(plot name, vega-lite spec) of every vega chart, in the report's reading order."""
    charts = [(name, render["content"]) for name, renders in data.items()
              for render in renders if render.get("type") == "vega"]
    return sorted(charts, key=lambda chart: rank(chart[0]))  # stable: DVC's order within a rank


def rank(name: str) -> int:
    return next((i for i, pattern in enumerate(ORDER) if re.search(pattern, name)), len(ORDER))


def file_name(name: str) -> str:
    """A plot name as a file name (DVC's HTML ids use the same characters)."""
    return re.sub(r"[^A-Za-z0-9-]+", "_", name).strip("_") + ".png"


def render_png(spec: dict[str, Any]) -> bytes:
    """One vega-lite spec as PNG, drawn offline (vl-convert; external data refused)."""
    import vl_convert

    return vl_convert.vegalite_to_png(spec, vl_version=VEGA_LITE, scale=SCALE, config=CONFIG,
                                      allowed_base_urls=[])


def compact_png(png: bytes, colors: int = PALETTE) -> bytes:
    """The same picture as an indexed-colour PNG: charts use few colours, so it looks the same
    at a fraction of the size (about 7x smaller here), which suits artifacts and the README."""
    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        indexed = image.convert("RGB").quantize(colors=colors, method=Image.Quantize.MEDIANCUT)
    out = io.BytesIO()
    indexed.save(out, format="PNG", optimize=True)
    return out.getvalue()


def title_of(name: str, spec: dict[str, Any]) -> str:
    title = spec.get("title")
    text = title.get("text") if isinstance(title, dict) else title
    return text if isinstance(text, str) and text else name


def markdown(charts: Iterable[tuple[str, str, str]]) -> str:
    """A Markdown list of (name, title, file)."""
    lines = [f"- **{title}**: `{file}`" for _name, title, file in charts]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m stages.report_images", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plots", required=True, help="output of `dvc plots show|diff --json`")
    parser.add_argument("--out", required=True, type=Path, help="directory for the PNG files")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        charts = chart_specs(read_plots_json(args.plots))
    except InputError as exc:
        log.error("%s", exc)
        return 2
    if not charts:
        log.error("%s holds no vega chart: nothing to render", args.plots)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, spec in charts:
        try:
            png = compact_png(render_png(spec))
        except Exception as exc:  # noqa: BLE001 - vl-convert raises plain errors per spec
            raise StageError(f"chart {name!r} did not render: {exc}") from exc
        target = args.out / file_name(name)
        with atomic_path(target) as tmp:
            tmp.write_bytes(png)
        written.append((name, title_of(name, spec), target.name))
        log.info("%s -> %s (%d kB)", name, target, len(png) // 1024)
    write_text_atomic(args.out / "charts.md", markdown(written))
    log.info("%d charts in %s (list: %s)", len(written), args.out, args.out / "charts.md")
    return 0


if __name__ == "__main__":
    main_guard(main)
