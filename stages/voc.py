"""Pascal VOC: the dataset, detection on it, VOC07 scoring (used by train and evaluate_voc).

- ``load_voc``: GluonCV's ``VOCDetection`` over a VOCdevkit root, for any list of class names
  (the 20 VOC classes by default; the demo passes its own).
- ``detect_voc``: a detector's detections on the first n images of such a dataset, through the
  shared inference path (``stages/inference.py``), in the original image frame, clipped to
  each image as GluonCV's eval_ssd.py clips them. The evaluate_voc stage and the train stage's
  validation both call it.
- ``score_voc07``: VOC07 11-point mAP with difficult objects ignored, through GluonCV's
  ``VOC07MApMetric``, plus per-class AP and a mean precision-recall curve, in percent.
- ``detections_records`` / ``per_class_rows`` / ``pr_rows``: the rows of the eval dir's files.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated, Literal, Sequence

import numpy as np
from pydantic import Field

from stages.common import StageError, round_floats
from stages.inference import Detections, ImageItem, detect_all

# A (year, split) pair of params, e.g. [2007, test]. YAML gives lists, so this one type is not
# strict about list vs tuple (the params models are strict otherwise).
Split = Annotated[tuple[Annotated[int, Field(ge=2000, le=2100)],
                        Literal["train", "val", "trainval", "test"]], Field(strict=False)]

# GluonCV's (and the VOC devkit's) 20 classes, in their index order.
VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
               "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
               "sheep", "sofa", "train", "tvmonitor")

# Recall grid of the mean precision-recall curve (the same 101 points pycocotools uses).
RECALL_GRID = np.linspace(0.0, 1.0, 101)


def load_voc(root: str, splits: Sequence[tuple[int | str, str]],
             classes: Sequence[str] = VOC_CLASSES):
    """GluonCV ``VOCDetection`` over ``root`` (a VOCdevkit dir) for ``splits`` and ``classes``.

    Labels are (k, 6) arrays ``x0, y0, x1, y1, class, difficult`` in 0-based pixels; objects of
    other classes are skipped. A missing devkit, year or split list raises StageError.
    """
    from gluoncv.data import VOCDetection

    class ProjectVOC(VOCDetection):
        CLASSES = tuple(classes)

    try:
        dataset = ProjectVOC(root=str(root), splits=[(y, s) for y, s in splits])
    except OSError as exc:
        where = f"{getattr(exc, 'filename', None) or root}"
        raise StageError(f"cannot read VOC split(s) {list(map(list, splits))} under {root}: "
                         f"{where} is missing (expected <root>/VOC<year>/ImageSets/Main/"
                         f"<split>.txt, Annotations/, JPEGImages/)") from None
    if len(dataset) == 0:
        raise StageError(f"VOC split(s) {list(map(list, splits))} under {root} list no images")
    return dataset


def image_ids(dataset) -> list[str]:
    """The VOC image ids (file stems) of a ``load_voc`` dataset, in dataset order."""
    return [item[1] for item in dataset._items]  # pylint: disable=protected-access


def image_paths(dataset) -> list[str]:
    """The JPEG path of every image of a ``load_voc`` dataset, in dataset order."""
    return [dataset._image_path.format(*item)  # pylint: disable=protected-access
            for item in dataset._items]  # pylint: disable=protected-access


def image_sizes(dataset) -> list[tuple[float, float]]:
    """(width, height) of every image from its annotation, in dataset order."""
    return [dataset._im_shapes[i] for i in range(len(dataset))]  # pylint: disable=protected-access


def labels(dataset) -> list[np.ndarray]:
    """Every image's (k, 6) label array, in dataset order (empty images give shape (0, 6))."""
    return [np.asarray(lab, dtype=np.float32).reshape(-1, 6)
            for lab in dataset._label_cache]  # pylint: disable=protected-access


# ---------------------------------------------------------------------------------------------
# Detection on a VOC dataset

def image_items(dataset, n: int) -> list[ImageItem]:
    """The first ``n`` images of a ``load_voc`` dataset as inference items keyed by image id."""
    return [ImageItem(i, Path(path)) for i, path in zip(image_ids(dataset)[:n],
                                                         image_paths(dataset)[:n])]


def clip_to_images(detections: Sequence[Detections], sizes: Sequence[tuple[float, float]]
                   ) -> list[Detections]:
    """Boxes clipped to their image (width, height), as GluonCV's eval_ssd.py clips them."""
    out = []
    for det, (w, h) in zip(detections, sizes):
        boxes = np.asarray(det.boxes, np.float32).reshape(-1, 4)
        limit = np.array([w, h, w, h], np.float32)
        out.append(replace(det, boxes=np.clip(boxes, 0, limit)))
    return out


def detect_voc(net, meta: dict, dataset, n: int, batch_size: int, desc: str = "detect"
               ) -> tuple[list[Detections], list[float], float]:
    """Detections of ``net`` on the first ``n`` images of ``dataset``, boxes clipped to each
    image, with per-batch compute seconds and wall seconds (``inference.detect_all``)."""
    detections, seconds, wall = detect_all(net, image_items(dataset, n), meta, batch_size, desc)
    return clip_to_images(detections, image_sizes(dataset)[:n]), seconds, wall


def as_triples(detections: Sequence[Detections]) -> list[tuple]:
    """Per image ``(boxes, class ids, scores)``: the form ``score_voc07`` and the records take."""
    return [(d.boxes, d.ids, d.scores) for d in detections]


# ---------------------------------------------------------------------------------------------
# VOC07 scoring and the eval dir rows

def score_voc07(detections: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
                ground_truth: Sequence[np.ndarray], classes: Sequence[str],
                iou_thresh: float = 0.5) -> dict:
    """VOC07 11-point mAP of ``detections`` against ``ground_truth``, per image.

    ``detections[i]`` is ``(boxes (n, 4) xyxy, class ids (n,), scores (n,))`` and
    ``ground_truth[i]`` the (k, 6) label array of image i, both in the same pixel frame.
    Difficult objects neither count as positives nor as false positives (GluonCV's
    ``VOC07MApMetric``). Returns ``map`` (percent), ``per_class`` (class -> AP percent, None for
    a class without ground truth) and ``pr`` ((recall, precision) arrays: the interpolated
    precision, max over recall >= r, averaged over classes with ground truth).
    """
    from gluoncv.utils.metrics.voc_detection import VOC07MApMetric

    if len(detections) != len(ground_truth):
        raise ValueError(f"{len(detections)} detection sets for {len(ground_truth)} images")
    metric = VOC07MApMetric(iou_thresh=iou_thresh, class_names=list(classes))
    for (boxes, ids, scores), gt in zip(detections, ground_truth):
        gt = np.asarray(gt, dtype=np.float32).reshape(-1, 6)
        metric.update(np.asarray(boxes, np.float32).reshape(1, -1, 4),
                      np.asarray(ids, np.float32).reshape(1, -1),
                      np.asarray(scores, np.float32).reshape(1, -1),
                      gt[None, :, :4], gt[None, :, 4], gt[None, :, 5])
    if not metric._n_pos:  # pylint: disable=protected-access
        raise StageError("no ground-truth objects of the model's classes in the evaluated images")
    _, values = metric.get()
    aps = {name: (None if np.isnan(v) else 100.0 * float(v))
           for name, v in zip(classes, values[:-1])}
    if all(v is None for v in aps.values()):
        raise StageError("VOC07 mAP is undefined: no class has a non-difficult object")
    recall, precision = metric._recall_prec()  # pylint: disable=protected-access
    curves = [interpolated_precision(r, p) for r, p in zip(recall, precision) if r is not None]
    return {"map": 100.0 * float(values[-1]), "per_class": aps,
            "pr": (RECALL_GRID, np.mean(curves, axis=0))}


def interpolated_precision(recall: np.ndarray, precision: np.ndarray,
                           grid: np.ndarray = RECALL_GRID) -> np.ndarray:
    """Precision envelope on ``grid``: max precision at recall >= r (0 where never reached)."""
    precision = np.nan_to_num(np.asarray(precision, dtype=np.float64))
    recall = np.asarray(recall, dtype=np.float64)
    out = np.zeros(len(grid))
    for i, r in enumerate(grid):
        reached = recall >= r - 1e-12
        out[i] = precision[reached].max() if reached.any() else 0.0
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


def per_class_rows(aps: dict[str, float | None]) -> list[list]:
    """(class, AP percent rounded to 4 digits or '' when undefined) rows in class order."""
    return [[name, "" if ap is None else round(ap, 4)] for name, ap in aps.items()]


def pr_rows(recall: np.ndarray, precision: np.ndarray) -> list[list]:
    """(recall, precision) rows rounded for stable files."""
    return [[round(float(r), 4), round(float(p), 6)] for r, p in zip(recall, precision)]
