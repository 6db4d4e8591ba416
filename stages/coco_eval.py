"""COCO-style scoring with pycocotools: ground truth, class mapping, results format, scores.

Detections (``stages.inference.Detections``, boxes in original pixels) become COCO results:
class index i is mapped to the i-th smallest category id (after checking the model's class
names are the categories' names) and boxes go out as COCO [x, y, w, h]; with ``plus_one`` the
width is ``x2 - x1 + 1`` as in GluonCV's COCODetectionMetric, whose loader stores
``x2 = x + w - 1`` (the convention the seed's and the model zoo's numbers were measured with).
Scores are COCOeval's 12 summary stats (in percent in the metrics), AP per class and the mean
precision-recall curve.
"""
from __future__ import annotations

import contextlib
import copy
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

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
