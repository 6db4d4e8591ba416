"""COCO bbox scoring with a choice of implementation: pycocotools (the reference) or
faster-coco-eval (the same algorithm with evaluateImg/accumulate in C++, ~5x faster over all).

Both give the same 12 summary stats to the last bit: ``tests/stages/test_coco_scoring.py``
compares them on a val2017-sized generated result set (5,000 images x 100 detections x 80
classes) and the demo test on the demo's detections. Their precision arrays may differ in the
last bit of a few entries (another summation order), far below the 6 decimals written.
"""
from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np

log = logging.getLogger(__name__)

SCORERS = ("pycocotools", "faster-coco-eval")

# pycocotools' summarize() lines, in COCOeval.stats order: (AP or AR, IoU, area, max dets)
_SUMMARY = [(1, None, "all", 100), (1, .5, "all", 100), (1, .75, "all", 100),
            (1, None, "small", 100), (1, None, "medium", 100), (1, None, "large", 100),
            (0, None, "all", 1), (0, None, "all", 10), (0, None, "all", 100),
            (0, None, "small", 100), (0, None, "medium", 100), (0, None, "large", 100)]


@dataclass
class CocoScores:
    """COCOeval's 12 summary stats (fractions, -1 = undefined) and its precision array."""

    stats: np.ndarray
    precision: np.ndarray  # [iou thr, recall thr, class, area, max dets]
    summary: str


def summary_text(stats: Sequence[float]) -> str:
    """The 12 lines pycocotools' ``summarize()`` prints for these stats (whichever scorer)."""
    lines = []
    for (ap, iou, area, dets), value in zip(_SUMMARY, stats):
        title, short = ("Average Precision", "(AP)") if ap else ("Average Recall", "(AR)")
        iou_text = "0.50:0.95" if iou is None else f"{iou:0.2f}"
        lines.append(f" {title:<18} {short} @[ IoU={iou_text:<9} | area={area:>6s} | "
                     f"maxDets={dets:>3d} ] = {value:0.3f}")
    return "\n".join(lines)


def _quiet(fn, *args, **kwargs):
    """Call a pycocotools function that prints progress, without the prints."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)


def _pycocotools(coco_gt, results: list[dict], image_ids: Sequence[int]):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if results:
        coco_dt = _quiet(coco_gt.loadRes, results)
    else:  # loadRes cannot take an empty list
        coco_dt = COCO()
        coco_dt.dataset = {"images": coco_gt.dataset["images"],
                           "categories": [dict(c) for c in coco_gt.dataset["categories"]],
                           "annotations": []}
        _quiet(coco_dt.createIndex)
    ev = COCOeval(coco_gt, coco_dt, "bbox")
    ev.params.imgIds = list(image_ids)
    _quiet(lambda: (ev.evaluate(), ev.accumulate(), ev.summarize()))
    return ev.stats, ev.eval["precision"]


def _faster_coco_eval(coco_gt, results: list[dict], image_ids: Sequence[int]):
    from faster_coco_eval import COCO, COCOeval_faster

    gt = COCO(print_function=log.debug)
    gt.dataset = coco_gt.dataset  # shared, not copied: indexing does not change it
    gt.createIndex()
    dt = gt.loadRes(results)
    ev = COCOeval_faster(gt, dt, "bbox", print_function=log.debug)
    ev.params.imgIds = list(image_ids)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return ev.stats[:12], ev.eval["precision"]  # then AR@0.5, AR@0.75: not in pycocotools


def score_bbox(coco_gt, results: list[dict], image_ids: Sequence[int],
               scorer: str = "pycocotools") -> CocoScores:
    """Score COCO results (bbox, pycocotools' default params) against ``coco_gt`` (a
    pycocotools COCO) on ``image_ids`` with ``scorer`` (one of SCORERS).

    ``results`` is left as it was: both scorers add keys (id, area, ...) to the entries they
    load, so they get shallow copies (bbox lists are only read).
    """
    if scorer not in SCORERS:
        raise ValueError(f"unknown scorer {scorer!r}; known: {', '.join(SCORERS)}")
    run = _pycocotools if scorer == "pycocotools" else _faster_coco_eval
    stats, precision = run(coco_gt, [dict(r) for r in results], image_ids)
    stats = np.asarray(stats, np.float64)
    return CocoScores(stats, np.asarray(precision), summary_text(stats))
