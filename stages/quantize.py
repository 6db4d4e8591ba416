"""Quantize a symbolic FP32 detector to INT8 with MXNet's oneDNN (MKLDNN) backend.

    python -m stages.quantize coco --fp32 model/coco/fp32 --out model/coco/int8 \\
        --images data/coco/val2017 --log model/coco/int8-calibration.log
    python -m stages.quantize voc --fp32 ... --out ... --images .../JPEGImages \\
        --image-list .../ImageSets/Main/trainval.txt --log ...

Reads params ``quantize.<branch>``. Calibration images are drawn from ``--images`` (all ``*.jpg``,
or the ids listed in ``--image-list``) with a fixed seed, preprocessed like evaluation, and fed
through ``quantize_net_v2`` (the oneDNN fusion + quantization pass: convolutions with their
ReLUs become quantized ``_sg_mkldnn_conv`` nodes). MXNet's calibration chatter (C++ stderr and
its Python logger) goes to ``--log``; the console gets a summary. Writes ``<out>-symbol.json``,
``<out>-0000.params`` and ``<out>-meta.json`` (the FP32 meta plus precision int8, calibration
settings and the quantized layers).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import sys
from pathlib import Path
from typing import Iterator, Literal, Sequence

import mxnet as mx
import numpy as np
from pydantic import Field, model_validator

from stages.common import (StageError, atomic_path, file_digest, library_versions, main_guard,
                           seed_everything)
from stages.config import Section, load_branch
from stages.convert import StagingDir, check_input, export_block, publish, verify_roundtrip
from stages.inference import ImageItem, load_batch, load_symbol_block, read_meta

log = logging.getLogger(__name__)


class QuantizeParams(Section):
    """``quantize.<branch>`` in params.yaml."""

    calib_mode: Literal["naive", "entropy", "none"] = "naive"
    calib_images: int = Field(default=128, gt=0)
    batch_size: int = Field(default=32, gt=0)
    # substrings of layer names kept in FP32 (MXNet's exclude_layers_match)
    exclude_layers: list[str] = ["flatten", "concat"]
    quantized_dtype: Literal["auto", "int8", "uint8"] = "auto"
    seed: int = 0

    @model_validator(mode="after")
    def _whole_batches(self) -> "QuantizeParams":
        if self.calib_images % self.batch_size:
            raise ValueError(f"calib_images ({self.calib_images}) must be a multiple of "
                             f"batch_size ({self.batch_size}): calibration runs whole batches")
        return self


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


@contextlib.contextmanager
def stderr_to(path: Path) -> Iterator[logging.Logger]:
    """Send file descriptor 2 (MXNet's C++ log) and a calibration logger to ``path``."""
    sys.stderr.flush()
    saved = os.dup(2)
    calib_log = logging.getLogger(f"{__name__}.calibration")
    with open(path, "a", encoding="utf-8") as fh:
        handler = logging.StreamHandler(fh)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        calib_log.addHandler(handler)
        calib_log.setLevel(logging.INFO)
        calib_log.propagate = False
        os.dup2(fh.fileno(), 2)
        try:
            yield calib_log
        finally:
            sys.stderr.flush()
            fh.flush()
            os.dup2(saved, 2)
            os.close(saved)
            calib_log.removeHandler(handler)


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


def quantize(fp32_net, calib_data: np.ndarray | None, data_shape: int, p: QuantizeParams,
             calib_log: logging.Logger | None):
    """Quantize ``fp32_net`` (a SymbolBlock) with calibration batches ``calib_data`` → INT8
    SymbolBlock. Given a logger, MXNet also logs every layer's decision and range (C++, fd 2)."""
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
                               exclude_layers_match=list(p.exclude_layers),
                               calib_mode=p.calib_mode, ctx=mx.cpu(), logger=calib_log, **kwargs)
    finally:  # MXNet turns its verbose C++ log on for good when given a logger
        if verbose is None:
            os.environ.pop("MXNET_QUANTIZATION_VERBOSE", None)
        else:
            os.environ["MXNET_QUANTIZATION_VERBOSE"] = verbose


def build_meta(fp32_meta: dict, p: QuantizeParams, calibration: list[str], layers: list[dict],
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


def run(p: QuantizeParams, fp32: Path, out: Path, images: Path, image_list: Path | None,
        log_path: Path) -> dict:
    """The stage's work: pick and load calibration images, quantize, export, verify, publish."""
    fp32_meta = read_meta(fp32)
    size = int(fp32_meta["data_shape"])
    calibration: list[str] = []
    calib_data = None
    if p.calib_mode != "none":
        picked = pick_calibration(list_images(images, image_list), p.calib_images, p.seed)
        calibration = [path.name for path in picked]
        items = [ImageItem(path.name, path) for path in picked]
        calib_data = load_batch(items, size, fp32_meta["mean"], fp32_meta["std"]).data
        log.info("calibrating (%s) on %d images drawn with seed %d from %s", p.calib_mode,
                 len(items), p.seed, images)
    fp32_net = load_symbol_block(fp32)
    with atomic_path(log_path) as tmp_log:
        tmp_log.touch()
        with stderr_to(tmp_log) as calib_log:
            try:
                int8_net = quantize(fp32_net, calib_data, size, p, calib_log)
            except (mx.base.MXNetError, ValueError) as exc:
                calib_log.exception("quantization failed")
                tail = "\n".join(tmp_log.read_text(errors="replace").splitlines()[-15:])
                raise StageError(f"quantization failed: {exc}\nlast lines of its log:\n{tail}") \
                    from exc
        lines = len(tmp_log.read_text(errors="replace").splitlines())
        x = check_input(size)
        with StagingDir(out) as tmp_prefix:
            expected = export_block(int8_net, tmp_prefix, x)
            layers = quantized_layers(Path(f"{tmp_prefix}-symbol.json").read_text())
            if not any(layer["op"] == "quantized_conv" for layer in layers):
                raise StageError("no convolution was quantized: check quantize.exclude_layers "
                                 f"({list(p.exclude_layers)}) and the oneDNN backend")
            verify_roundtrip(tmp_prefix, x, expected, atol=1e-3)
            excluded = excluded_layers(Path(f"{fp32}-symbol.json"), p.exclude_layers)
            meta = build_meta(fp32_meta, p, calibration, layers, excluded,
                              file_digest(f"{fp32}-0000.params"),
                              file_digest(f"{tmp_prefix}-0000.params"))
            publish(tmp_prefix, out, meta)
    convs = sum(layer["op"] == "quantized_conv" for layer in layers)
    log.info("INT8 model %s: %d quantized convolutions, %d other quantized ops; "
             "calibration log %s (%d lines)", out, convs, len(layers) - convs, log_path, lines)
    return meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("branch", help="params section quantize.<branch>, e.g. coco")
    parser.add_argument("--fp32", required=True, type=Path, help="FP32 model prefix")
    parser.add_argument("--out", required=True, type=Path, help="INT8 model prefix")
    parser.add_argument("--images", required=True, type=Path, help="calibration image dir")
    parser.add_argument("--image-list", type=Path, help="file of image ids (<id>.jpg in --images)")
    parser.add_argument("--log", required=True, type=Path, help="calibration log file")
    args = parser.parse_args(argv)
    p = load_branch("quantize", args.branch, QuantizeParams)
    seed_everything(p.seed)
    run(p, args.fp32, args.out, args.images, args.image_list, args.log)
    return 0


if __name__ == "__main__":
    main_guard(main)
