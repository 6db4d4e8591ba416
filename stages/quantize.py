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
import logging
from pathlib import Path
from typing import Literal

import mxnet as mx
from pydantic import Field, model_validator

from stages.common import StageError, atomic_path, file_digest, main_guard, seed_everything
from stages.config import Section, load_branch
from stages.export import StagingDir, check_input, export_block, publish, verify_roundtrip
from stages.inference import (ImageItem, load_batch, load_symbol_block, model_files, model_outputs,
                              read_meta)
from stages.outputs import check_outputs
from stages.quantization import (build_meta, excluded_layers, list_images, pick_calibration,
                                 quantize, quantized_layers, stderr_to)

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
    check_outputs(files={**model_outputs(args.out), "--log": args.log},
                  inputs={"--fp32": model_files(args.fp32), "--images": args.images,
                          "--image-list": [args.image_list] if args.image_list else []})
    seed_everything(p.seed)
    run(p, args.fp32, args.out, args.images, args.image_list, args.log)
    return 0


if __name__ == "__main__":
    main_guard(main)
