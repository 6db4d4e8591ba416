"""The demo's small SSD, built through the network registry like every other network."""
from __future__ import annotations

import pytest

from stages.common import StageError
from stages.models import build_network

CLASSES = ["rectangle", "ellipse", "triangle", "cross"]


def test_demo_ssd_shapes_anchors_and_size():
    import mxnet as mx
    from mxnet import autograd

    net = build_network("demo_ssd", classes=CLASSES)
    net.initialize()
    x = mx.nd.random.uniform(shape=(2, 3, 128, 128))
    with autograd.train_mode():
        cls_preds, box_preds, anchors = net(x)
    # 4 anchors per cell on the 16x16, 8x8 and 4x4 maps (strides 8, 16, 32).
    assert cls_preds.shape == (2, 1344, len(CLASSES) + 1)
    assert box_preds.shape == (2, 1344, 4) and anchors.shape == (1, 1344, 4)
    params = sum(p.data().size for name, p in net.collect_params().items()
                 if "anchor" not in name)
    assert 700_000 <= params <= 740_000
    ids, scores, boxes = net(x)  # inference mode: GluonCV's stock decoding and NMS
    assert ids.shape == (2, 100, 1) and boxes.shape == (2, 100, 4)


def test_demo_ssd_refuses_pretrained_weights_and_missing_classes():
    with pytest.raises(StageError, match="no pretrained weights"):
        build_network("demo_ssd", classes=CLASSES, pretrained_base=True)
    with pytest.raises(StageError, match="needs its class names"):
        build_network("demo_ssd")
