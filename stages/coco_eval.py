"""COCO-style scoring: ground truth, class mapping, results format, scores.

Detections (``stages.inference.Detections``, boxes in original pixels) become COCO results:
class index i is mapped to the i-th smallest category id (after checking the model's class
names are the categories' names) and boxes go out as COCO [x, y, w, h]; with ``plus_one`` the
width is ``x2 - x1 + 1`` as in GluonCV's COCODetectionMetric, whose loader stores
``x2 = x + w - 1`` (the convention the seed's and the model zoo's numbers were measured with).
Scores are COCOeval's 12 summary stats (in percent in the metrics), AP per class and the mean
precision-recall curve, by pycocotools or faster-coco-eval (``stages.coco_scoring``).
"""
from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from stages.coco_scoring import CocoScores, score_bbox
from stages.common import StageError, round_floats
from stages.inference import Detections, ImageItem

# COCOeval.stats order → metric keys (all in percent)
STAT_KEYS = ("map", "map50", "map75", "map_small", "map_medium", "map_large",
             "ar1", "ar10", "ar100", "ar_small", "ar_medium", "ar_large")


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


def to_coco_results(detections: Iterable[Detections], category_ids: Sequence[int],
                    score_thresh: float, plus_one: bool) -> list[dict]:
    """COCO results entries (image_id, category_id, bbox xywh, score) exactly as GluonCV's
    COCODetectionMetric makes them, unrounded (float64; width ``x2 - (x1 - 1)`` with
    ``plus_one``), so the stats are GluonCV's to the last digit. Detections scoring under
    ``score_thresh`` or of a class index outside ``category_ids`` are left out."""
    cats = np.asarray(category_ids, np.int64)
    pad = 1.0 if plus_one else 0.0
    results: list[dict] = []
    for det in detections:
        ids = np.asarray(det.ids).reshape(-1)
        scores = np.asarray(det.scores).reshape(-1)
        keep = ~(scores < score_thresh) & (ids >= 0) & (ids < len(cats))
        if not keep.any():
            continue
        b = np.asarray(det.boxes).reshape(-1, 4)[keep].astype(np.float64)
        xywh = np.stack([b[:, 0], b[:, 1], b[:, 2] - (b[:, 0] - pad), b[:, 3] - (b[:, 1] - pad)],
                        axis=1).tolist()
        key = int(det.key)
        results.extend({"image_id": key, "category_id": c, "bbox": box, "score": s}
                       for c, box, s in zip(cats[ids[keep]].tolist(), xywh,
                                            scores[keep].astype(np.float64).tolist()))
    return results


def score_detections(coco_gt, results: list[dict], image_ids: Sequence[int],
                     scorer: str = "pycocotools") -> CocoScores:
    """Score COCO results against ``coco_gt`` on ``image_ids`` (bbox, pycocotools defaults)
    with ``scorer``: pycocotools (the reference) or faster-coco-eval (stages/coco_scoring.py)."""
    return score_bbox(coco_gt, results, image_ids, scorer)


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
