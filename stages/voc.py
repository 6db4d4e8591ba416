"""Pascal VOC helpers shared by the train and evaluate_voc stages (not a stage itself).

- ``load_voc``: GluonCV's ``VOCDetection`` over a VOCdevkit root, for any list of class names
  (the 20 VOC classes by default; the demo passes its own).
- ``score_voc07``: VOC07 11-point mAP with difficult objects ignored, through GluonCV's
  ``VOC07MApMetric``, plus per-class AP and a mean precision-recall curve, in percent.
"""
from __future__ import annotations

from typing import Annotated, Literal, Sequence

import numpy as np
from pydantic import Field

from stages.common import StageError

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
