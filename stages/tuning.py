"""Accuracy-aware INT8 without labels: how far INT8 detections are from FP32 ones, which
quantized layers cost the most, and which to keep in FP32.

No function here reads a label. Agreement is the COCO AP@[.5:.95] (pycocotools, in percent) of a
candidate model's detections scored against the FP32 model's own detections on the same images
as pseudo ground truth: the FP32 detections scoring at least ``min_score`` are the "objects".
FP32 against itself scores 100; every box, class or score INT8 moves costs agreement. The
images are the quantize stage's calibration images (never the evaluation set's labels, which
would make the reported mAP a training number; README "Accuracy-aware INT8").

Sensitivity of a layer = 100 minus the agreement when that layer is the only quantized
candidate: what quantizing it costs, measured, not guessed. ``tune`` keeps layers in FP32
greedily, most sensitive first, until the agreement reaches the threshold or ``max_layers``
are kept.

Everything takes plain values: detections as ``stages.inference.Detections`` lists, and
``measure(kept_fp32_layers) -> agreement`` as a callable, so the selection logic is testable
without a model and the quantize stage decides how a candidate model is built.
"""
from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np

from stages.common import StageError

log = logging.getLogger(__name__)

PERFECT = 100.0  # the agreement of FP32 detections with themselves


# ---------------------------------------------------------------------------------------------
# Agreement: candidate detections scored against reference (FP32) detections

def pseudo_ground_truth(reference: Sequence, num_classes: int, min_score: float) -> dict:
    """A COCO instances dict whose objects are the ``reference`` detections scoring at least
    ``min_score`` (image ids = positions in the list, category id = class index + 1)."""
    annotations = []
    for image_id, det in enumerate(reference):
        keep = det.scores >= min_score
        for cls, (x1, y1, x2, y2) in zip(det.ids[keep], det.boxes[keep].astype(np.float64)):
            w, h = max(x2 - x1, 0.0), max(y2 - y1, 0.0)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": int(cls) + 1, "bbox": [x1, y1, w, h],
                                "area": w * h, "iscrowd": 0})
    return {"images": [{"id": i} for i in range(len(reference))],
            "categories": [{"id": c + 1, "name": str(c)} for c in range(num_classes)],
            "annotations": annotations}


def detection_results(candidate: Sequence) -> list[dict]:
    """COCO results entries of every valid ``candidate`` detection (same image/category ids)."""
    results = []
    for image_id, det in enumerate(candidate):
        for cls, score, (x1, y1, x2, y2) in zip(det.ids, det.scores,
                                                det.boxes.astype(np.float64)):
            results.append({"image_id": image_id, "category_id": int(cls) + 1,
                            "bbox": [x1, y1, max(x2 - x1, 0.0), max(y2 - y1, 0.0)],
                            "score": float(score)})
    return results


def agreement(reference: Sequence, candidate: Sequence, num_classes: int,
              min_score: float) -> float:
    """AP@[.5:.95] in percent of ``candidate`` detections against ``reference`` detections
    (score >= ``min_score``) as ground truth; both lists are per image, in the same order."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if len(reference) != len(candidate):
        raise ValueError(f"{len(reference)} reference vs {len(candidate)} candidate images")
    gt_data = pseudo_ground_truth(reference, num_classes, min_score)
    if not gt_data["annotations"]:
        raise StageError(f"the FP32 model has no detection scoring >= {min_score} on the "
                         f"{len(reference)} tuning images: agreement cannot be measured "
                         "(lower tune.min_score or use more tuning images)")
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        gt = COCO()
        gt.dataset = gt_data
        gt.createIndex()
        results = detection_results(candidate)
        if results:
            dt = gt.loadRes(results)
        else:  # loadRes refuses an empty list: nothing detected scores 0
            return 0.0
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return max(float(ev.stats[0]), 0.0) * 100.0


# ---------------------------------------------------------------------------------------------
# Sensitivity and the greedy choice

@dataclass
class LayerSensitivity:
    """One candidate layer: the agreement when it is the only quantized candidate, and the
    agreement that costs (100 = FP32's agreement with itself)."""

    layer: str
    agreement_alone: float
    sensitivity: float  # 100 - agreement_alone


@dataclass
class TuneResult:
    """What tuning measured and chose (recorded in the INT8 meta)."""

    threshold: float
    max_layers: int
    baseline: float  # agreement with every candidate quantized
    final: float  # agreement of the chosen configuration
    kept_fp32: list[str]  # layers kept in FP32, in the order they were added
    met: bool  # final >= threshold
    sensitivity: list[LayerSensitivity] = field(default_factory=list)  # most sensitive first
    steps: list[dict] = field(default_factory=list)  # agreement after each added layer

    def to_dict(self) -> dict:
        return asdict(self)


def rank_layers(candidates: Sequence[str], measure: Callable[[list[str]], float]
                ) -> list[LayerSensitivity]:
    """Quantize each candidate alone (every other one kept in FP32) and measure the agreement:
    most sensitive first, ties in candidate order (a stable sort: same inputs, same ranking).

    Alone rather than "all but this one": when several layers each damage the detections (a
    bad calibration), keeping any single one in FP32 barely helps and all look alike; quantized
    alone, each shows its own cost (README "Accuracy-aware INT8" has the demo's numbers)."""
    scores = []
    for i, layer in enumerate(candidates, 1):
        value = measure([c for c in candidates if c != layer])
        scores.append(LayerSensitivity(layer, value, PERFECT - value))
        log.info("sensitivity %d/%d: %s quantized alone -> agreement %.2f", i, len(candidates),
                 layer, value)
    return sorted(scores, key=lambda s: -s.sensitivity)


def tune(candidates: Sequence[str], measure: Callable[[list[str]], float], threshold: float,
         max_layers: int) -> TuneResult:
    """Measure every candidate's sensitivity, then keep the most sensitive layers in FP32 one at
    a time until ``measure(kept) >= threshold`` or ``max_layers`` are kept.

    ``measure(layers)`` returns the agreement of the model with ``layers`` kept in FP32 (every
    other candidate quantized). A layer that costs nothing quantized alone (sensitivity <= 0)
    is never kept: it would cost speed for no measurable agreement.
    """
    if not candidates:
        raise StageError("no quantized layer to tune: nothing was quantized")
    if len(set(candidates)) != len(candidates):
        raise ValueError("candidate layers must be unique")
    baseline = measure([])
    log.info("agreement with FP32 detections, all %d candidate layers quantized: %.2f "
             "(threshold %.2f)", len(candidates), baseline, threshold)
    ranked = rank_layers(candidates, measure)
    kept: list[str] = []
    final = baseline
    steps = []
    for s in ranked:
        if final >= threshold or len(kept) >= max_layers or s.sensitivity <= 0:
            break
        kept.append(s.layer)
        final = measure(list(kept))
        steps.append({"kept_fp32": list(kept), "agreement": final})
        log.info("keeping %d layer(s) in FP32 (+%s): agreement %.2f", len(kept), s.layer, final)
    return TuneResult(threshold, max_layers, baseline, final, kept, final >= threshold, ranked,
                      steps)


def sensitivity_rows(result: dict | None) -> list[tuple]:
    """(layer, agreement_alone, sensitivity, kept_fp32) rows of a recorded TuneResult dict,
    most sensitive first; no rows without tuning."""
    if not result:
        return []
    kept = set(result["kept_fp32"])
    return [(s["layer"], float(s["agreement_alone"]), float(s["sensitivity"]),
             int(s["layer"] in kept)) for s in result["sensitivity"]]
