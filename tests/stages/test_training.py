"""The training engine: learning rate, the loss's anchor accuracy, and a real fit of the demo
SSD on a tiny generated VOC set (validation through the evaluation's path)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from stages.models import GLUONCV_MEAN, GLUONCV_STD, build_detector
from stages.train import TrainParams
from stages.training import anchor_accuracy, fit, learning_rate, validate
from tests.stages.train_helpers import CLASSES, train_params, write_devkit
from tests.stages.voc_helpers import write_border_devkit


@pytest.fixture(scope="module")
def devkit(tmp_path_factory) -> Path:
    return write_devkit(tmp_path_factory.mktemp("voc"))


# ---------------------------------------------------------------------------------------------
# Pure pieces

def test_anchor_accuracy_uses_exactly_the_loss_mask():
    import mxnet as mx
    from gluoncv.loss import SSDMultiBoxLoss

    rng = np.random.RandomState(0)
    b, n, c = 3, 200, 4
    cls_pred = mx.nd.array(rng.normal(0, 2, (b, n, c)))
    target = np.zeros((b, n), np.float32)
    for i, k in enumerate((5, 1, 12)):  # a few positives per image
        target[i, rng.choice(n, k, replace=False)] = rng.randint(1, c, k)
    cls_target = mx.nd.array(target)
    box = mx.nd.zeros((b, n, 4))
    _, cls_losses, _ = SSDMultiBoxLoss()(cls_pred, box, cls_target, box)

    # Recompute the loss over our mask: it must equal GluonCV's (mask = positives + mined negatives).
    ce = -mx.nd.pick(mx.nd.log_softmax(cls_pred, axis=-1), cls_target, axis=-1).asnumpy()
    pos = target > 0
    masked = []
    for i in range(b):
        negatives = np.argsort(-np.where(pos[i], -np.inf, ce[i]))[: 3 * pos[i].sum()]
        mask = pos[i].copy()
        mask[negatives] = True
        masked.append(ce[i][mask].sum() / pos.sum())
    np.testing.assert_allclose(cls_losses[0].asnumpy(), masked, rtol=1e-5)

    correct, counted = anchor_accuracy(cls_pred, cls_target)
    assert counted == 4 * pos.sum()  # 18 positives + 54 hard negatives
    expected = sum(((np.argmax(cls_pred.asnumpy()[i], -1) == target[i])
                    & (pos[i] | np.isin(np.arange(n), np.argsort(-np.where(pos[i], -np.inf, ce[i]))
                                        [: 3 * pos[i].sum()]))).sum() for i in range(b))
    assert correct == expected
    # A perfect classifier is right on every counted anchor (ties make the mined set differ).
    right, seen = anchor_accuracy(mx.nd.one_hot(cls_target, c) * 20, cls_target)
    assert right == seen >= pos.sum()


def test_learning_rate_schedules():
    p = TrainParams.model_validate(train_params(epochs=10, lr=0.1, lr_decay_epochs=[4, 8],
                                                warmup_epochs=2))
    assert learning_rate(p, 0, 5) == pytest.approx(0.01)  # warmup: 1/10 of the way
    assert learning_rate(p, 9, 5) == pytest.approx(0.1)
    assert learning_rate(p, 4 * 5, 5) == pytest.approx(0.01)
    assert learning_rate(p, 8 * 5, 5) == pytest.approx(0.001)
    cos = TrainParams.model_validate({**p.model_dump(), "schedule": "cosine"})
    assert learning_rate(cos, 10, 5) == pytest.approx(0.1)  # right after warmup
    assert learning_rate(cos, 49, 5) < 0.001


# ---------------------------------------------------------------------------------------------
# Determinism controls

CONTROLS = ("MXNET_ENFORCE_DETERMINISM", "MXNET_CUDNN_AUTOTUNE_DEFAULT")


class EnvironmentSeen:
    """A dataset whose items are the determinism controls as a DataLoader worker sees them."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index):
        import os

        return np.array([float(os.environ.get(key, -1)) for key in CONTROLS], np.float32)


def unset_controls(monkeypatch) -> None:
    """Unset the controls here; monkeypatch restores what was there (set first so it records)."""
    for key in CONTROLS:
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)


def test_determinism_controls_reach_the_process_and_its_dataloader_workers(monkeypatch):
    from mxnet import gluon

    from stages.training import apply_determinism

    unset_controls(monkeypatch)
    assert apply_determinism(False) == dict.fromkeys(CONTROLS)  # off: nothing set
    assert not set(CONTROLS) & set(os.environ)
    assert apply_determinism(True) == {"MXNET_ENFORCE_DETERMINISM": "1",
                                       "MXNET_CUDNN_AUTOTUNE_DEFAULT": "0"}
    loader = gluon.data.DataLoader(EnvironmentSeen(), batch_size=1, num_workers=1)
    assert [batch.asnumpy().tolist() for batch in loader] == [[[1.0, 0.0]]] * 2
    del loader


def test_determinism_controls_for_a_launched_process_leave_this_one_alone(monkeypatch):
    from stages.training import apply_determinism

    unset_controls(monkeypatch)
    monkeypatch.setenv("MXNET_CUDNN_AUTOTUNE_DEFAULT", "2")
    child = {"PATH": "/bin"}
    assert apply_determinism(True, child) == {"MXNET_ENFORCE_DETERMINISM": "1",
                                              "MXNET_CUDNN_AUTOTUNE_DEFAULT": "0"}
    assert child["PATH"] == "/bin" and os.environ["MXNET_CUDNN_AUTOTUNE_DEFAULT"] == "2"
    # off, what the environment already says is what is reported (and left as it is)
    assert apply_determinism(False) == {"MXNET_ENFORCE_DETERMINISM": None,
                                        "MXNET_CUDNN_AUTOTUNE_DEFAULT": "2"}


# ---------------------------------------------------------------------------------------------
# Training

@pytest.fixture(scope="module")
def fitted(devkit, tmp_path_factory):
    """The demo SSD trained 4 epochs on the tiny set (flip path, in process), validated at the
    end: (net, history, params, checkpoint dir, validation set)."""
    import mxnet as mx

    from stages.voc import load_voc

    ckpt = tmp_path_factory.mktemp("fit") / "ckpt"
    p = TrainParams.model_validate(train_params(epochs=4, val_interval=4, lr_decay_epochs=[]))
    train_set = load_voc(str(devkit), p.splits, CLASSES)
    val_set = load_voc(str(devkit), [p.val_split], CLASSES)
    net = build_detector(p.network, CLASSES, None, p.seed)
    history = fit(net, train_set, range(len(train_set)), val_set, p, CLASSES, [mx.cpu()],
                  ckpt, "digest", on_epoch=lambda r: None)
    return net, history, p, ckpt, val_set


def test_a_few_epochs_lower_the_loss(fitted):
    """Flip-only path, in process: loss falls, anchor accuracy rises, mAP computed at the end."""
    net, history, p, ckpt, _ = fitted
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert history[-1]["loss"] < 0.8 * history[0]["loss"]
    assert history[-1]["anchor_acc"] > history[0]["anchor_acc"]
    assert 0.0 <= history[-1]["map"] <= 100.0 and "map" not in history[0]
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "epoch-0004.json", "epoch-0004.params", "epoch-0004.states"]


# ---------------------------------------------------------------------------------------------
# Validation: the evaluation's inference path, GluonCV's scoring frame

@pytest.fixture(scope="module")
def val_border(fitted, tmp_path_factory):
    """4 test images of 64 px (enlarged to the net's 128 px input), each with one object drawn
    around the fitted net's top detection so that VOC07's +1 pixel makes it a match in the
    original frame and a miss in the network frame (tests/stages/voc_helpers.py)."""
    from stages.models import GLUONCV_MEAN, GLUONCV_STD
    from stages.voc import load_voc

    net, _, p, _, _ = fitted
    net.set_nms(nms_thresh=0.45, nms_topk=400)
    meta = {"data_shape": p.data_shape, "mean": GLUONCV_MEAN, "std": GLUONCV_STD}
    devkit = write_border_devkit(tmp_path_factory.mktemp("border") / "VOCdevkit", net, meta,
                                 CLASSES)
    return devkit, load_voc(str(devkit), [(2007, "test")], CLASSES)


def test_validation_is_what_the_evaluate_stage_gives(fitted, val_border, tmp_path,
                                                     monkeypatch):
    """The same weights exported with GluonCV's stock head and evaluated by the evaluate_voc
    stage in its default frame (network) give the validation mAP, on images of another size
    than the input too."""
    import json

    import mxnet as mx
    import yaml

    from stages.common import run_stage, write_json
    from stages.convert import main as convert_main
    from stages.evaluate_voc import main as evaluate_main

    net, history, p, ckpt, val_set = fitted
    assert validate(net, val_set, p, CLASSES, [mx.cpu()]) == history[-1]["map"]
    devkit, val = val_border
    validated = validate(net, val, p, CLASSES, [mx.cpu()])
    trained = tmp_path / "trained"
    trained.mkdir()
    (trained / "net.params").write_bytes((ckpt / "epoch-0004.params").read_bytes())
    write_json(trained / "net.json", {"network": p.network, "classes": CLASSES,
                                      "data_shape": p.data_shape})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({
        "convert": {"voc": {"weights": "trained", "head": "gluoncv", "prefilter_topk": False}},
        "evaluate": {"voc": {"split": [2007, "test"], "batch_size": 3, "threads": 2,
                             "samples": 0}}}))
    monkeypatch.chdir(tmp_path)
    assert run_stage(convert_main, ["voc", "--out", "fp32", "--trained", "trained"]) == 0
    assert run_stage(evaluate_main, ["voc", "fp32", "--model", "fp32", "--data", str(devkit),
                                     "--metrics", "voc.json", "--speed", "speed.json",
                                     "--eval-dir", "eval"]) == 0
    evaluated = json.loads((tmp_path / "voc.json").read_text())["map"]
    assert evaluated == pytest.approx(validated, abs=1e-6)  # the metrics file keeps 6 digits


def gluoncv_validation_map(net, dataset, data_shape: int, batch_size: int) -> float:
    """VOC07 mAP as GluonCV's train_ssd.py validates: its DataLoader with SSDDefaultValTransform,
    boxes clipped to the data_shape frame, VOC07MApMetric (written out here as the reference)."""
    from gluoncv.data.batchify import Pad, Stack, Tuple
    from gluoncv.data.transforms.presets.ssd import SSDDefaultValTransform
    from gluoncv.utils.metrics.voc_detection import VOC07MApMetric
    from mxnet import cpu, gluon

    loader = gluon.data.DataLoader(dataset.transform(SSDDefaultValTransform(data_shape,
                                                                            data_shape)),
                                   batch_size, shuffle=False, last_batch="keep",
                                   batchify_fn=Tuple(Stack(), Pad(pad_val=-1)))
    metric = VOC07MApMetric(iou_thresh=0.5, class_names=CLASSES)
    net.set_nms(nms_thresh=0.45, nms_topk=400)
    for data, label in loader:
        ids, scores, bboxes = net(data.as_in_context(cpu()))
        metric.update(bboxes.clip(0, data_shape), ids, scores, label.slice_axis(-1, 0, 4),
                      label.slice_axis(-1, 4, 5), label.slice_axis(-1, 5, 6))
    return 100.0 * metric.get()[1][-1]


def test_validation_matches_gluoncvs_own(fitted, val_border):
    """GluonCV's train_ssd.py validation scores in the network frame: on images of the input
    size (the demo's) and on the border cases of another size alike, the shared path gives its
    mAP to the last digit (scoring in the original frame would not)."""
    import mxnet as mx

    net, _, p, _, val_set = fitted
    border = val_border[1]
    for dataset in (val_set, border):
        reference = gluoncv_validation_map(net, dataset, p.data_shape, p.batch_size)
        assert validate(net, dataset, p, CLASSES, [mx.cpu()]) == pytest.approx(reference,
                                                                                abs=1e-9)
    from stages.voc import detect_voc, in_frame, labels, score_voc07

    meta = {"data_shape": p.data_shape, "mean": GLUONCV_MEAN, "std": GLUONCV_STD}
    detections, _, _ = detect_voc(net, meta, border, len(border), p.batch_size)
    original = score_voc07(*in_frame(detections, labels(border), "original", p.data_shape),
                           CLASSES)["map"]
    assert original > reference + 1.0
