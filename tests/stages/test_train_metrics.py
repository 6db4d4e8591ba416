"""Epoch records over the workers of a job, and the training metrics (stages/train_metrics.py)."""
from __future__ import annotations

import pytest

from stages.parallel import Solo
from stages.train_metrics import combine, summarize

RECORD = {"epoch": 3, "loss": 2.0, "cls_loss": 1.5, "box_loss": 0.5, "correct": 6,
          "counted": 8, "images": 4, "seconds": 2.0, "lr": 0.01, "anchor_acc": 0.75,
          "images_per_s": 2.0}


class TwoWorkers:
    """Worker 0 of two: ``sum`` adds the other worker's values, as the kvstore's sums do."""

    rank, size = 0, 2

    def __init__(self, floats: list[float], ints: list[int]) -> None:
        self.floats, self.ints = floats, ints

    def sum(self, floats=(), ints=()):
        return ([a + b for a, b in zip(floats, self.floats, strict=True)],
                [a + b for a, b in zip(ints, self.ints, strict=True)])


def test_one_process_record_is_unchanged():
    assert combine(Solo("device"), RECORD) == RECORD


def test_workers_records_sum_counts_and_average_losses():
    """The other worker: losses 4.0, 2.5, 1.5 (loss, class, box); 2 of 8 anchors right, 4 images."""
    out = combine(TwoWorkers([4.0, 2.5, 1.5], [2, 8, 4]), RECORD)
    assert out["loss"] == pytest.approx(3.0) and out["cls_loss"] == pytest.approx(2.0)
    assert out["box_loss"] == pytest.approx(1.0)
    assert (out["correct"], out["counted"], out["images"]) == (8, 16, 8)
    assert out["anchor_acc"] == 0.5
    assert out["images_per_s"] == 4.0  # all images over this worker's (worker 0's) seconds
    assert (out["epoch"], out["lr"], out["seconds"]) == (3, 0.01, 2.0)


def test_a_record_without_anchors_or_time_has_zero_rates():
    empty = {**RECORD, "correct": 0, "counted": 0, "seconds": 0.0}
    out = combine(Solo("device"), empty)
    assert out["anchor_acc"] == 0.0 and out["images_per_s"] == 0.0


def test_summary_averages_over_all_anchors():
    history = [{"epoch": 1, "correct": 1, "counted": 4, "loss": 9.0, "images": 8, "seconds": 2.0},
               {"epoch": 2, "correct": 9, "counted": 12, "loss": 3.0, "images": 8, "seconds": 2.0}]
    assert summarize(history) == {"acc": 10 / 16, "loss": 3.0, "epochs": 2, "images_per_s": 4.0}
