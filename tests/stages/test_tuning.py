"""stages/tuning.py: label-free agreement and the greedy choice of layers kept in FP32."""
from __future__ import annotations

import numpy as np
import pytest

from stages.common import StageError
from stages.inference import Detections
from stages.tuning import agreement, pseudo_ground_truth, sensitivity_rows, tune


def det(key, rows):
    """Detections from (class, score, x1, y1, x2, y2) rows."""
    a = np.asarray(rows, np.float32).reshape(-1, 6)
    return Detections(key, a[:, 0].astype(np.int64), a[:, 1], a[:, 2:])


REFERENCE = [
    det(0, [(0, 0.9, 10, 10, 50, 50), (1, 0.8, 60, 60, 100, 110), (2, 0.2, 0, 0, 20, 20)]),
    det(1, [(3, 0.95, 5, 30, 40, 90), (0, 0.7, 70, 10, 120, 60)]),
    det(2, []),
]


def test_agreement_of_fp32_with_itself_is_100():
    assert agreement(REFERENCE, REFERENCE, num_classes=4, min_score=0.5) == pytest.approx(100.0)


def test_low_scores_are_not_objects_but_do_not_cost_agreement():
    gt = pseudo_ground_truth(REFERENCE, 4, 0.5)
    assert len(gt["annotations"]) == 4  # the 0.2 box is below min_score
    assert {a["category_id"] for a in gt["annotations"]} == {1, 2, 4}  # class index + 1
    # a candidate without the low-score box agrees fully as well
    trimmed = [det(0, [(0, 0.9, 10, 10, 50, 50), (1, 0.8, 60, 60, 100, 110)])] + REFERENCE[1:]
    assert agreement(REFERENCE, trimmed, 4, 0.5) == pytest.approx(100.0)


@pytest.mark.parametrize("change", ["shift", "class", "drop", "reorder"])
def test_what_int8_moves_costs_agreement(change):
    rows = [(0, 0.9, 10, 10, 50, 50), (1, 0.8, 60, 60, 100, 110)]
    if change == "shift":  # IoU ~0.8: lost at the strict IoU thresholds only
        rows[0] = (0, 0.9, 14, 14, 54, 54)
    elif change == "class":
        rows[1] = (2, 0.8, 60, 60, 100, 110)
    elif change == "drop":
        rows = rows[:1]
    else:  # a false box now outranks a true one
        rows.append((1, 0.99, 0, 80, 30, 120))
    candidate = [det(0, rows)] + REFERENCE[1:]
    value = agreement(REFERENCE, candidate, 4, 0.5)
    assert 0.0 < value < 100.0


def test_nothing_detected_agrees_zero():
    empty = [det(i, []) for i in range(3)]
    assert agreement(REFERENCE, empty, 4, 0.5) == 0.0


def test_no_pseudo_objects_is_an_error_not_a_score():
    with pytest.raises(StageError, match="no detection scoring >= 0.99"):
        agreement(REFERENCE, REFERENCE, 4, 0.99)


def test_image_lists_must_match():
    with pytest.raises(ValueError, match="3 reference vs 2 candidate"):
        agreement(REFERENCE, REFERENCE[:2], 4, 0.5)


# ---------------------------------------------------------------------------------------------
# The greedy choice, on an agreement that is a known function of the layers kept in FP32:
# each quantized layer costs its damage (a plain input of the algorithm, not a stand-in for it).

DAMAGE = {"conv0": 1.0, "conv1": 6.0, "conv2": 0.0, "conv3": 3.0, "conv4": 0.5}


class Measured:
    """agreement(kept) = 100 - sum of the damage of the layers still quantized; counts calls."""

    def __init__(self, damage=DAMAGE):
        self.damage = damage
        self.calls: list[list[str]] = []

    def __call__(self, kept: list[str]) -> float:
        self.calls.append(list(kept))
        return 100.0 - sum(d for name, d in self.damage.items() if name not in kept)


def test_layers_are_ranked_by_their_measured_cost_alone():
    measure = Measured()
    result = tune(list(DAMAGE), measure, threshold=99.0, max_layers=5)
    assert [s.layer for s in result.sensitivity] == ["conv1", "conv3", "conv0", "conv4", "conv2"]
    assert [s.sensitivity for s in result.sensitivity] == pytest.approx([6, 3, 1, 0.5, 0])
    # alone = every other candidate kept in FP32
    assert sorted(measure.calls[2]) == ["conv0", "conv2", "conv3", "conv4"]


def test_greedy_stops_as_soon_as_the_threshold_holds():
    result = tune(list(DAMAGE), Measured(), threshold=98.0, max_layers=5)
    assert result.baseline == pytest.approx(89.5)
    assert result.kept_fp32 == ["conv1", "conv3"]  # 100 - 1.5 = 98.5 >= 98
    assert result.final == pytest.approx(98.5) and result.met
    assert [s["agreement"] for s in result.steps] == pytest.approx([95.5, 98.5])


def test_max_layers_caps_the_choice_and_a_miss_is_recorded():
    result = tune(list(DAMAGE), Measured(), threshold=99.9, max_layers=2)
    assert result.kept_fp32 == ["conv1", "conv3"]
    assert not result.met and result.final == pytest.approx(98.5)


def test_a_layer_that_costs_nothing_is_never_kept():
    result = tune(list(DAMAGE), Measured(), threshold=100.0, max_layers=5)
    assert result.kept_fp32 == ["conv1", "conv3", "conv0", "conv4"]  # not conv2
    assert result.met


def test_already_good_int8_keeps_nothing_but_reports_sensitivity():
    result = tune(list(DAMAGE), Measured(), threshold=80.0, max_layers=3)
    assert result.kept_fp32 == [] and result.met and result.final == result.baseline
    assert len(result.sensitivity) == 5
    rows = sensitivity_rows(result.to_dict())
    assert rows[0] == ("conv1", pytest.approx(94.0), pytest.approx(6.0), 0)


def test_ties_keep_candidate_order():
    flat = {"a": 1.0, "b": 1.0, "c": 1.0}
    result = tune(list(flat), Measured(flat), threshold=100.0, max_layers=1)
    assert [s.layer for s in result.sensitivity] == ["a", "b", "c"] and result.kept_fp32 == ["a"]


def test_nothing_to_tune_or_duplicates_are_refused():
    with pytest.raises(StageError, match="nothing was quantized"):
        tune([], Measured(), 90.0, 2)
    with pytest.raises(ValueError, match="unique"):
        tune(["conv1", "conv1"], Measured(), 90.0, 2)


def test_sensitivity_rows_mark_kept_layers_and_are_empty_without_tuning():
    result = tune(list(DAMAGE), Measured(), threshold=98.0, max_layers=5).to_dict()
    rows = sensitivity_rows(result)
    assert [r[0] for r in rows if r[3]] == ["conv1", "conv3"]
    assert sensitivity_rows(None) == []
