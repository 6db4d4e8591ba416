"""Evaluate a symbolic SSD on Pascal VOC: VOC07 11-point mAP (difficult objects ignored).

    python -m stages.evaluate_voc voc fp32 --model model/voc/fp32 --data data/voc/VOCdevkit \
        --metrics metrics/voc_fp32.json --speed metrics/speed_voc_fp32.json \
        --eval-dir eval/voc_fp32

Reads params ``evaluate.<branch>`` (split, frame, batch_size, threads, samples, draw_thresh,
max_images). Detection is the shared ``stages.inference`` path (GluonCV's SSD validation
preprocessing, boxes clipped to the network input) on the images of ``stages.voc.image_items``,
as ``stages.voc.detect_voc`` (the train stage's validation) runs it, with the images decoding
from before the model is loaded (``start_loading``); scoring is GluonCV's ``VOC07MApMetric``
in the frame of params ``frame`` (``stages.voc.in_frame``): ``network`` (default: the data_shape input with the
ground truth resized alongside, where GluonCV's eval_ssd.py scores and the model zoo's 77.6 was
measured) or ``original`` (the image's own pixels).

Outputs:
- ``--metrics``: ``map`` (percent), ``images`` — deterministic, byte-identical on rerun.
- ``--speed``: images/s end to end, per-batch latency p50/p90 (ms), batch size, threads, images.
- ``--eval-dir``: ``per_class.csv`` (class, ap in percent; empty for a class without ground
  truth), ``pr.csv`` (recall, precision: interpolated precision averaged over classes, IoU 0.5),
  ``detections.json`` (COCO results format: ``image_id`` = VOC image id, ``category_id`` =
  class index + 1 in the model's class list, ``bbox`` = [x, y, w, h] in the 0-based pixels of
  GluonCV's VOC loader (original image pixels, whatever the scoring frame), ``score``),
  ``samples/*.png`` (images with predicted boxes drawn), and ``provenance.json`` (model meta,
  params with the scoring frame, library versions).
"""
from __future__ import annotations

import argparse
import logging
from functools import partial
from pathlib import Path

from pydantic import Field

from stages.common import dumps_json, file_digest, library_versions, main_guard, round_floats, \
    write_json
from stages.config import Section, load_branch
from stages.eval_outputs import (PRECISIONS, csv_text, expect_precision, latency_summary,
                                 precision_tables, write_eval_dir)
from stages.idle import IdleTask
from stages.inference import (configure_threads, detect_all, load_detector, model_files,
                              read_meta, start_loading)
from stages.outputs import check_outputs
from stages.voc import (Frame, Split, as_triples, detections_records, image_ids,
                        image_items, in_frame, labels, load_voc, per_class_rows, pr_rows,
                        score_voc07)

log = logging.getLogger(__name__)


class EvaluateVocParams(Section):
    """params.yaml ``evaluate.<branch>`` for a VOC-format dataset."""

    split: Split
    # network: score in the data_shape input with the ground truth resized (GluonCV's
    # eval_ssd.py, the frame of the model zoo's 77.6); original: in the image's own pixels
    frame: Frame = "network"
    batch_size: int = Field(ge=1)
    threads: int = Field(ge=0)  # OpenMP threads; 0 = all cores
    samples: int = Field(ge=0)  # images drawn with their predictions into <eval-dir>/samples
    draw_thresh: float = Field(default=0.3, ge=0, le=1)  # boxes drawn on samples score >= this
    max_images: int = Field(default=0, ge=0)  # 0 = the whole split


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("branch", help="params branch: reads evaluate.<branch>")
    parser.add_argument("precision", choices=PRECISIONS, help="precision of --model")
    parser.add_argument("--model", required=True, type=Path, help="symbolic model prefix P")
    parser.add_argument("--data", required=True, type=Path, help="VOCdevkit root")
    parser.add_argument("--metrics", required=True, type=Path, help="accuracy metrics json")
    parser.add_argument("--speed", required=True, type=Path, help="speed metrics json")
    parser.add_argument("--eval-dir", required=True, type=Path,
                        help="per-class AP, PR curve, detections, samples")
    args = parser.parse_args(argv)
    p = load_branch("evaluate", args.branch, EvaluateVocParams)
    check_outputs(files={"--metrics": args.metrics, "--speed": args.speed},
                  dirs={"--eval-dir": args.eval_dir},
                  inputs={"--model": model_files(args.model), "--data": args.data})

    threads = configure_threads(p.threads)  # before MXNet is imported
    meta = read_meta(args.model)
    expect_precision(meta, args.model, args.precision)
    classes = list(meta["classes"])
    # hashed for the provenance record by an idle-priority thread while setup keeps one core
    params_md5 = IdleTask(partial(file_digest, f"{args.model}-0000.params"), "md5-params")
    dataset = load_voc(args.data, [p.split], classes)
    n = min(p.max_images, len(dataset)) if p.max_images else len(dataset)
    items = image_items(dataset, n)
    # images start decoding now, on the core that loading the model leaves idle
    with start_loading(items, meta, p.batch_size) as loader:
        net, meta = load_detector(args.model)
        log.info("evaluating %s (%s, %s head) on %d images of VOC%d %s, batch %d, %d threads; "
                 "scored in the %s frame", args.model, args.precision, meta["head"], n,
                 *p.split, p.batch_size, threads, p.frame)
        detections, seconds, wall = detect_all(net, items, meta, p.batch_size, "evaluate",
                                               loader)
    scores = score_voc07(*in_frame(detections, labels(dataset)[:n], p.frame,
                                   int(meta["data_shape"])), classes)
    recall, precision = scores["pr"]
    speed = latency_summary(seconds, n, wall, p.batch_size, threads)

    write_eval_dir(args.eval_dir, {
        "per_class.csv": csv_text(["class", "ap"], per_class_rows(scores["per_class"])),
        "pr.csv": csv_text(["recall", "precision"], pr_rows(recall, precision)),
        "detections.json": dumps_json(detections_records(image_ids(dataset)[:n],
                                                         as_triples(detections))),
        "provenance.json": dumps_json({
            "model": {"prefix": str(args.model), "meta": meta,
                      "params_md5": params_md5.result()},
            "params": {f"evaluate.{args.branch}": p.model_dump()},
            "frame": p.frame,
            "libraries": library_versions()}),
        **precision_tables(meta),
    }, items, detections, classes, p.samples, p.draw_thresh)
    write_json(args.speed, round_floats(speed))
    write_json(args.metrics, round_floats({"map": scores["map"], "images": n}))
    log.info("VOC07 mAP %.2f on %d images (%s, %s frame); %.1f img/s", scores["map"], n,
             args.precision, p.frame, speed["images_per_s"])
    return 0


if __name__ == "__main__":
    main_guard(main)
