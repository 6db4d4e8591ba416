"""Convert a Gluon SSD into a symbolic detector with one of two detection heads.

    python -m stages.convert coco --out model/coco/fp32 \\
        --weights model/pretrained/ssd_300_vgg16_atrous_coco.params   # params convert.coco
    python -m stages.convert voc --out model/voc/fp32 --trained model/voc/trained

Writes ``<out>-symbol.json``, ``<out>-0000.params`` and ``<out>-meta.json``: the network with its
weights (``stages/models.py``), wrapped with the head of params ``convert.<branch>.head``
(``stages/heads.py``: ``seed`` or ``gluoncv``, output contract there), exported, reloaded and
checked against the Gluon block, then published (``stages/export.py``).
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from stages.choices import Weights
from stages.common import file_digest, library_versions, main_guard
from stages.config import ParamsError, Section, load_branch
from stages.export import StagingDir, check_input, export_block, publish, verify_roundtrip
from stages.heads import STOCK_SCORE_THRESH, STOCK_VARIANCES, HeadSpec, make_detector
from stages.inference import model_outputs
from stages.models import Source, load_ssd
from stages.outputs import check_outputs

log = logging.getLogger(__name__)


class ConvertParams(Section):
    """``convert.<branch>`` in params.yaml."""

    network: str | None = None  # registry name (stages/models.py); from net.json when trained
    # file: the .params file given as --weights (the pipeline passes GluonCV's COCO-pretrained
    # weights, fetch_weights' output); trained: the train stage's model given as --trained
    weights: Weights = "file"
    head: Literal["seed", "gluoncv"] = "seed"
    data_shape: int | None = Field(default=None, gt=0)  # from net.json when trained
    nms_thresh: float = Field(default=0.45, gt=0, lt=1)
    nms_topk: int = Field(default=400, gt=0)
    post_nms: int = Field(default=100, gt=0)
    score_thresh: float = Field(default=0.01, ge=0, lt=1)
    variances: list[float] = Field(default=list(STOCK_VARIANCES), min_length=4, max_length=4)
    clip: bool = True  # seed head: clip decoded boxes to the image (MultiBoxDetection's default)
    # gluoncv head: pick the nms_topk best (anchor, class) scores before building the NMS input
    # (~25x less head time than GluonCV's graph, which sorts all N x C candidates). The same
    # detections up to exact score ties: rows with equal scores may reach NMS in another order
    # (topk vs box_nms's own sort), so which of two tied overlapping boxes survives, or which
    # tied row is cut at nms_topk, can differ.
    prefilter_topk: bool = True

    @model_validator(mode="after")
    def _consistent(self) -> "ConvertParams":
        if self.post_nms > self.nms_topk:
            # NMS keeps at most nms_topk rows, so more post_nms rows could only be empty; the
            # gluoncv head with prefilter_topk cannot even build its graph (slice past the end)
            raise ValueError(f"post_nms ({self.post_nms}) must not exceed nms_topk "
                             f"({self.nms_topk}): at most nms_topk detections survive NMS")
        if self.weights == "trained":
            given = [k for k in ("network", "data_shape") if getattr(self, k) is not None]
            if given:
                raise ValueError(f"{', '.join(given)} must not be set with weights: trained "
                                 "(they come from the trained model's net.json)")
        else:
            missing = [k for k in ("network", "data_shape") if getattr(self, k) is None]
            if missing:
                raise ValueError(f"{', '.join(missing)} required with weights: file")
        if self.head == "gluoncv":
            if self.score_thresh != STOCK_SCORE_THRESH:
                raise ValueError(f"score_thresh is fixed at {STOCK_SCORE_THRESH} in GluonCV's "
                                 f"stock head (got {self.score_thresh}); use head: seed to vary it")
            if tuple(self.variances) != STOCK_VARIANCES:
                raise ValueError(f"variances are fixed at {list(STOCK_VARIANCES)} in GluonCV's "
                                 f"stock head (got {self.variances})")
        return self


def head_spec(p: ConvertParams) -> HeadSpec:
    """The HeadSpec described by validated params."""
    return HeadSpec(kind=p.head, nms_thresh=p.nms_thresh, nms_topk=p.nms_topk,
                    post_nms=p.post_nms, score_thresh=p.score_thresh,
                    variances=tuple(p.variances), clip=p.clip, prefilter_topk=p.prefilter_topk)


def build_meta(source: Source, spec: HeadSpec, params_digest: str) -> dict:
    """P-meta.json of an FP32 model (contract: network, classes, data_shape, head, precision,
    mean, std), plus head settings and provenance."""
    return {
        "network": source.network,
        "classes": list(source.classes),
        "data_shape": source.data_shape,
        "head": spec.kind,
        "head_params": {k: (list(v) if isinstance(v, tuple) else v)
                        for k, v in asdict(spec).items() if k != "kind"},
        "precision": "fp32",
        "mean": list(source.mean),
        "std": list(source.std),
        "weights": source.weights,
        "weights_sha1": file_digest(source.weights, "sha1"),
        "params_md5": params_digest,
        "libraries": library_versions(),
    }


def convert(p: ConvertParams, out: Path, trained_dir: Path | None,
            weights_file: Path | None = None) -> dict:
    """Build, export, verify and publish the symbolic detector; return its meta."""
    ssd, source = load_ssd(p.weights, p.network, p.data_shape, trained_dir, weights_file)
    spec = head_spec(p)
    detector = make_detector(ssd, spec, source.data_shape)
    x = check_input(source.data_shape)
    with StagingDir(out) as tmp_prefix:
        log.info("exporting %s with the %s head to %s", source.network, spec.kind, out)
        expected = export_block(detector, tmp_prefix, x)
        verify_roundtrip(tmp_prefix, x, expected, atol=1e-3)
        valid = int((expected[0] >= 0).sum())
        log.info("symbolic model reproduces the Gluon block (%d detections on the check input)",
                 valid)
        meta = build_meta(source, spec, file_digest(f"{tmp_prefix}-0000.params"))
        publish(tmp_prefix, out, meta)
    return meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("branch", help="params section convert.<branch>, e.g. coco")
    parser.add_argument("--out", required=True, type=Path, help="output model prefix")
    parser.add_argument("--trained", type=Path, help="trained-model dir (net.params + net.json)")
    parser.add_argument("--weights", type=Path, help=".params file of the network (weights: file)")
    args = parser.parse_args(argv)
    p = load_branch("convert", args.branch, ConvertParams)
    for flag, value, wanted in (("--trained", args.trained, "trained"),
                                ("--weights", args.weights, "file")):
        if (p.weights == wanted) != (value is not None):
            need = "is required" if p.weights == wanted else "must not be given"
            raise ParamsError(f"convert.{args.branch}.weights is {p.weights!r}: {flag} {need}")
    check_outputs(files=model_outputs(args.out),
                  inputs={"--trained": args.trained or [], "--weights": args.weights or []})
    meta = convert(p, args.out, args.trained, args.weights)
    log.info("wrote %s-{symbol.json,0000.params,meta.json} (%s, %d classes, head %s)",
             args.out, meta["network"], len(meta["classes"]), meta["head"])
    return 0


if __name__ == "__main__":
    main_guard(main)
