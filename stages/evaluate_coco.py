"""Evaluate a symbolic detector on COCO val2017 with pycocotools.

    python -m stages.evaluate_coco coco fp32 --model model/coco/fp32 --images data/coco/val2017 \\
        --annotations data/coco/annotations/instances_val2017.json \\
        --metrics metrics/coco_fp32.json --speed metrics/speed_coco_fp32.json \\
        --eval-dir eval/coco_fp32

Reads params ``evaluate.<branch>``. Every image of the annotation file is evaluated (those
without annotations too, as the seed does), in sorted image-id order, up to ``max_images``.
Detections are rescaled to the original image size, class index i is mapped to the i-th
smallest category id (after checking the model's class names are the categories' names) and
boxes go out as COCO [x, y, w, h]; with ``xywh_plus_one`` the width is ``x2 - x1 + 1`` as in
GluonCV's COCODetectionMetric, whose loader stores ``x2 = x + w - 1`` (the convention the
seed's and the model zoo's numbers were measured with).

Outputs: accuracy metrics (percent; -1 where COCO has no ground truth for a stat), speed,
and the eval dir: detections.json (COCO results format), per_class.csv (class,ap),
pr.csv (recall,precision at IoU 0.5, area all, 100 detections, mean over classes),
samples/<image_id>.png, provenance.json (model head, calibration, params, library versions).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from pydantic import Field
from tqdm import tqdm

from stages.common import (StageError, atomic_path, dumps_json, file_digest, library_versions,
                           main_guard, round_floats, write_json)
from stages.config import Section, load_branch
from stages.inference import (Detections, ImageItem, configure_threads, detect_batches,
                              latency_summary, load_detector, read_image, read_meta)

log = logging.getLogger(__name__)

# COCOeval.stats order → metric keys (all in percent)
STAT_KEYS = ("map", "map50", "map75", "map_small", "map_medium", "map_large",
             "ar1", "ar10", "ar100", "ar_small", "ar_medium", "ar_large")


class EvaluateParams(Section):
    """``evaluate.<branch>`` in params.yaml."""

    batch_size: int = Field(default=64, gt=0)
    threads: int = Field(default=0, ge=0)  # 0 = all cores
    samples: int = Field(default=8, ge=0)  # images drawn with their detections
    max_images: int = Field(default=0, ge=0)  # 0 = all
    score_thresh: float = Field(default=0.05, ge=0, lt=1)  # GluonCV COCODetectionMetric default
    xywh_plus_one: bool = True
    draw_thresh: float = Field(default=0.3, ge=0, le=1)


# ---------------------------------------------------------------------------------------------
# Ground truth, class mapping, image list

def quiet_call(fn, *args, **kwargs):
    """Call a pycocotools function that prints progress; return (result, printed text)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        result = fn(*args, **kwargs)
    return result, buf.getvalue()


def load_coco(annotations: Path):
    """pycocotools COCO of the annotation file (clear error if unreadable)."""
    from pycocotools.coco import COCO

    if not annotations.is_file():
        raise StageError(f"annotation file not found: {annotations}")
    try:
        coco, _ = quiet_call(COCO, str(annotations))
    except (ValueError, KeyError, TypeError) as exc:
        raise StageError(f"{annotations}: not a COCO instances file ({exc})") from exc
    return coco


def category_ids_for(classes: Sequence[str], coco) -> list[int]:
    """COCO category id of each class index: sorted ids, names checked against the model's."""
    cats = sorted(coco.loadCats(coco.getCatIds()), key=lambda c: c["id"])
    names = [c["name"] for c in cats]
    if list(classes) != names:
        diff = [f"#{i}: model {a!r} vs annotations {b!r}"
                for i, (a, b) in enumerate(zip(classes, names)) if a != b][:5]
        raise StageError(
            f"the model's {len(classes)} classes do not match the annotations' {len(names)} "
            f"categories (sorted by id)" + (": " + "; ".join(diff) if diff else ""))
    return [c["id"] for c in cats]


def image_items(coco, images_dir: Path, max_images: int) -> list[ImageItem]:
    """All images of the annotation file (annotated or not) in id order, first ``max_images``."""
    ids = sorted(coco.getImgIds())
    if max_images:
        ids = ids[:max_images]
    items = [ImageItem(i, images_dir / coco.imgs[i]["file_name"]) for i in ids]
    missing = [it.path for it in items if not it.path.is_file()]
    if missing:
        raise StageError(f"{len(missing)} image file(s) of the annotations missing, "
                         f"e.g. {missing[0]}")
    return items


# ---------------------------------------------------------------------------------------------
# Detections → COCO results → scores

def to_coco_results(detections: Iterable[Detections], category_ids: Sequence[int],
                    score_thresh: float, plus_one: bool) -> list[dict]:
    """COCO results entries (image_id, category_id, bbox xywh, score), rounded for the file."""
    results = []
    pad = 1.0 if plus_one else 0.0
    for det in detections:
        for cid, score, (x1, y1, x2, y2) in zip(det.ids, det.scores, det.boxes.astype(np.float64)):
            if score < score_thresh or not 0 <= cid < len(category_ids):
                continue
            results.append({
                "image_id": int(det.key),
                "category_id": int(category_ids[cid]),
                "bbox": [round(x1, 3), round(y1, 3), round(x2 - x1 + pad, 3),
                         round(y2 - y1 + pad, 3)],
                "score": round(float(score), 6),
            })
    return results


@dataclass
class CocoScores:
    """COCOeval's 12 summary stats (fractions, -1 = undefined) and its precision array."""

    stats: np.ndarray
    precision: np.ndarray  # [iou thr, recall thr, class, area, max dets]
    summary: str


def score_detections(coco_gt, results: list[dict], image_ids: Sequence[int]) -> CocoScores:
    """Score COCO results against ``coco_gt`` on ``image_ids`` (bbox, pycocotools defaults)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if results:
        coco_dt, _ = quiet_call(coco_gt.loadRes, copy.deepcopy(results))
    else:  # loadRes cannot take an empty list
        coco_dt = COCO()
        coco_dt.dataset = {"images": coco_gt.dataset["images"],
                           "categories": copy.deepcopy(coco_gt.dataset["categories"]),
                           "annotations": []}
        quiet_call(coco_dt.createIndex)
    ev = COCOeval(coco_gt, coco_dt, "bbox")
    ev.params.imgIds = list(image_ids)
    _, text = quiet_call(lambda: (ev.evaluate(), ev.accumulate(), ev.summarize()))
    summary = "\n".join(line for line in text.splitlines() if line.startswith(" Average"))
    return CocoScores(np.asarray(ev.stats, np.float64), ev.eval["precision"], summary)


def metrics_from(scores: CocoScores, images: int) -> dict:
    """The accuracy metrics file: stats in percent (-1 kept as -1), plus ``images``."""
    metrics = {key: (float(v) * 100.0 if v >= 0 else -1.0)
               for key, v in zip(STAT_KEYS, scores.stats)}
    metrics["images"] = images
    return round_floats(metrics)


def per_class_ap(precision: np.ndarray, classes: Sequence[str]) -> list[tuple[str, float]]:
    """(class, AP@[.5:.95] in percent) for classes with ground truth (area all, 100 dets)."""
    rows = []
    for k, name in enumerate(classes):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        if p.size:
            rows.append((name, float(p.mean()) * 100.0))
    return rows


def pr_curve(precision: np.ndarray) -> list[tuple[float, float]]:
    """(recall, precision) at IoU 0.5, area all, 100 dets, mean over classes with ground truth."""
    p = precision[0, :, :, 0, -1]  # (recall thresholds, classes)
    with_gt = (p > -1).any(axis=0)
    recalls = np.linspace(0.0, 1.0, p.shape[0])
    mean = p[:, with_gt].mean(axis=1) if with_gt.any() else np.zeros(p.shape[0])
    return [(float(r), float(v)) for r, v in zip(recalls, mean)]


def csv_text(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    """A small CSV (floats with 6 decimals), stable across runs."""
    def cell(v):
        return f"{v:.6f}" if isinstance(v, float) else str(v)
    lines = [",".join(header)] + [",".join(cell(v) for v in row) for row in rows]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# The stage

def run_detection(net, meta: dict, items: Sequence[ImageItem], batch_size: int):
    """Detect on all items → (detections in item order, per-batch seconds, wall seconds)."""
    detections, latencies = [], []
    start = time.perf_counter()
    with tqdm(total=len(items), desc="detect", unit="img", disable=None) as bar:
        for result in detect_batches(net, items, meta, batch_size):
            detections.extend(result.detections)
            latencies.append(result.seconds)
            bar.update(len(result.detections))
    return detections, latencies, time.perf_counter() - start


def write_samples(folder: Path, items: Sequence[ImageItem], detections: Sequence[Detections],
                  classes: Sequence[str], n: int, thresh: float) -> None:
    """PNG of the first ``n`` images with detections scoring at least ``thresh``."""
    from stages.drawing import draw_detections, write_png

    folder.mkdir(parents=True, exist_ok=True)
    for item, det in list(zip(items, detections))[:n]:
        keep = det.scores >= thresh
        image = draw_detections(read_image(item.path), det.boxes[keep], det.ids[keep],
                                det.scores[keep], classes)
        write_png(folder / f"{item.key}.png", image)


def provenance(branch: str, precision: str, model: Path, meta: dict, annotations: Path,
               p: EvaluateParams, threads: int) -> dict:
    """What produced these numbers (kept out of the metrics file)."""
    return {
        "branch": branch,
        "precision": precision,
        "model": {"prefix": str(model), "network": meta["network"], "head": meta["head"],
                  "head_params": meta.get("head_params"),
                  "params_md5": file_digest(f"{model}-0000.params"),
                  "calibration": meta.get("calibration"),
                  "quantized_layers": len(meta.get("quantized_layers", []))},
        "annotations_md5": file_digest(annotations),
        "params": p.model_dump(),
        "threads": threads,
        "subgraph_backend": os.environ.get("MXNET_SUBGRAPH_BACKEND", "MKLDNN (default)"),
        "libraries": library_versions(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("branch", help="params section evaluate.<branch>, e.g. coco")
    parser.add_argument("precision", choices=("fp32", "int8"))
    parser.add_argument("--model", required=True, type=Path, help="symbolic model prefix")
    parser.add_argument("--images", required=True, type=Path, help="image dir (val2017)")
    parser.add_argument("--annotations", required=True, type=Path, help="instances json")
    parser.add_argument("--metrics", required=True, type=Path, help="accuracy metrics json")
    parser.add_argument("--speed", required=True, type=Path, help="speed metrics json")
    parser.add_argument("--eval-dir", required=True, type=Path, help="detections, tables, samples")
    args = parser.parse_args(argv)
    p = load_branch("evaluate", args.branch, EvaluateParams)
    threads = configure_threads(p.threads)  # before MXNet is imported (load_detector)
    meta = read_meta(args.model)
    if meta["precision"] != args.precision:
        raise StageError(f"{args.model} is a {meta['precision']} model, not {args.precision}")
    coco = load_coco(args.annotations)
    category_ids = category_ids_for(meta["classes"], coco)
    items = image_items(coco, args.images, p.max_images)
    net, meta = load_detector(args.model)
    log.info("evaluating %s (%s head, %s) on %d images, batch %d, %d threads", args.model,
             meta["head"], args.precision, len(items), p.batch_size, threads)

    detections, latencies, wall = run_detection(net, meta, items, p.batch_size)
    results = to_coco_results(detections, category_ids, p.score_thresh, p.xywh_plus_one)
    scores = score_detections(coco, results, [it.key for it in items])
    metrics = metrics_from(scores, len(items))
    speed = round_floats(latency_summary(latencies, len(items), wall, p.batch_size, threads))
    log.info("COCO bbox (%d detections):\n%s", len(results), scores.summary)

    with atomic_path(args.eval_dir) as tmp:
        tmp.mkdir()
        (tmp / "detections.json").write_text(json.dumps(results, separators=(",", ":")) + "\n")
        (tmp / "per_class.csv").write_text(
            csv_text(("class", "ap"), per_class_ap(scores.precision, meta["classes"])))
        (tmp / "pr.csv").write_text(csv_text(("recall", "precision"), pr_curve(scores.precision)))
        (tmp / "provenance.json").write_text(dumps_json(
            provenance(args.branch, args.precision, args.model, meta, args.annotations, p,
                       threads)))
        write_samples(tmp / "samples", items, detections, meta["classes"], p.samples,
                      p.draw_thresh)
    write_json(args.metrics, metrics)
    write_json(args.speed, speed)
    log.info("mAP %.3f (AP50 %.3f) on %d images; %.2f images/s end to end",
             metrics["map"], metrics["map50"], len(items), speed["images_per_s"])
    return 0


if __name__ == "__main__":
    main_guard(main)
