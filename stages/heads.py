"""Detection heads: a GluonCV SSD body plus the decoder that turns its raw predictions into
``(ids, scores, bboxes)``.

Both heads return arrays of shapes (B, K, 1), (B, K, 1), (B, K, 4): class index (-1 = no
detection), score, and xmin/ymin/xmax/ymax in pixels of the (data_shape x data_shape) network
input; rows are sorted by score and invalid rows are -1 throughout.

- ``gluoncv``: GluonCV's stock SSD output (per-class decoding and NMS, set through
  ``SSD.set_nms``). With ``prefilter_topk`` (default) the same detections (up to exact score
  ties, see ``gluoncv_decode``) are computed with the ``nms_topk`` best (anchor, class) scores
  picked before the NMS input is built, instead of materialising and sorting all N x C =
  698,560 rows per image (~125 ms -> ~5 ms per image on 2 cores; the stock graph made the FP32
  head cap INT8's end-to-end speed-up). Boxes are decoded unclipped; the evaluation clips them
  to the input as GluonCV's does (``stages.inference.to_detections``).
- ``seed``: the decoder of the fork behind the source document's COCO numbers: MXNet's
  ``contrib.MultiBoxDetection`` on softmax probabilities (background first), each anchor keeps its
  best foreground class, variances applied to anchors in normalised corner form, NMS over the top
  ``nms_topk``, suppressed rows stay in place (id -1), the first ``post_nms`` rows are kept and the
  boxes are scaled back by the base size.
"""
from __future__ import annotations

from dataclasses import dataclass

import mxnet as mx
import numpy as np
from mxnet.gluon import HybridBlock

from stages.common import StageError
from stages.models import check_input_size

STOCK_VARIANCES = (0.1, 0.1, 0.2, 0.2)
STOCK_SCORE_THRESH = 0.01  # hard-wired in GluonCV's MultiPerClassDecoder and its box_nms call


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


def make_detector(ssd, spec: HeadSpec, base_size: int) -> "Detector":
    """Wrap a GluonCV ``SSD`` into a HybridBlock producing (ids, scores, bboxes) with ``spec``."""
    from gluoncv.nn.coder import NormalizedBoxCenterDecoder

    check_input_size(ssd, base_size)  # the anchors are laid out for the base size only
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
        # A parameter that is never trained, not Gluon's get_constant: a constant's symbol
        # carries an initializer named after the id() of its value, so every export would write
        # a different symbol.json (and dvc.lock a new md5) for the same model.
        self.head_anchors = self.params.get(f"{spec.kind}_head_anchors", shape=anchors.shape,
                                            differentiable=False)
        self.head_anchors.initialize(init=mx.init.Zero(), ctx=mx.cpu())
        self.head_anchors.set_data(mx.nd.array(anchors, dtype="float32"))

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
    same box_nms on those alone. Exact score ties may be ordered differently (topk and
    box_nms's sort break them their own way), so which of two tied rows is cut at nms_topk, or
    survives a tied overlap, can differ: the same detections up to exact score ties.
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
