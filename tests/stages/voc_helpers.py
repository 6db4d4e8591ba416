"""Shared material of the VOC scoring tests: ground truth drawn so that VOC07's +1 pixel decides
a match differently in the network and the original frame (stages.voc.in_frame)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


def voc07_ious(boxes: np.ndarray, box) -> np.ndarray:
    """IoUs of (n, 4) xyxy boxes with one box, with VOC07's +1 pixel on x2 and y2 (as GluonCV's
    VOC07MApMetric computes them)."""
    a = np.asarray(boxes, np.float64) + [0, 0, 1, 1]
    b = np.asarray(box, np.float64) + [0, 0, 1, 1]
    wh = np.clip(np.minimum(a[:, 2:], b[2:]) - np.maximum(a[:, :2], b[:2]), 0, None)
    inter = wh.prod(axis=1)
    return inter / ((a[:, 2:] - a[:, :2]).prod(axis=1) + (b[2:] - b[:2]).prod() - inter)


def border_box(original: np.ndarray, scale: float, side: int, margin: float = 1e-3) -> list:
    """An integer object box in a ``side`` px square image near a detection box (``original``
    frame) that the detection matches (VOC07 IoU >= 0.5) in the original frame and misses in the
    network frame (both scaled by ``scale``), each by ``margin`` at least."""
    axes = [np.arange(max(0, int(v) - 12), min(side, int(v) + 13)) for v in original]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 4)
    grid = grid[(grid[:, 0] < grid[:, 2]) & (grid[:, 1] < grid[:, 3])]
    hit = voc07_ious(grid, original) >= 0.5 + margin
    miss = voc07_ious(grid * scale, np.asarray(original, np.float64) * scale) < 0.5 - margin
    assert (hit & miss).any(), f"no border case around {original}"
    return grid[hit & miss][0].tolist()


def write_border_devkit(devkit: Path, net, meta: dict, classes: Sequence[str], side: int = 64,
                        n: int = 4, seed: int = 9) -> Path:
    """A VOC2007 test split of ``n`` generated ``side`` px images under ``devkit``, each with one
    object: a border case (``border_box``) around ``net``'s top detection on it, of its class.
    ``meta`` gives the net's data_shape, mean and std. Returns ``devkit``."""
    from stages.dataset_files import write_voc
    from stages.synthetic import Sample, make_samples
    from stages.voc import detect_voc, load_voc

    samples = make_samples(n, classes, side, 2, seed=seed, first_index=20)
    write_voc(devkit, 2007, {"test": samples}, classes)
    dets, _, _ = detect_voc(net, meta, load_voc(str(devkit), [(2007, "test")], classes), n, n)
    scale = meta["data_shape"] / side
    crafted = [Sample(s.name, s.image,
                      np.array([border_box(d.boxes[0], scale, side)], np.float32),
                      d.ids[:1].copy())
               for s, d in zip(samples, dets)]
    write_voc(devkit, 2007, {"test": crafted}, classes)
    return devkit
