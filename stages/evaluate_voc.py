"""Evaluate a symbolic SSD on Pascal VOC: VOC07 11-point mAP (difficult objects ignored).

    python -m stages.evaluate_voc voc fp32 --model model/voc/fp32 --data data/voc/VOCdevkit \
        --metrics metrics/voc_fp32.json --speed metrics/speed_voc_fp32.json \
        --eval-dir eval/voc_fp32

Reads params ``evaluate.<branch>`` (split, batch_size, threads, samples, draw_thresh,
max_images). Loading
and batched inference are the shared ``stages.inference`` (GluonCV's SSD validation
preprocessing); scoring is GluonCV's ``VOC07MApMetric`` in the original image frame.

Outputs:
- ``--metrics``: ``map`` (percent), ``images`` — deterministic, byte-identical on rerun.
- ``--speed``: images/s end to end, per-batch latency p50/p90 (ms), batch size, threads, images.
- ``--eval-dir``: ``per_class.csv`` (class, ap in percent; empty for a class without ground
  truth), ``pr.csv`` (recall, precision: interpolated precision averaged over classes, IoU 0.5),
  ``detections.json`` (COCO results format: ``image_id`` = VOC image id, ``category_id`` =
  class index + 1 in the model's class list, ``bbox`` = [x, y, w, h] in the 0-based pixels of
  GluonCV's VOC loader, ``score``), ``samples/*.png`` (images with predicted boxes drawn), and
  ``provenance.json`` (model meta, params, library versions).
"""
from __future__ import annotations

import argparse
import csv
import io
import logging
import time
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
from pydantic import Field

from stages.common import (StageError, atomic_path, dumps_json, file_digest, library_versions,
                           main_guard, round_floats, write_json)
from stages.config import Section, load_branch
from stages.voc import Split

log = logging.getLogger(__name__)


class EvaluateVocParams(Section):
    """params.yaml ``evaluate.<branch>`` for a VOC-format dataset."""

    split: Split
    batch_size: int = Field(ge=1)
    threads: int = Field(ge=0)  # OpenMP threads; 0 = all cores
    samples: int = Field(ge=0)  # images drawn with their predictions into <eval-dir>/samples
    draw_thresh: float = Field(default=0.3, ge=0, le=1)  # boxes drawn on samples score >= this
    max_images: int = Field(default=0, ge=0)  # 0 = the whole split


# ---------------------------------------------------------------------------------------------
# Pure helpers

def clip_to_images(detections: Sequence[tuple], sizes: Sequence[tuple[float, float]]
                   ) -> list[tuple]:
    """Boxes clipped to their image (width, height), as GluonCV's eval_ssd.py clips them."""
    out = []
    for (boxes, ids, scores), (w, h) in zip(detections, sizes):
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        limit = np.array([w, h, w, h], np.float32)
        out.append((np.clip(boxes, 0, limit), ids, scores))
    return out


def detections_records(ids: Sequence[str], detections: Sequence[tuple]) -> list[dict]:
    """COCO-results rows for per-image (boxes xyxy, class indices, scores)."""
    rows = []
    for image_id, (boxes, classes, scores) in zip(ids, detections):
        for (x0, y0, x1, y1), c, s in zip(np.asarray(boxes, np.float64), classes, scores):
            rows.append({"image_id": image_id, "category_id": int(c) + 1,
                         "bbox": [x0, y0, x1 - x0, y1 - y0], "score": float(s)})
    return round_floats(rows, 4)


def detections_from_records(records: Sequence[dict], ids: Sequence[str]) -> list[tuple]:
    """The inverse of ``detections_records``: per image of ``ids``, (boxes, classes, scores)."""
    per_image: dict[str, list[dict]] = {i: [] for i in ids}
    for r in records:
        per_image[r["image_id"]].append(r)
    out = []
    for i in ids:
        rows = per_image[i]
        boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (r["bbox"] for r in rows)],
                         np.float32).reshape(-1, 4)
        out.append((boxes, np.array([r["category_id"] - 1 for r in rows], np.int64),
                    np.array([r["score"] for r in rows], np.float32)))
    return out


def csv_text(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """CSV with a header row and '\\n' line ends."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def per_class_rows(aps: dict[str, float | None]) -> list[list]:
    """(class, AP percent rounded to 4 digits or '' when undefined) rows in class order."""
    return [[name, "" if ap is None else round(ap, 4)] for name, ap in aps.items()]


def pr_rows(recall: np.ndarray, precision: np.ndarray) -> list[list]:
    """(recall, precision) rows rounded for stable files."""
    return [[round(float(r), 4), round(float(p), 6)] for r, p in zip(recall, precision)]


# ---------------------------------------------------------------------------------------------
# Evaluation

def evaluate(net, meta: dict, items, batch_size: int) -> tuple[list[tuple], list[float], float]:
    """Detect on ``items`` (inference.ImageItem) → per-image detections, batch times, wall s."""
    from tqdm import tqdm

    from stages.inference import detect_batches

    detections: list[tuple] = []
    seconds: list[float] = []
    start = time.perf_counter()
    with tqdm(total=len(items), desc="evaluate", unit="img", disable=None) as bar:
        for result in detect_batches(net, items, meta, batch_size):
            seconds.append(result.seconds)
            for det in result.detections:
                detections.append((det.boxes, det.ids, det.scores))
            bar.update(len(result.detections))
    return detections, seconds, time.perf_counter() - start


def draw_samples(out_dir: Path, items, detections: Sequence[tuple], classes: Sequence[str],
                 count: int, min_score: float) -> None:
    """The first ``count`` images with their predictions scoring >= ``min_score``, as PNGs."""
    from stages.drawing import draw_detections, write_png
    from stages.inference import read_image

    out_dir.mkdir(parents=True, exist_ok=True)
    for item, (boxes, ids, scores) in zip(items[:count], detections[:count]):
        keep = np.asarray(scores) >= min_score
        write_png(out_dir / f"{item.key}.png",
                  draw_detections(read_image(item.path), boxes[keep], ids[keep], scores[keep],
                                  classes))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("branch", help="params branch: reads evaluate.<branch>")
    parser.add_argument("precision", choices=("fp32", "int8"), help="precision of --model")
    parser.add_argument("--model", required=True, type=Path, help="symbolic model prefix P")
    parser.add_argument("--data", required=True, type=Path, help="VOCdevkit root")
    parser.add_argument("--metrics", required=True, type=Path, help="accuracy metrics json")
    parser.add_argument("--speed", required=True, type=Path, help="speed metrics json")
    parser.add_argument("--eval-dir", required=True, type=Path,
                        help="per-class AP, PR curve, detections, samples")
    args = parser.parse_args(argv)
    p = load_branch("evaluate", args.branch, EvaluateVocParams)

    from stages.inference import (ImageItem, configure_threads, latency_summary, load_detector,
                                  read_meta)

    threads = configure_threads(p.threads)  # before MXNet is imported
    meta = read_meta(args.model)
    if meta["precision"] != args.precision:
        raise StageError(f"{args.model} is a {meta['precision']} model, not {args.precision}")
    from stages.voc import image_ids, image_paths, image_sizes, labels, load_voc, score_voc07

    classes = list(meta["classes"])
    dataset = load_voc(args.data, [p.split], classes)
    n = min(p.max_images, len(dataset)) if p.max_images else len(dataset)
    ids, gt = image_ids(dataset)[:n], labels(dataset)[:n]
    items = [ImageItem(i, Path(path)) for i, path in zip(ids, image_paths(dataset)[:n])]
    net, meta = load_detector(args.model)
    log.info("evaluating %s (%s, %s head) on %d images of VOC%d %s, batch %d, %d threads",
             args.model, args.precision, meta["head"], n, *p.split, p.batch_size, threads)

    detections, seconds, wall = evaluate(net, meta, items, p.batch_size)
    detections = clip_to_images(detections, image_sizes(dataset)[:n])
    scores = score_voc07(detections, gt, classes)
    recall, precision = scores["pr"]
    speed = latency_summary(seconds, n, wall, p.batch_size, threads)

    with atomic_path(args.eval_dir) as tmp:
        tmp.mkdir()
        (tmp / "per_class.csv").write_text(csv_text(["class", "ap"],
                                                    per_class_rows(scores["per_class"])))
        (tmp / "pr.csv").write_text(csv_text(["recall", "precision"], pr_rows(recall, precision)))
        (tmp / "detections.json").write_text(dumps_json(detections_records(ids, detections)))
        draw_samples(tmp / "samples", items, detections, classes, p.samples, p.draw_thresh)
        (tmp / "provenance.json").write_text(dumps_json({
            "model": {"prefix": str(args.model), "meta": meta,
                      "params_md5": file_digest(f"{args.model}-0000.params")},
            "params": {f"evaluate.{args.branch}": p.model_dump()},
            "libraries": library_versions()}))
    write_json(args.speed, round_floats(speed))
    write_json(args.metrics, round_floats({"map": scores["map"], "images": n}))
    log.info("VOC07 mAP %.2f on %d images (%s); %.1f img/s", scores["map"], n, args.precision,
             speed["images_per_s"])
    return 0


if __name__ == "__main__":
    main_guard(main)
