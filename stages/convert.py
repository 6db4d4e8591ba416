"""Convert a Gluon SSD into a symbolic detector with one of two detection heads.

    python -m stages.convert coco --out model/coco/fp32                  # reads params convert.coco
    python -m stages.convert voc --out model/voc/fp32 --trained model/voc/trained

Writes ``<out>-symbol.json``, ``<out>-0000.params`` and ``<out>-meta.json``. Both heads return
``(ids, scores, bboxes)`` of shapes (B, K, 1), (B, K, 1), (B, K, 4): class index (-1 = no
detection), score, and xmin/ymin/xmax/ymax in pixels of the (data_shape x data_shape) network
input; rows are sorted by score and invalid rows are -1 throughout.

- ``gluoncv``: GluonCV's stock SSD output (per-class decoding and NMS, set through
  ``SSD.set_nms``). With ``prefilter_topk`` (default) the same detections are computed with the
  ``nms_topk`` best (anchor, class) scores picked before the NMS input is built, instead of
  materialising and sorting all N x C = 698,560 rows per image (~125 ms -> ~5 ms per image on
  2 cores; the stock graph made the FP32 head cap INT8's end-to-end speed-up).
- ``seed``: the decoder of the fork behind the source document's COCO numbers: MXNet's
  ``contrib.MultiBoxDetection`` on softmax probabilities (background first), each anchor keeps its
  best foreground class, variances applied to anchors in normalised corner form, NMS over the top
  ``nms_topk``, suppressed rows stay in place (id -1), the first ``post_nms`` rows are kept and the
  boxes are scaled back by the base size.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import mxnet as mx
import numpy as np
from mxnet.gluon import HybridBlock
from pydantic import Field, model_validator

from stages.common import StageError, file_digest, library_versions, main_guard, write_json
from stages.config import ParamsError, Section, load_branch
from stages.inference import load_symbol_block
from stages.models import build_network

log = logging.getLogger(__name__)

# GluonCV's SSD normalisation (RGB, 0..1 scale); written to meta so every consumer uses it.
GLUONCV_MEAN = (0.485, 0.456, 0.406)
GLUONCV_STD = (0.229, 0.224, 0.225)
STOCK_VARIANCES = (0.1, 0.1, 0.2, 0.2)
STOCK_SCORE_THRESH = 0.01  # hard-wired in GluonCV's MultiPerClassDecoder and its box_nms call


class ConvertParams(Section):
    """``convert.<branch>`` in params.yaml."""

    network: str | None = None  # registry name (stages/models.py); from net.json when trained
    weights: str = "zoo"  # zoo | trained | path to a local .params file
    head: Literal["seed", "gluoncv"] = "seed"
    data_shape: int | None = Field(default=None, gt=0)  # from net.json when trained
    nms_thresh: float = Field(default=0.45, gt=0, lt=1)
    nms_topk: int = Field(default=400, gt=0)
    post_nms: int = Field(default=100, gt=0)
    score_thresh: float = Field(default=0.01, ge=0, lt=1)
    variances: list[float] = Field(default=list(STOCK_VARIANCES), min_length=4, max_length=4)
    clip: bool = True  # seed head: clip decoded boxes to the image (MultiBoxDetection's default)
    # gluoncv head: pick the nms_topk best (anchor, class) scores before building the NMS input
    # (same detections as GluonCV's graph, which sorts all N x C candidates: ~25x less head time)
    prefilter_topk: bool = True

    @model_validator(mode="after")
    def _consistent(self) -> "ConvertParams":
        if self.weights == "trained":
            given = [k for k in ("network", "data_shape") if getattr(self, k) is not None]
            if given:
                raise ValueError(f"{', '.join(given)} must not be set with weights: trained "
                                 "(they come from the trained model's net.json)")
        else:
            missing = [k for k in ("network", "data_shape") if getattr(self, k) is None]
            if missing:
                raise ValueError(f"{', '.join(missing)} required unless weights: trained")
        if self.head == "gluoncv":
            if self.score_thresh != STOCK_SCORE_THRESH:
                raise ValueError(f"score_thresh is fixed at {STOCK_SCORE_THRESH} in GluonCV's "
                                 f"stock head (got {self.score_thresh}); use head: seed to vary it")
            if tuple(self.variances) != STOCK_VARIANCES:
                raise ValueError(f"variances are fixed at {list(STOCK_VARIANCES)} in GluonCV's "
                                 f"stock head (got {self.variances})")
        return self


@dataclass(frozen=True)
class HeadSpec:
    """Detection-head settings as plain values (what gets recorded in meta)."""

    kind: str
    nms_thresh: float = 0.45
    nms_topk: int = 400
    post_nms: int = 100
    score_thresh: float = 0.01
    variances: tuple[float, float, float, float] = STOCK_VARIANCES
    clip: bool = True
    prefilter_topk: bool = True


def head_spec(p: ConvertParams) -> HeadSpec:
    """The HeadSpec described by validated params."""
    return HeadSpec(kind=p.head, nms_thresh=p.nms_thresh, nms_topk=p.nms_topk,
                    post_nms=p.post_nms, score_thresh=p.score_thresh,
                    variances=tuple(p.variances), clip=p.clip, prefilter_topk=p.prefilter_topk)


def make_detector(ssd, spec: HeadSpec, base_size: int) -> "Detector":
    """Wrap a GluonCV ``SSD`` into a HybridBlock producing (ids, scores, bboxes) with ``spec``."""
    from gluoncv.nn.coder import NormalizedBoxCenterDecoder

    im_size = getattr(ssd.anchor_generators[0], "_im_size", (base_size, base_size))
    if tuple(im_size) != (base_size, base_size):
        raise StageError(f"data_shape {base_size} differs from the network's base size "
                         f"{im_size[0]}: its anchors would not match the input")
    centres = anchor_centres(ssd, base_size)
    if spec.kind == "seed":
        return Detector(ssd, spec, base_size, centres_to_corners(centres) / base_size)
    stds = tuple(getattr(ssd.bbox_decoder, "_stds", STOCK_VARIANCES))
    if stds != tuple(spec.variances):
        raise StageError(f"network decodes with variances {stds}, head asks {spec.variances}")
    ssd.set_nms(nms_thresh=spec.nms_thresh, nms_topk=spec.nms_topk, post_nms=spec.post_nms)
    # Zoo SSDs built with pretrained=True decode with elementwise ops ("minimal opset"), which the
    # INT8 pass would quantize; the box_decode operator computes the same in one FP32 op.
    ssd.bbox_decoder = NormalizedBoxCenterDecoder(stds, minimal_opset=False)
    return Detector(ssd, spec, base_size, centres)


def anchor_centres(ssd, data_shape: int) -> np.ndarray:
    """The SSD's anchors for a data_shape input: (1, N, 4) centre form, pixels (float32).

    Fixed at conversion time (the input size is fixed), so the exported graph holds them as a
    constant instead of slicing and concatenating the generators' maps every batch.
    """
    data = mx.sym.var("data")
    shapes = [feat.infer_shape(data=(1, 3, data_shape, data_shape))[1][0]
              for feat in ssd.features(data)]
    centres = np.concatenate([ag(mx.nd.zeros(shape)).asnumpy().reshape(-1, 4)
                              for shape, ag in zip(shapes, ssd.anchor_generators)])
    return centres.astype(np.float32)[None]


def centres_to_corners(centres: np.ndarray) -> np.ndarray:
    """(…, 4) centre-form boxes → corner form (computed in float64, returned float32)."""
    cx, cy, w, h = np.moveaxis(centres.astype(np.float64), -1, 0)
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=-1).astype(np.float32)


class Detector(HybridBlock):
    """SSD body plus a detection head; see the module docstring for the output contract.

    ``anchors``: (1, N, 4) normalised corners for the seed head, centre-form pixels for gluoncv.
    """

    def __init__(self, ssd, spec: HeadSpec, base_size: int, anchors: np.ndarray):
        super().__init__(prefix="")
        self.spec = spec
        self.base_size = float(base_size)
        self.num_anchors = int(anchors.shape[1])
        self.ssd = ssd  # registered as a child: its parameters keep their names
        self.head_anchors = self.params.get_constant(f"{spec.kind}_head_anchors", anchors)
        self.head_anchors.initialize(ctx=mx.cpu())

    def hybrid_forward(self, F, x, head_anchors):  # noqa: N803 - MXNet's signature
        spec = self.spec
        if spec.kind == "gluoncv" and not spec.prefilter_topk:
            return self.ssd(x)  # GluonCV's own graph
        cls_preds, box_preds = self._predictions(F, x)
        if spec.kind == "seed":
            return seed_decode(F, cls_preds, box_preds, head_anchors, spec, self.base_size)
        return gluoncv_decode(F, cls_preds, box_preds, head_anchors, spec, self.num_anchors,
                              self.ssd.num_classes)

    def _predictions(self, F, x):  # noqa: N803
        """Class logits (B, N, C+1) and box offsets (B, N*4), as in SSD.hybrid_forward."""
        ssd = self.ssd
        features = ssd.features(x)
        cls_preds = [F.flatten(F.transpose(cp(feat), (0, 2, 3, 1)))
                     for feat, cp in zip(features, ssd.class_predictors)]
        box_preds = [F.flatten(F.transpose(bp(feat), (0, 2, 3, 1)))
                     for feat, bp in zip(features, ssd.box_predictors)]
        cls_preds = F.concat(*cls_preds, dim=1).reshape((0, -1, ssd.num_classes + 1))
        return cls_preds, F.concat(*box_preds, dim=1)


def gluoncv_decode(F, cls_preds, box_preds, anchors, spec: HeadSpec,  # noqa: N803
                   num_anchors: int, num_classes: int):
    """GluonCV's per-class decoding and NMS, with the NMS candidates picked first.

    GluonCV builds all N x C (class, score, box) rows (scores <= 0.01 zeroed) and lets box_nms
    sort them and keep the top ``nms_topk`` before suppressing per class. The ``nms_topk`` best
    scores of the N x C matrix are the same rows, so this takes them with one topk and runs the
    same box_nms on those alone (ties at equal scores may be ordered differently).
    """
    boxes = F.contrib.box_decode(box_preds.reshape((0, -1, 4)), anchors, *spec.variances,
                                 clip=-1, format="center")  # (B, N, 4) corners, pixels
    probs = F.softmax(cls_preds, axis=-1).slice_axis(axis=-1, begin=1, end=None)  # (B, N, C)
    k = min(spec.nms_topk, num_anchors * num_classes)
    # flat index = anchor * C + class (exact in float32 below 2**24)
    scores, flat = F.topk(probs.reshape((0, -1)), axis=-1, k=k, ret_typ="both")  # (B, k)
    anchor = F.floor(flat / num_classes)
    cls_id = flat - anchor * num_classes
    batch = F.broadcast_like(F.contrib.arange_like(flat, axis=0).reshape((-1, 1)), flat)
    picked = F.gather_nd(boxes, F.stack(batch, anchor, axis=0))  # (B, k, 4)
    valid = scores > spec.score_thresh
    cls_id = F.where(valid, cls_id, F.ones_like(cls_id) * -1)
    scores = F.where(valid, scores, F.zeros_like(scores))
    rows = F.concat(cls_id.expand_dims(-1), scores.expand_dims(-1), picked, dim=-1)
    rows = F.contrib.box_nms(rows, overlap_thresh=spec.nms_thresh, topk=spec.nms_topk,
                             valid_thresh=spec.score_thresh, id_index=0, score_index=1,
                             coord_start=2, force_suppress=False)
    rows = F.slice_axis(rows, axis=1, begin=0, end=spec.post_nms)
    return (F.slice_axis(rows, axis=2, begin=0, end=1), F.slice_axis(rows, axis=2, begin=1, end=2),
            F.slice_axis(rows, axis=2, begin=2, end=6))


def seed_decode(F, cls_preds, box_preds, corners, spec: HeadSpec, base_size: float):  # noqa: N803
    """The seed fork's decoder: raw predictions → (ids, scores, bboxes) in input pixels.

    ``cls_preds`` (B, N, C+1) logits, background first; ``box_preds`` (B, N*4) encoded offsets;
    ``corners`` (1, N, 4) anchors as normalised corners. MultiBoxDetection gives each anchor its
    best foreground class (kept if its probability >= score_thresh, whatever the background's),
    decodes it with ``variances``, sorts by score, keeps the top ``nms_topk`` and suppresses, per
    class, boxes overlapping a better one by IoU >= nms_thresh; suppressed rows stay in place.
    """
    probs = F.transpose(F.softmax(cls_preds, axis=-1), axes=(0, 2, 1))  # (B, C+1, N)
    det = F.contrib.MultiBoxDetection(
        probs, box_preds, corners, clip=spec.clip, threshold=spec.score_thresh,
        background_id=0, nms_threshold=spec.nms_thresh, force_suppress=False,
        variances=spec.variances, nms_topk=spec.nms_topk)
    det = F.slice_axis(det, axis=1, begin=0, end=spec.post_nms)
    ids = F.slice_axis(det, axis=2, begin=0, end=1)
    scores = F.slice_axis(det, axis=2, begin=1, end=2)
    bboxes = F.slice_axis(det, axis=2, begin=2, end=6) * base_size
    # MultiBoxDetection leaves suppressed rows in place with id -1 but their score and box;
    # make them -1 throughout like box_nms does, so both heads mean the same thing.
    valid = ids >= 0
    scores = F.where(valid, scores, F.ones_like(scores) * -1)
    bboxes = F.where(F.broadcast_like(valid, bboxes), bboxes, F.ones_like(bboxes) * -1)
    return ids, scores, bboxes


# ---------------------------------------------------------------------------------------------
# Building the network with its weights

@dataclass(frozen=True)
class Source:
    """Where the weights came from (recorded in meta)."""

    network: str
    classes: tuple[str, ...]
    data_shape: int
    weights: str  # "zoo", or the path of the .params file
    mean: tuple[float, float, float] = GLUONCV_MEAN
    std: tuple[float, float, float] = GLUONCV_STD


def load_ssd(p: ConvertParams, trained_dir: Path | None):
    """Build the SSD named by params (or net.json) with its weights; return (ssd, Source)."""
    if p.weights == "trained":
        info = read_trained_info(trained_dir)
        ssd = build_network(info["network"], classes=info["classes"])
        params_file = trained_dir / "net.params"
        _load_params(ssd, params_file)
        return ssd, Source(info["network"], tuple(info["classes"]), int(info["data_shape"]),
                           str(params_file), tuple(info.get("mean", GLUONCV_MEAN)),
                           tuple(info.get("std", GLUONCV_STD)))
    if p.weights == "zoo":
        try:
            ssd = build_network(p.network, pretrained=True)
        except StageError:
            raise
        except Exception as exc:  # download/sha1 failures come as many exception types
            raise StageError(f"cannot get pretrained weights of {p.network} from GluonCV's "
                             f"model zoo ({type(exc).__name__}: {exc}); offline, copy the zoo's "
                             "file into ~/.mxnet/models (GluonCV checks its sha1) or set the "
                             "weights param to the path of a local .params file") from exc
        ssd.collect_params().reset_ctx(mx.cpu())
    else:
        params_file = Path(p.weights)
        ssd = build_network(p.network, pretrained=False, pretrained_base=False)
        _load_params(ssd, params_file)
    return ssd, Source(p.network, tuple(ssd.classes), p.data_shape, p.weights)


def read_trained_info(trained_dir: Path | None) -> dict:
    """net.json of a trained-model directory, checked for the keys the contract promises."""
    if trained_dir is None:
        raise ParamsError("convert: weights: trained needs --trained <dir>")
    path = trained_dir / "net.json"
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise StageError(f"{path}: cannot read trained model description ({exc})") from exc
    missing = [k for k in ("network", "classes", "data_shape") if k not in info]
    if missing:
        raise StageError(f"{path}: missing key(s) {', '.join(missing)}")
    return info


def _load_params(ssd, params_file: Path) -> None:
    if not params_file.is_file():
        raise StageError(f"weights file not found: {params_file}")
    try:
        ssd.load_parameters(str(params_file), ctx=mx.cpu())
    except (AssertionError, mx.base.MXNetError, ValueError, RuntimeError) as exc:
        raise StageError(f"{params_file}: does not fit the network ({exc})") from exc


# ---------------------------------------------------------------------------------------------
# Export, round-trip check, meta

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


def model_files(prefix: Path) -> list[Path]:
    """The three files of a symbolic model at ``prefix``."""
    return [Path(f"{prefix}-symbol.json"), Path(f"{prefix}-0000.params"),
            Path(f"{prefix}-meta.json")]


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
        "params_md5": params_digest,
        "libraries": library_versions(),
    }


def convert(p: ConvertParams, out: Path, trained_dir: Path | None) -> dict:
    """Build, export, verify and publish the symbolic detector; return its meta."""
    ssd, source = load_ssd(p, trained_dir)
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
    args = parser.parse_args(argv)
    p = load_branch("convert", args.branch, ConvertParams)
    if (p.weights == "trained") != (args.trained is not None):
        raise ParamsError(f"convert.{args.branch}.weights is {p.weights!r}: --trained "
                          f"{'is required' if p.weights == 'trained' else 'must not be given'}")
    meta = convert(p, args.out, args.trained)
    log.info("wrote %s-{symbol.json,0000.params,meta.json} (%s, %d classes, head %s)",
             args.out, meta["network"], len(meta["classes"]), meta["head"])
    return 0


if __name__ == "__main__":
    main_guard(main)
