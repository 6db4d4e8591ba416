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

With ``tune.enabled`` (off by default: the output is then exactly what it was before tuning
existed), the stage first measures how far INT8 detections are from FP32 detections on
``tune.images`` images of the calibration pool (no labels: README "Accuracy-aware INT8"),
measures every convolution's sensitivity, keeps the most sensitive ones in FP32 until the
agreement reaches ``tune.threshold`` or ``tune.max_layers`` are kept, and quantizes with them
in FP32; the meta's ``tuning`` entry records all of it.
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
from stages.inference import (ImageItem, load_batch, load_symbol_block, model_files,
                              model_outputs, read_meta)
from stages.int8_tuning import (AgreementProbe, Recipe, Thresholds, candidate_layers,
                                quiet_subgraph_log, tuning_images, tuning_record,
                                uncalibrated_nodes)
from stages.outputs import check_outputs
from stages.quantization import (build_meta, excluded_layers, list_images, pick_calibration,
                                 quantize, quantized_layers, stderr_to)
from stages.tuning import TuneResult, tune

log = logging.getLogger(__name__)


class TuneParams(Section):
    """``quantize.<branch>.tune``: accuracy-aware INT8, label-free."""

    enabled: bool = False
    images: int = Field(default=64, gt=0)  # calibration images first, then more of the pool
    min_score: float = Field(default=0.5, gt=0, lt=1)  # FP32 boxes >= this are pseudo-objects
    threshold: float = Field(default=95.0, gt=0, le=100)  # agreement to reach, percent
    max_layers: int = Field(default=8, gt=0)  # most layers kept in FP32


class QuantizeParams(Section):
    """``quantize.<branch>`` in params.yaml."""

    calib_mode: Literal["naive", "entropy", "none"] = "naive"
    calib_images: int = Field(default=128, gt=0)
    batch_size: int = Field(default=32, gt=0)
    # substrings of layer names kept in FP32 (MXNet's exclude_layers_match)
    exclude_layers: list[str] = ["flatten", "concat"]
    quantized_dtype: Literal["auto", "int8", "uint8"] = "auto"
    seed: int = 0
    tune: TuneParams = TuneParams()

    @model_validator(mode="after")
    def _whole_batches(self) -> "QuantizeParams":
        if self.calib_images % self.batch_size:
            raise ValueError(f"calib_images ({self.calib_images}) must be a multiple of "
                             f"batch_size ({self.batch_size}): calibration runs whole batches")
        return self


def load_images(paths: list[Path], meta: dict):
    """Preprocessed (N, 3, S, S) batch of image files, as evaluation preprocesses them."""
    items = [ImageItem(path.name, path) for path in paths]
    return load_batch(items, int(meta["data_shape"]), meta["mean"], meta["std"]).data


def tune_layers(p: QuantizeParams, fp32: Path, fp32_net, fp32_meta: dict, pool: list[Path],
                picked: list[Path], calib_data) -> tuple[TuneResult, AgreementProbe, list[str]]:
    """Measure agreement and sensitivities, choose the layers kept in FP32 (stages.tuning)."""
    chosen = tuning_images(pool, picked, p.tune.images, p.seed)
    recipe = Recipe(p.calib_mode, p.quantized_dtype, tuple(p.exclude_layers),
                    int(fp32_meta["data_shape"]))
    log.info("tuning: agreement of INT8 with FP32 detections on %d images of the calibration "
             "pool (FP32 boxes scoring >= %g as objects), threshold %.1f, at most %d layers in "
             "FP32", len(chosen), p.tune.min_score, p.tune.threshold, p.tune.max_layers)
    candidates = candidate_layers(Path(f"{fp32}-symbol.json").read_text(), p.exclude_layers)
    with quiet_subgraph_log():
        cache = Thresholds(fp32_net, recipe, calib_data, p.batch_size)
        probe = AgreementProbe(fp32_net, recipe, cache, load_images(chosen, fp32_meta),
                               p.batch_size, len(fp32_meta["classes"]), p.tune.min_score)
        result = tune(candidates, probe, p.tune.threshold, p.tune.max_layers)
    return result, probe, [path.name for path in chosen]


def run(p: QuantizeParams, fp32: Path, out: Path, images: Path, image_list: Path | None,
        log_path: Path) -> dict:
    """The stage's work: pick and load calibration images, tune if asked, quantize, export,
    verify, publish."""
    fp32_meta = read_meta(fp32)
    size = int(fp32_meta["data_shape"])
    calibrate = p.calib_mode != "none"
    pool = list_images(images, image_list) if calibrate or p.tune.enabled else []
    picked = pick_calibration(pool, p.calib_images, p.seed) if calibrate else []
    calibration = [path.name for path in picked]
    calib_data = load_images(picked, fp32_meta) if calibrate else None
    if calibrate:
        log.info("calibrating (%s) on %d images drawn with seed %d from %s", p.calib_mode,
                 len(picked), p.seed, images)
    fp32_net = load_symbol_block(fp32)
    tuned = tune_layers(p, fp32, fp32_net, fp32_meta, pool, picked, calib_data) \
        if p.tune.enabled else None
    keep = tuned[0].kept_fp32 if tuned else []
    with atomic_path(log_path) as tmp_log:
        tmp_log.touch()
        with stderr_to(tmp_log) as calib_log:
            try:
                int8_net = quantize(fp32_net, calib_data, size, p, calib_log, keep)
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
            missing = uncalibrated_nodes(Path(f"{tmp_prefix}-symbol.json").read_text())
            if calibrate and missing:
                raise StageError(f"quantized node(s) without calibrated ranges: {missing[:5]}")
            verify_roundtrip(tmp_prefix, x, expected, atol=1e-3)
            excluded = excluded_layers(Path(f"{fp32}-symbol.json"), p.exclude_layers)
            meta = build_meta(fp32_meta, p, calibration, layers, sorted(excluded + keep),
                              file_digest(f"{fp32}-0000.params"),
                              file_digest(f"{tmp_prefix}-0000.params"))
            if tuned:
                meta["tuning"] = record_tuning(p, tuned, int8_net)
            publish(tmp_prefix, out, meta)
    convs = sum(layer["op"] == "quantized_conv" for layer in layers)
    log.info("INT8 model %s: %d quantized convolutions, %d other quantized ops; "
             "calibration log %s (%d lines)", out, convs, len(layers) - convs, log_path, lines)
    return meta


def record_tuning(p: QuantizeParams, tuned: tuple, int8_net) -> dict:
    """The meta's tuning entry, with the agreement of the model being published."""
    result, probe, names = tuned
    after = probe.of(int8_net)
    log.info("tuning: agreement %.2f before, %.2f after keeping %d layer(s) in FP32: %s",
             result.baseline, after, len(result.kept_fp32), ", ".join(result.kept_fp32) or "none")
    if after < p.tune.threshold:
        log.warning("tuning did not reach agreement %.1f with at most %d layers in FP32 (got "
                    "%.2f): the model is published as is; the compare floor judges its mAP",
                    p.tune.threshold, p.tune.max_layers, after)
    return tuning_record(result, after, names, p.tune.model_dump())


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
