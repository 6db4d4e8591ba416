"""What both evaluate stages write besides their accuracy metrics: the speed file, the eval dir
(tables as CSV, sample images with their detections, provenance), written atomically.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from stages.common import StageError, atomic_path
from stages.inference import Detections, ImageItem, read_image


PRECISIONS = ("fp32", "int8", "bf16")
SENSITIVITY_HEADER = ("layer", "agreement_alone", "sensitivity", "kept_fp32")


def expect_precision(meta: dict, prefix: Path, precision: str) -> None:
    """Refuse a model whose meta says another precision than the stage was asked to evaluate,
    and a BF16 model on a CPU without BF16 instructions (it would crawl: stages/bf16.py)."""
    if meta["precision"] != precision:
        raise StageError(f"{prefix} is a {meta['precision']} model, not {precision}")
    if precision == "bf16":
        from stages.bf16 import read_cpuinfo, require_bf16

        require_bf16(read_cpuinfo())


def precision_tables(meta: dict) -> dict[str, str]:
    """Eval-dir files of one precision: an INT8 model's ``sensitivity.csv`` (each tuned
    layer's agreement when quantized alone, its sensitivity, whether it was kept in FP32; the
    header only when it was not tuned)."""
    if meta["precision"] != "int8":
        return {}
    from stages.tuning import sensitivity_rows

    return {"sensitivity.csv": csv_text(SENSITIVITY_HEADER, sensitivity_rows(meta.get("tuning")),
                                        float_digits=4)}


def latency_summary(seconds: Sequence[float], images: int, wall: float, batch_size: int,
                    threads: int) -> dict:
    """The speed-file contract: images/s (end to end), per-batch latency p50/p90 in ms, …"""
    lat = np.asarray(seconds, np.float64) * 1000.0
    return {
        "images_per_s": images / wall if wall > 0 else 0.0,
        "latency_p50_ms": float(np.percentile(lat, 50)) if lat.size else 0.0,
        "latency_p90_ms": float(np.percentile(lat, 90)) if lat.size else 0.0,
        "batch_size": batch_size,
        "threads": threads,
        "images": images,
    }


def csv_text(header: Sequence[str], rows: Iterable[Sequence],
             float_digits: int | None = None) -> str:
    """A small CSV with '\\n' line ends, stable across runs.

    Floats are written with ``float_digits`` decimals, or as Python prints them when None (the
    caller has rounded them).
    """
    def cell(v):
        return f"{v:.{float_digits}f}" if float_digits is not None and isinstance(v, float) else v

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([cell(v) for v in row] for row in rows)
    return buf.getvalue()


def write_samples(folder: Path, items: Sequence[ImageItem], detections: Sequence[Detections],
                  classes: Sequence[str], n: int, thresh: float) -> None:
    """PNG of the first ``n`` images with their detections scoring at least ``thresh``."""
    from stages.drawing import draw_detections, write_png

    folder.mkdir(parents=True, exist_ok=True)
    for item, det in list(zip(items, detections))[:n]:
        keep = det.scores >= thresh
        image = draw_detections(read_image(item.path), det.boxes[keep], det.ids[keep],
                                det.scores[keep], classes)
        write_png(folder / f"{item.key}.png", image)


def write_eval_dir(eval_dir: Path, files: Mapping[str, str], items: Sequence[ImageItem],
                   detections: Sequence[Detections], classes: Sequence[str], samples: int,
                   draw_thresh: float) -> None:
    """Replace ``eval_dir`` atomically with the text ``files`` (name -> content) and
    ``samples/`` (the first ``samples`` images with their detections drawn)."""
    with atomic_path(eval_dir) as tmp:
        tmp.mkdir()
        for name, text in files.items():
            (tmp / name).write_text(text)
        write_samples(tmp / "samples", items, detections, classes, samples, draw_thresh)
