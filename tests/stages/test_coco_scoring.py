"""faster-coco-eval must give pycocotools' summary stats to the last digit the project writes.

Bit for bit where the test says so. Not always in general: pycocotools computes precision as
tp / (tp + fp + eps) and faster-coco-eval's C++ as tp / (tp + fp), so a precision-recall point
at 1 true positive and no false positive is 1 - 2**-52 in one and 1.0 in the other, and a mean
over such cells can differ in its 16th significant digit (seen on a 20-image subset below). The
metrics files keep 6 decimals of a percentage (8 significant digits): those are compared exactly.

The val2017-sized set (5,000 images x 100 detections x 80 classes) takes pycocotools ~50 s on
2 cores, so its pycocotools stats are a committed fixture (``python -m tests.stages.coco_synth``
rewrites it; the set's sha256 tells a changed generator from a changed scorer), and a 500-image
set is compared live with both libraries. Set SSD_REPRO_FULL_SCORING=1 to also run pycocotools
live on the big set. The demo test compares both on the demo's own detections.
"""
import json
import os

import numpy as np
import pytest

from stages.coco_scoring import SCORERS, score_bbox, summary_text
from tests.stages.coco_synth import BIG, FIXTURE, digest, make_result_set, pycocotools_gt


def reported(stats) -> list[float]:
    """The stats as the metrics file writes them (evaluate_coco: percent, 6 decimals)."""
    return [round(float(v) * 100.0, 6) if v >= 0 else -1.0 for v in stats]


def both(gt: dict, results: list[dict], image_ids=None):
    ids = image_ids if image_ids is not None else [i["id"] for i in gt["images"]]
    return [score_bbox(pycocotools_gt(gt), results, ids, s) for s in SCORERS]


def test_live_500_images_stats_equal_to_the_last_bit():
    gt, results = make_result_set(500, seed=7)
    ref, fast = both(gt, results)
    assert 0 < ref.stats[0] < ref.stats[1] < 1  # a set that exercises the ranking
    assert ref.stats.tolist() == fast.stats.tolist()  # float equality: every bit
    assert ref.summary == fast.summary
    # precision arrays: same shape and undefined cells; values at most a few ulp apart
    assert ref.precision.shape == fast.precision.shape
    assert np.array_equal(ref.precision == -1, fast.precision == -1)
    np.testing.assert_allclose(fast.precision, ref.precision, rtol=0, atol=1e-12)


def test_val2017_sized_set_matches_the_pycocotools_fixture():
    fixture = json.loads(FIXTURE.read_text())
    gt, results = make_result_set(**BIG)
    assert digest(gt, results) == fixture["sha256"], (
        "the generated set changed: rerun `python -m tests.stages.coco_synth`")
    assert len(results) == fixture["results"] >= 490_000
    want = [float(v) for v in fixture["stats"]]
    ids = [i["id"] for i in gt["images"]]
    fast = score_bbox(pycocotools_gt(gt), results, ids, "faster-coco-eval")
    assert fast.stats.tolist() == want
    if os.environ.get("SSD_REPRO_FULL_SCORING") == "1":
        assert score_bbox(pycocotools_gt(gt), results, ids, "pycocotools").stats.tolist() == want


def test_subset_of_images_empty_results_and_results_left_untouched():
    gt, results = make_result_set(60, seed=3)
    some = [i["id"] for i in gt["images"]][::3]
    ref, fast = both(gt, results, some)
    assert reported(ref.stats) == reported(fast.stats)
    np.testing.assert_allclose(fast.stats, ref.stats, rtol=4e-16, atol=0)  # the eps above
    before = json.dumps(results)
    score_bbox(pycocotools_gt(gt), results, some, "faster-coco-eval")
    score_bbox(pycocotools_gt(gt), results, some, "pycocotools")
    assert json.dumps(results) == before  # no id/area/segmentation keys added to the caller's

    ref, fast = both(gt, [])
    assert ref.stats.tolist() == fast.stats.tolist()
    assert ref.stats[0] == 0.0


def test_perfect_detections_score_one_with_both():
    gt, _ = make_result_set(40, seed=5)
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
                "score": 0.9} for a in gt["annotations"] if not a["iscrowd"]]
    for scores in both(gt, results):
        assert scores.stats[0] == pytest.approx(1.0)


def test_unknown_scorer_is_refused():
    gt, results = make_result_set(3)
    with pytest.raises(ValueError, match="unknown scorer 'cocoapi'; known: pycocotools, "
                                         "faster-coco-eval"):
        score_bbox(pycocotools_gt(gt), results, [1, 2, 3], "cocoapi")


def test_summary_text_is_pycocotools_format():
    text = summary_text([0.5] + [-1.0] * 11).splitlines()
    assert text[0] == (" Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | "
                       "maxDets=100 ] = 0.500")
    assert text[6] == (" Average Recall     (AR) @[ IoU=0.50:0.95 | area=   all | "
                       "maxDets=  1 ] = -1.000")
