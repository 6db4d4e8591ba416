"""Evaluate a symbolic detector on COCO val2017 (pycocotools or faster-coco-eval scoring).

    python -m stages.evaluate_coco coco fp32 --model model/coco/fp32 --images data/coco/val2017 \\
        --annotations data/coco/annotations/instances_val2017.json \\
        --metrics metrics/coco_fp32.json --speed metrics/speed_coco_fp32.json \\
        --eval-dir eval/coco_fp32

Reads params ``evaluate.<branch>``. Every image of the annotation file is evaluated (those
without annotations too, as the seed does), in sorted image-id order, up to ``max_images``,
through the shared inference path (``stages/inference.py``); scoring is ``stages/coco_eval.py``
(class mapping, COCO results format with ``xywh_plus_one``) with the ``scorer`` of the params:
``pycocotools`` (the reference) or ``faster-coco-eval`` (same summary stats, ~5x faster).

The speed file adds to the shared keys (images/s of the detection loop, latency, ...) where the
stage's wall time went: ``setup_s`` (annotations, model), ``detect_s`` (decode, preprocess,
forward), ``score_s`` (COCO results and scoring), ``write_s`` (every output), ``total_s``.

Outputs: accuracy metrics (percent; -1 where COCO has no ground truth for a stat), speed,
and the eval dir: detections.json (COCO results format), per_class.csv (class,ap),
pr.csv (recall,precision at IoU 0.5, area all, 100 detections, mean over classes),
samples/<image_id>.png, provenance.json (model head, calibration, params, library versions).
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Literal

from pydantic import Field

from stages.coco_eval import (category_ids_for, image_items, load_coco, metrics_from,
                              per_class_ap, pr_curve, score_detections, to_coco_results)
from stages.common import dumps_json, file_digest, library_versions, main_guard, round_floats, \
    write_json
from stages.config import Section, load_branch
from stages.eval_outputs import (PRECISIONS, csv_text, expect_precision, latency_summary,
                                 precision_tables, write_eval_dir)
from stages.idle import IdleTask
from stages.inference import (configure_threads, detect_all, load_detector, model_files,
                              read_meta, start_loading, subgraph_backend)
from stages.outputs import check_outputs

log = logging.getLogger(__name__)


class EvaluateParams(Section):
    """``evaluate.<branch>`` in params.yaml."""

    batch_size: int = Field(default=64, gt=0)
    threads: int = Field(default=0, ge=0)  # 0 = all cores
    samples: int = Field(default=8, ge=0)  # images drawn with their detections
    max_images: int = Field(default=0, ge=0)  # 0 = all
    score_thresh: float = Field(default=0.05, ge=0, lt=1)  # GluonCV COCODetectionMetric default
    xywh_plus_one: bool = True
    draw_thresh: float = Field(default=0.3, ge=0, le=1)
    # pycocotools is the reference; faster-coco-eval gives its summary stats (tests prove it)
    scorer: Literal["pycocotools", "faster-coco-eval"] = "pycocotools"


def provenance(branch: str, precision: str, model: Path, meta: dict, md5: dict[str, str],
               p: EvaluateParams, threads: int) -> dict:
    """What produced these numbers (kept out of the metrics file); ``md5``: of the model's
    params file and of the annotation file."""
    return {
        "branch": branch,
        "precision": precision,
        "model": {"prefix": str(model), "network": meta["network"], "head": meta["head"],
                  "head_params": meta.get("head_params"),
                  "params_md5": md5["params"],
                  "calibration": meta.get("calibration"),
                  "quantized_layers": len(meta.get("quantized_layers", [])),
                  "tuning": meta.get("tuning"), "bf16": meta.get("bf16"),
                  "made_on": meta.get("cpu")},
        "annotations_md5": md5["annotations"],
        "params": p.model_dump(),
        "scorer": {"name": p.scorer, "version": metadata.version(p.scorer)},
        "threads": threads,
        "subgraph_backend": subgraph_backend(),
        "libraries": library_versions(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("branch", help="params section evaluate.<branch>, e.g. coco")
    parser.add_argument("precision", choices=PRECISIONS)
    parser.add_argument("--model", required=True, type=Path, help="symbolic model prefix")
    parser.add_argument("--images", required=True, type=Path, help="image dir (val2017)")
    parser.add_argument("--annotations", required=True, type=Path, help="instances json")
    parser.add_argument("--metrics", required=True, type=Path, help="accuracy metrics json")
    parser.add_argument("--speed", required=True, type=Path, help="speed metrics json")
    parser.add_argument("--eval-dir", required=True, type=Path, help="detections, tables, samples")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    p = load_branch("evaluate", args.branch, EvaluateParams)
    check_outputs(files={"--metrics": args.metrics, "--speed": args.speed},
                  dirs={"--eval-dir": args.eval_dir},
                  inputs={"--model": model_files(args.model), "--images": args.images,
                          "--annotations": args.annotations})
    threads = configure_threads(p.threads)  # before MXNet is imported (load_detector)
    meta = read_meta(args.model)
    expect_precision(meta, args.model, args.precision)
    # hashed for the provenance record by an idle-priority thread while setup keeps one core
    md5 = {"params": IdleTask(partial(file_digest, f"{args.model}-0000.params"), "md5-params"),
           "annotations": IdleTask(partial(file_digest, args.annotations), "md5-annotations")}
    coco = load_coco(args.annotations)
    category_ids = category_ids_for(meta["classes"], coco)
    items = image_items(coco, args.images, p.max_images)
    # images start decoding now, on the core that importing MXNet and loading the model leave
    with start_loading(items, meta, p.batch_size) as loader:
        net, meta = load_detector(args.model)
        log.info("evaluating %s (%s head, %s) on %d images, batch %d, %d threads", args.model,
                 meta["head"], args.precision, len(items), p.batch_size, threads)
        phases = {"setup_s": time.perf_counter() - started}
        detections, latencies, wall = detect_all(net, items, meta, p.batch_size, loader=loader)
    phases["detect_s"] = wall
    mark = time.perf_counter()
    results = to_coco_results(detections, category_ids, p.score_thresh, p.xywh_plus_one)
    scores = score_detections(coco, results, [it.key for it in items], p.scorer)
    metrics = metrics_from(scores, len(items))
    phases["score_s"] = time.perf_counter() - mark
    log.info("COCO bbox (%d detections, %s):\n%s", len(results), p.scorer, scores.summary)
    mark = time.perf_counter()

    write_eval_dir(args.eval_dir, {
        "detections.json": json.dumps(results, separators=(",", ":")) + "\n",
        "per_class.csv": csv_text(("class", "ap"), per_class_ap(scores.precision, meta["classes"]),
                                  float_digits=6),
        "pr.csv": csv_text(("recall", "precision"), pr_curve(scores.precision), float_digits=6),
        "provenance.json": dumps_json(provenance(args.branch, args.precision, args.model, meta,
                                                 {k: t.result() for k, t in md5.items()}, p,
                                                 threads)),
        **precision_tables(meta),
    }, items, detections, meta["classes"], p.samples, p.draw_thresh)
    write_json(args.metrics, metrics)
    phases["write_s"] = time.perf_counter() - mark
    phases["total_s"] = time.perf_counter() - started
    speed = round_floats({**latency_summary(latencies, len(items), wall, p.batch_size, threads),
                          **phases})
    write_json(args.speed, speed)
    log.info("mAP %.3f (AP50 %.3f) on %d images; %.2f images/s detecting; %s",
             metrics["map"], metrics["map50"], len(items), speed["images_per_s"],
             ", ".join(f"{k[:-2]} {v:.1f} s" for k, v in phases.items()))
    return 0


if __name__ == "__main__":
    main_guard(main)
