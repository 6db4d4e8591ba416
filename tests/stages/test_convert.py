import json
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest

from stages import convert
from stages.inference import ImageItem, load_batch, load_detector
from stages.models import build_network
from tests.stages.coco_helpers import (NETWORK, convert_params, run_in, shared_workspace,
                                       write_params)


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
    spec = convert.HeadSpec("seed", nms_thresh=0.45, nms_topk=5, post_nms=6, score_thresh=0.01)
    base = 300.0

    ids, scores, boxes = convert.seed_decode(
        mx.nd, mx.nd.array(logits[None]), mx.nd.array(deltas.reshape(1, -1)),
        mx.nd.array(corners[None]), spec, base)
    got = np.concatenate([ids.asnumpy(), scores.asnumpy(), boxes.asnumpy()], axis=-1)[0]
    want = reference_seed_decode(logits, deltas, corners, spec, base)

    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-3)
    # the case covers what it claims: a suppressed row in place, a topk cut, a clip, 3 classes
    assert list(got[:, 0]) == [1, 2, -1, 0, 0, -1]
    assert got[:, 2:].max() == pytest.approx(base)


# ---------------------------------------------------------------------------------------------
# The stage

@pytest.mark.parametrize("head", ["seed", "gluoncv"])
def test_exported_model_matches_gluon_block(tmp_path, tmp_path_factory, head):
    ws = shared_workspace(tmp_path_factory)
    write_params(tmp_path, convert=convert_params(ws.weights, head=head))
    out = tmp_path / "model" / "fp32"

    assert run_in(tmp_path, convert.main, ["coco", "--out", out]) == 0

    net, meta = load_detector(out)
    assert {"network", "classes", "data_shape", "head", "precision", "mean", "std"} <= set(meta)
    assert (meta["network"], meta["head"], meta["precision"], meta["data_shape"]) == \
        (NETWORK, head, "fp32", 300) and len(meta["classes"]) == 80
    ssd = build_network(NETWORK)
    ssd.load_parameters(str(ws.weights))
    gluon = convert.make_detector(ssd, convert.head_spec(convert.ConvertParams(
        **convert_params(ws.weights, head=head)["coco"])), 300)  # imperative, not hybridized
    x = convert.check_input(300)
    want = convert.outputs_to_numpy(gluon(x))
    got = convert.outputs_to_numpy(net(x))
    assert convert.compare_outputs(want, got, atol=1e-3) is None
    assert got[0].shape == (2, 100, 1) and got[2].shape == (2, 100, 4)
    assert (got[0] >= 0).sum() > 20  # the check exercises real detections, not empty rows
    assert not list(tmp_path.glob("model/.*"))  # no staging leftovers


def test_gluoncv_head_prefilter_gives_the_stock_detections(tmp_path_factory):
    ws = shared_workspace(tmp_path_factory)
    ssd = build_network(NETWORK)
    ssd.load_parameters(str(ws.weights))
    items = [ImageItem(p.name, p) for p in sorted(ws.images.glob("*.jpg"))[:4]]
    x = mx.nd.array(load_batch(items, 300, convert.GLUONCV_MEAN, convert.GLUONCV_STD).data)
    stock = convert.make_detector(ssd, convert.HeadSpec("gluoncv", prefilter_topk=False), 300)
    want = convert.outputs_to_numpy(stock(x))  # GluonCV's own SSD.hybrid_forward
    fast = convert.make_detector(ssd, convert.HeadSpec("gluoncv"), 300)
    got = convert.outputs_to_numpy(fast(x))
    assert convert.compare_outputs(want, got, atol=1e-5) is None
    assert (got[0] >= 0).sum() == 400


@pytest.mark.parametrize("change, message", [
    ({"head": "yolo"}, "convert.coco.head: Input should be 'seed' or 'gluoncv'"),
    ({"head": "gluoncv", "score_thresh": 0.05}, "score_thresh is fixed at 0.01"),
    ({"weights": "trained"}, "must not be set with weights: trained"),
    ({"nms_topk": 0}, "convert.coco.nms_topk: Input should be greater than 0"),
])
def test_bad_params_fail_before_work(tmp_path, capfd, change, message):
    params = convert_params(tmp_path / "absent.params")
    params["coco"].update(change)
    write_params(tmp_path, convert=params)

    assert run_in(tmp_path, convert.main, ["coco", "--out", tmp_path / "m"]) == 2
    assert message in capfd.readouterr().err
    assert not list(tmp_path.glob("m*"))


def test_missing_weights_file_is_a_clear_error(tmp_path, capfd):
    write_params(tmp_path, convert=convert_params(tmp_path / "absent.params"))

    assert run_in(tmp_path, convert.main, ["coco", "--out", tmp_path / "m"]) == 1
    assert "weights file not found" in capfd.readouterr().err
    assert not list(tmp_path.glob("m*"))


def test_trained_weights_come_with_net_json(tmp_path, tmp_path_factory):
    ws = shared_workspace(tmp_path_factory)
    trained = tmp_path / "trained"
    trained.mkdir()
    (trained / "net.params").symlink_to(ws.weights)
    classes = json.loads(Path(f"{ws.fp32}-meta.json").read_text())["classes"]
    (trained / "net.json").write_text(json.dumps(
        {"network": NETWORK, "classes": classes, "data_shape": 300}))
    write_params(tmp_path, convert={"coco": {"weights": "trained", "head": "seed"}})

    assert run_in(tmp_path, convert.main, ["coco", "--out", tmp_path / "m", "--trained",
                                           trained]) == 0
    meta = json.loads((tmp_path / "m-meta.json").read_text())
    assert meta["weights"] == str(trained / "net.params") and meta["classes"] == classes
