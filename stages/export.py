"""Exporting a Gluon block as a symbolic model, checking the export, publishing it.

A symbolic model at prefix P is three files: ``P-symbol.json``, ``P-0000.params`` and
``P-meta.json``. The convert and quantize stages export into a staging directory beside P
(``StagingDir``), reload the export and compare its detections with the block's on a fixed input
(``verify_roundtrip``), then move the files into place with the meta written last (``publish``).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import mxnet as mx
import numpy as np

from stages.common import StageError, write_json
from stages.inference import load_symbol_block, model_files

def check_input(data_shape: int, batch: int = 2):
    """A fixed, deterministic input (a smooth pattern plus noise) for the export checks."""
    rng = np.random.RandomState(0)
    yy, xx = np.mgrid[0:data_shape, 0:data_shape] / float(data_shape)
    base = np.stack([np.sin(6 * xx), np.cos(5 * yy), np.sin(4 * (xx + yy))])
    x = base[None] * 1.5 + rng.normal(0, 0.3, (batch, 3, data_shape, data_shape))
    return mx.nd.array(x.astype("float32"))


def outputs_to_numpy(outputs) -> list:
    """(ids, scores, bboxes) NDArrays as numpy arrays."""
    return [o.asnumpy() for o in outputs]


def compare_outputs(ref: list, got: list, atol: float) -> str | None:
    """None if detections match (ids exactly, scores/boxes within ``atol``), else a reason."""
    names = ("ids", "scores", "bboxes")
    for name, a, b in zip(names, ref, got):
        if a.shape != b.shape:
            return f"{name}: shape {b.shape} != {a.shape}"
    if not np.array_equal(ref[0], got[0]):
        return f"ids differ in {int((ref[0] != got[0]).sum())} of {ref[0].size} rows"
    for name, a, b in zip(names[1:], ref[1:], got[1:]):
        diff = float(np.abs(a - b).max()) if a.size else 0.0
        if diff > atol:
            return f"{name} differ by up to {diff:g} (allowed {atol:g})"
    return None


def export_block(block, prefix: Path, x) -> list:
    """Hybridize, run ``x`` (needed before export), export to ``prefix``; return its outputs."""
    block.hybridize()
    with warnings.catch_warnings():
        # the seed head reads precomputed anchors: the SSD's anchor generators stay unused
        warnings.filterwarnings("ignore", message=".*(is not used by any computation|"
                                "is not found in the graph).*")
        outputs = outputs_to_numpy(block(x))
        block.export(str(prefix), epoch=0)
    return outputs


def verify_roundtrip(prefix: Path, x, expected: list, atol: float) -> None:
    """Reload the exported files and check they reproduce ``expected`` on ``x``."""
    try:
        got = outputs_to_numpy(load_symbol_block(prefix)(x))
    except mx.base.MXNetError as exc:
        raise StageError(f"exported model {prefix} does not reload: {exc}") from exc
    reason = compare_outputs(expected, got, atol)
    if reason:
        raise StageError(f"exported model {prefix} differs from the Gluon block: {reason}")


def publish(tmp_prefix: Path, prefix: Path, meta: dict) -> None:
    """Move the exported files from ``tmp_prefix`` to ``prefix`` and write meta last (an old
    meta goes first, so an interrupted publish never pairs it with new weights)."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    model_files(prefix)[2].unlink(missing_ok=True)
    for src, dst in zip(model_files(tmp_prefix)[:2], model_files(prefix)[:2]):
        os.replace(src, dst)
    write_json(model_files(prefix)[2], meta)


@dataclass
class StagingDir:
    """A temporary directory beside ``prefix`` (same filesystem), removed on exit."""

    prefix: Path

    def __enter__(self) -> Path:
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=f".{self.prefix.name}.", dir=self.prefix.parent))
        return self.path / self.prefix.name

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
