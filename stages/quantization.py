"""INT8 quantization of a symbolic FP32 detector with MXNet's oneDNN (MKLDNN) backend.

The pieces of the quantize stage: choosing calibration images (``list_images``,
``pick_calibration``), running ``quantize_net_v2`` with MXNet's calibration chatter sent to a log
file (``quantize``, ``stderr_to``), reading what got quantized (``quantized_layers``,
``excluded_layers``) and the INT8 meta (``build_meta``).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import sys
import warnings
from pathlib import Path
from typing import Iterator, Protocol, Sequence

import mxnet as mx
import numpy as np

from stages.common import StageError, library_versions

log = logging.getLogger(__name__)


class Calibration(Protocol):
    """The quantization settings read here (the quantize stage's validated params have them)."""

    calib_mode: str  # naive | entropy | none
    batch_size: int
    seed: int
    exclude_layers: Sequence[str]  # substrings of layer names kept in FP32
    quantized_dtype: str  # auto | int8 | uint8


def list_images(images_dir: Path, image_list: Path | None) -> list[Path]:
    """Candidate calibration images: ids of ``image_list`` (``<id>.jpg``) or every ``*.jpg``."""
    if image_list is not None:
        try:
            ids = [line.split()[0] for line in image_list.read_text().splitlines() if line.strip()]
        except OSError as exc:
            raise StageError(f"cannot read image list {image_list}: {exc.strerror}") from exc
        paths = [images_dir / f"{i}.jpg" for i in ids]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise StageError(f"{len(missing)} listed image(s) missing, e.g. {missing[0]}")
        return paths
    paths = sorted(images_dir.glob("*.jpg"))
    if not paths:
        raise StageError(f"no *.jpg images in {images_dir}")
    return paths


def pick_calibration(paths: Sequence[Path], n: int, seed: int) -> list[Path]:
    """``n`` images drawn without replacement with ``seed`` (same inputs → same images)."""
    if n > len(paths):
        raise StageError(f"calibration needs {n} images, only {len(paths)} available")
    return random.Random(seed).sample(sorted(paths), n)


CPP_TIME = re.compile(r"^\[\d\d:\d\d:\d\d\] ", re.MULTILINE)  # dmlc's "[15:11:45] " prefix


@contextlib.contextmanager
def stderr_to(path: Path) -> Iterator[logging.Logger]:
    """Send file descriptor 2 (MXNet's C++ log), Python warnings and a calibration logger to
    ``path``. The file is reproducible: no clock times (dmlc's prefix is removed when the block
    ends) and warnings without the file path of the code that raised them."""
    sys.stderr.flush()
    saved = os.dup(2)
    calib_log = logging.getLogger(f"{__name__}.calibration")
    with open(path, "a", encoding="utf-8") as fh, warnings.catch_warnings():
        handler = logging.StreamHandler(fh)
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        calib_log.addHandler(handler)
        calib_log.setLevel(logging.INFO)
        calib_log.propagate = False
        warnings.showwarning = lambda message, category, *_args, **_kw: calib_log.warning(
            "%s: %s", category.__name__, message)
        os.dup2(fh.fileno(), 2)
        try:
            yield calib_log
        finally:
            sys.stderr.flush()
            fh.flush()
            os.dup2(saved, 2)
            os.close(saved)
            calib_log.removeHandler(handler)
    path.write_text(CPP_TIME.sub("", path.read_text(errors="replace")), encoding="utf-8")


def quantized_layers(symbol_json: str) -> list[dict]:
    """Quantized nodes of a symbol: oneDNN conv subgraphs marked quantized (with the original
    convolution names inside) and other ``_contrib_quantized_*`` operators."""
    found = []
    for node in json.loads(symbol_json)["nodes"]:
        op, attrs = node["op"], node.get("attrs", {})
        if op == "_sg_mkldnn_conv" and attrs.get("quantized") == "true":
            inner = [n["name"] for g in node.get("subgraphs", []) for n in g["nodes"]
                     if n["op"] == "Convolution"]
            found.append({"name": node["name"], "op": "quantized_conv", "layers": inner})
        elif op.startswith("_contrib_quantized_"):
            found.append({"name": node["name"], "op": op.replace("_contrib_", "")})
    return found


def excluded_layers(symbol_file: Path, patterns: Sequence[str]) -> list[str]:
    """Layers of the FP32 graph whose names contain one of ``patterns`` (kept in FP32, as
    MXNet's ``exclude_layers_match`` selects them)."""
    internals = mx.sym.load(str(symbol_file)).get_internals()
    return sorted({s.name for s in internals if any(p in s.name for p in patterns)})


def quantize(fp32_net, calib_data: np.ndarray | None, data_shape: int, p: Calibration,
             calib_log: logging.Logger | None, keep_fp32: Sequence[str] = ()):
    """Quantize ``fp32_net`` (a SymbolBlock) with calibration batches ``calib_data`` → INT8
    SymbolBlock. Given a logger, MXNet also logs every layer's decision and range (C++, fd 2).
    ``keep_fp32``: exact layer names kept in FP32 besides ``p.exclude_layers``' patterns (the
    layers accuracy-aware tuning chose)."""
    from mxnet.contrib.quantization import quantize_net_v2

    kwargs = {}
    if p.calib_mode == "none":
        kwargs["data_shapes"] = [mx.io.DataDesc("data", (p.batch_size, 3, data_shape, data_shape))]
    else:
        kwargs["calib_data"] = mx.io.NDArrayIter(data=calib_data, batch_size=p.batch_size)
        kwargs["num_calib_examples"] = len(calib_data)
    verbose = os.environ.get("MXNET_QUANTIZATION_VERBOSE")
    try:
        return quantize_net_v2(fp32_net, quantized_dtype=p.quantized_dtype, quantize_mode="full",
                               exclude_layers=list(keep_fp32),
                               exclude_layers_match=list(p.exclude_layers),
                               calib_mode=p.calib_mode, ctx=mx.cpu(), logger=calib_log, **kwargs)
    finally:  # MXNet turns its verbose C++ log on for good when given a logger
        if verbose is None:
            os.environ.pop("MXNET_QUANTIZATION_VERBOSE", None)
        else:
            os.environ["MXNET_QUANTIZATION_VERBOSE"] = verbose


def build_meta(fp32_meta: dict, p: Calibration, calibration: list[str], layers: list[dict],
               excluded: list[str], fp32_params_md5: str, params_md5: str) -> dict:
    """INT8 meta: the FP32 meta with precision int8, calibration settings and quantized layers."""
    meta = dict(fp32_meta)
    meta.update({
        "precision": "int8",
        "calibration": {
            "mode": p.calib_mode,
            "images": len(calibration),
            "batch_size": p.batch_size,
            "seed": p.seed,
            "exclude_layers": list(p.exclude_layers),
            "quantized_dtype": p.quantized_dtype,
            "image_names": calibration,
        },
        "quantized_layers": layers,
        "excluded_layers": excluded,
        "params_md5": params_md5,
        "fp32_params_md5": fp32_params_md5,
        "subgraph_backend": os.environ.get("MXNET_SUBGRAPH_BACKEND", "MKLDNN (default)"),
        "libraries": library_versions(),
    })
    return meta
