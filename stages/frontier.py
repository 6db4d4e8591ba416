"""The accuracy/speed frontier of a DVC experiment sweep: mAP against images/s per precision.

    python -m stages.frontier coco --out frontier --wait 3600   # in demo/, after queueing

Not a pipeline stage: it reads the experiments DVC has run (``dvc exp show --json``: the
baseline and every experiment of it), so it runs after a sweep (README "The frontier"). With
``--wait S`` it first waits up to S seconds for ``dvc queue`` to have nothing queued or running.

Each experiment gives one point per precision of the branch: ``map`` of
``metrics/<branch>_<p>.json`` and ``images_per_s`` of ``metrics/speed_<branch>_<p>.json``.
A point that another point beats or equals on both (and beats on one) is dominated; the others
are Pareto-best. Identical points (FP32 and BF16 do not change when only INT8 params do) are
kept once. Writes ``<out>/<precision>.csv`` and ``<out>/pareto.csv`` (columns experiment, label,
precision, map, images_per_s, pareto), which the ``frontier`` plot of demo/dvc.yaml draws, and
logs the table.
"""
from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from stages.common import StageError, atomic_path, main_guard
from stages.outputs import check_outputs

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "int8", "bf16")
# the params that name an INT8 point (its calibration and tuning), shortest name first
LABEL_KEYS = ("calib_mode", "calib_images", "tune.enabled")
HEADER = ("experiment", "label", "precision", "map", "images_per_s", "pareto")


@dataclass(frozen=True)
class Point:
    experiment: str
    label: str
    precision: str
    map: float
    images_per_s: float


def _file_data(section: dict, suffix: str) -> dict | None:
    """The ``data`` of the file in an exp-show section whose path ends with ``suffix``."""
    for path, entry in (section or {}).items():
        if path.replace("\\", "/").endswith(suffix) and entry and "data" in entry:
            return entry["data"]
    return None


def _param(params: dict, branch: str, key: str):
    """quantize.<branch>.<key> (dotted key) from an exp-show params section, or None."""
    data = _file_data(params, "params.yaml") or {}
    node = data.get("quantize", {}).get(branch, {})
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def label_of(params: dict, branch: str) -> str:
    """'entropy/1/tuned' style label of an experiment's INT8 settings."""
    mode, images, tuned = (_param(params, branch, k) for k in LABEL_KEYS)
    return f"{mode}/{images}" + ("/tuned" if tuned else "")


def experiment_records(exp_show: list) -> list[tuple[str, dict]]:
    """(name, data) of the baseline and every experiment that ran, from ``dvc exp show --json``
    (the workspace row is left out: it repeats the baseline or an unfinished run)."""
    records = []
    for row in exp_show:
        if row.get("rev") == "workspace":
            continue
        if row.get("data"):
            records.append((row.get("name") or row["rev"][:7], row["data"]))
        for group in row.get("experiments") or []:
            for rev in group.get("revs", []):
                name = rev.get("name") or rev["rev"][:7]
                if rev.get("error") or not rev.get("data"):
                    log.warning("experiment %s has no results (%s): left out", name,
                                (rev.get("error") or {}).get("msg", "not run"))
                    continue
                records.append((name, rev["data"]))
    return records


def points_of(records: Sequence[tuple[str, dict]], branch: str) -> list[Point]:
    """One point per (experiment, precision) with both mAP and images/s; duplicates once."""
    points, seen = [], set()
    for name, data in records:
        label = label_of(data.get("params", {}), branch)
        for precision in PRECISIONS:
            acc = _file_data(data.get("metrics", {}), f"metrics/{branch}_{precision}.json")
            speed = _file_data(data.get("metrics", {}), f"metrics/speed_{branch}_{precision}.json")
            if not acc or not speed or "map" not in acc or "images_per_s" not in speed:
                continue
            key = (precision, acc["map"], speed["images_per_s"])
            if precision != "int8" and key in seen:
                continue
            seen.add(key)
            points.append(Point(name, label if precision == "int8" else precision, precision,
                                float(acc["map"]), float(speed["images_per_s"])))
    return points


def pareto(points: Sequence[Point]) -> list[bool]:
    """For each point: True if no other point is at least as good on mAP and images/s and
    better on one of them."""
    def dominated(p: Point) -> bool:
        return any(q.map >= p.map and q.images_per_s >= p.images_per_s
                   and (q.map > p.map or q.images_per_s > p.images_per_s) for q in points)
    return [not dominated(p) for p in points]


def csv_rows(points: Sequence[Point], best: Sequence[bool]) -> list[tuple]:
    return [(p.experiment, p.label, p.precision, f"{p.map:.4f}", f"{p.images_per_s:.2f}",
             int(b)) for p, b in zip(points, best)]


FILES = tuple(f"{name}.csv" for name in (*PRECISIONS, "pareto"))


def write_csvs(out: Path, points: Sequence[Point], best: Sequence[bool]) -> None:
    """<out>/<precision>.csv for each precision and <out>/pareto.csv, all replaced at once
    (only a folder this tool or a stage wrote, or an empty one: stages/outputs.py)."""
    rows = csv_rows(points, best)
    files = {p: [r for r in rows if r[2] == p] for p in PRECISIONS}
    files["pareto"] = [r for r in rows if r[5]]
    with atomic_path(out, kind="dir") as tmp:
        tmp.mkdir()
        for name, selected in files.items():
            lines = [",".join(HEADER)] + [",".join(map(str, r)) for r in selected]
            (tmp / f"{name}.csv").write_text("\n".join(lines) + "\n")


def table(points: Sequence[Point], best: Sequence[bool]) -> str:
    lines = ["| experiment | INT8 settings / precision | mAP | images/s | Pareto-best |",
             "|---|---|---|---|---|"]
    order = sorted(range(len(points)), key=lambda i: -points[i].images_per_s)
    for i in order:
        p = points[i]
        lines.append(f"| {p.experiment} | {p.label} | {p.map:.2f} | {p.images_per_s:.1f} | "
                     f"{'yes' if best[i] else ''} |")
    return "\n".join(lines)


def dvc(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], capture_output=True, text=True,
                          check=False)
    if proc.returncode:
        raise StageError(f"dvc {' '.join(args)} failed: {proc.stderr.strip()[-2000:]}")
    return proc.stdout


def wait_for_queue(timeout: float, poll: float = 5.0) -> None:
    """Return once ``dvc queue status`` lists nothing queued or running; StageError after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        status = dvc("queue", "status")
        busy = [line for line in status.splitlines()
                if any(word in line.split() for word in ("Queued", "Running"))]
        if not busy:
            return
        if time.monotonic() > deadline:
            raise StageError(f"{len(busy)} experiment(s) still queued or running after "
                             f"{timeout:.0f} s:\n{status}")
        log.info("%d experiment(s) queued or running; waiting", len(busy))
        time.sleep(poll)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("branch", choices=("coco", "voc"), help="metrics <branch>_<p>.json")
    parser.add_argument("--out", required=True, type=Path, help="folder of the frontier CSVs")
    parser.add_argument("--wait", type=float, default=0.0,
                        help="seconds to wait for the experiment queue to finish (0: no wait)")
    args = parser.parse_args(argv)
    check_outputs(dirs={"--out": args.out})  # before waiting an hour
    if args.wait > 0:
        wait_for_queue(args.wait)
    points = points_of(experiment_records(json.loads(dvc("exp", "show", "--json"))),
                       args.branch)
    if not points:
        raise StageError(f"no experiment has both metrics/{args.branch}_<precision>.json and "
                         f"metrics/speed_{args.branch}_<precision>.json: run the pipeline first")
    best = pareto(points)
    write_csvs(args.out, points, best)
    log.info("%d points, %d Pareto-best, written to %s/:\n%s", len(points), sum(best), args.out,
             table(points, best))
    return 0


if __name__ == "__main__":
    main_guard(main)
