"""Detection heads: the seed decoder against an independent numpy version, and the gluoncv
head's top-k prefilter against GluonCV's own graph."""
import mxnet as mx
import numpy as np
import pytest

from stages import heads
from stages.common import StageError
from stages.export import compare_outputs, outputs_to_numpy
from stages.inference import ImageItem, load_batch
from stages.models import GLUONCV_MEAN, GLUONCV_STD, build_network
from tests.stages.coco_helpers import NETWORK, shared_workspace


# ---------------------------------------------------------------------------------------------
# The seed head's decoder against an independent numpy version, on a hand-made case

def softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def iou(a, b):
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def reference_seed_decode(logits, deltas, corners, spec, base):
    """What the seed's decoder does, written out: rows (id, score, x1, y1, x2, y2) in pixels."""
    probs = softmax(logits)
    rows = []
    for a in range(len(probs)):
        cls = int(np.argmax(probs[a, 1:]))  # best foreground class, background ignored
        score = probs[a, 1 + cls]
        if score < spec.score_thresh:
            continue
        x1, y1, x2, y2 = corners[a]
        aw, ah, ax, ay = x2 - x1, y2 - y1, (x1 + x2) / 2, (y1 + y2) / 2
        dx, dy, dw, dh = deltas[a]
        vx, vy, vw, vh = spec.variances
        ox, oy = dx * vx * aw + ax, dy * vy * ah + ay
        ow, oh = np.exp(dw * vw) * aw / 2, np.exp(dh * vh) * ah / 2
        box = np.array([ox - ow, oy - oh, ox + ow, oy + oh])
        if spec.clip:
            box = box.clip(0, 1)
        rows.append([cls, score, *box])
    rows.sort(key=lambda r: -r[1])  # stable: ties keep anchor order
    rows = rows[:spec.nms_topk]
    for i, r in enumerate(rows):
        if r[0] < 0:
            continue
        for s in rows[i + 1:]:
            if s[0] == r[0] and iou(r[2:], s[2:]) >= spec.nms_thresh:
                s[0] = -1  # suppressed rows stay in place
    out = -np.ones((spec.post_nms, 6))
    for i, r in enumerate(rows[:spec.post_nms]):
        if r[0] >= 0:
            out[i] = [r[0], r[1], *(np.array(r[2:]) * base)]
    return out


def test_seed_decode_matches_reference_on_hand_made_case():
    corners = np.array([
        [0.10, 0.10, 0.40, 0.40],  # 0: class 1, strong
        [0.12, 0.11, 0.41, 0.42],  # 1: overlaps 0, same class, weaker -> suppressed in place
        [0.11, 0.10, 0.40, 0.41],  # 2: overlaps 0, other class -> kept (no force_suppress)
        [0.60, 0.60, 0.90, 0.90],  # 3: background wins, best foreground still above threshold
        [0.50, 0.05, 0.70, 0.30],  # 4: every foreground below threshold -> dropped
        [0.85, 0.80, 1.05, 1.10],  # 5: box leaves the image -> clipped
        [0.30, 0.60, 0.50, 0.95],  # 6: weakest valid one -> cut by nms_topk
    ], np.float32)
    logits = np.full((7, 4), -6.0, np.float32)  # background + 3 classes
    logits[0, 2] = 4.0
    logits[1, 2] = 3.0
    logits[2, 3] = 3.5
    logits[3, 0], logits[3, 1] = 5.0, 0.8
    logits[4, 0] = 9.0
    logits[5, 1] = 2.0
    logits[6, 0], logits[6, 3] = 5.0, 0.5
    deltas = np.random.RandomState(0).uniform(-1, 1, (7, 4)).astype(np.float32)
    spec = heads.HeadSpec("seed", nms_thresh=0.45, nms_topk=5, post_nms=6, score_thresh=0.01)
    base = 300.0

    ids, scores, boxes = heads.seed_decode(
        mx.nd, mx.nd.array(logits[None]), mx.nd.array(deltas.reshape(1, -1)),
        mx.nd.array(corners[None]), spec, base)
    got = np.concatenate([ids.asnumpy(), scores.asnumpy(), boxes.asnumpy()], axis=-1)[0]
    want = reference_seed_decode(logits, deltas, corners, spec, base)

    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-3)
    # the case covers what it claims: a suppressed row in place, a topk cut, a clip, 3 classes
    assert list(got[:, 0]) == [1, 2, -1, 0, 0, -1]
    assert got[:, 2:].max() == pytest.approx(base)


# ---------------------------------------------------------------------------------------------
# The gluoncv head

def test_gluoncv_head_prefilter_gives_the_stock_detections(tmp_path_factory):
    ws = shared_workspace(tmp_path_factory)
    ssd = build_network(NETWORK)
    ssd.load_parameters(str(ws.weights))
    items = [ImageItem(p.name, p) for p in sorted(ws.images.glob("*.jpg"))[:4]]
    x = mx.nd.array(load_batch(items, 300, GLUONCV_MEAN, GLUONCV_STD).data)
    stock = heads.make_detector(ssd, heads.HeadSpec("gluoncv", prefilter_topk=False), 300)
    want = outputs_to_numpy(stock(x))  # GluonCV's own SSD.hybrid_forward
    fast = heads.make_detector(ssd, heads.HeadSpec("gluoncv"), 300)
    got = outputs_to_numpy(fast(x))
    assert compare_outputs(want, got, atol=1e-5) is None
    assert (got[0] >= 0).sum() == 400


def test_a_data_shape_other_than_the_networks_base_size_is_refused():
    ssd = build_network("demo_ssd", classes=["a", "b"])
    with pytest.raises(StageError, match="data_shape 96 differs from the network's base size 128"):
        heads.make_detector(ssd, heads.HeadSpec("seed"), 96)


def test_gluoncv_head_refuses_variances_the_network_does_not_decode_with():
    ssd = build_network("demo_ssd", classes=["a", "b"])
    ssd.initialize()
    spec = heads.HeadSpec("gluoncv", variances=(0.1, 0.1, 0.1, 0.1))
    with pytest.raises(StageError, match="network decodes with variances"):
        heads.make_detector(ssd, spec, 128)


def test_anchor_corners_are_the_centres_converted():
    centres = np.array([[[10.0, 20.0, 4.0, 6.0], [0.5, 0.5, 1.0, 1.0]]], np.float32)
    np.testing.assert_array_equal(heads.centres_to_corners(centres),
                                  [[[8.0, 17.0, 12.0, 23.0], [0.0, 0.0, 1.0, 1.0]]])
