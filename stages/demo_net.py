"""The demo's small SSD: a plain 9-layer conv-BN-ReLU body with heads at stride 8, 16 and 32.

Sized for the generated shapes dataset (128 px images, objects of 19-64 px): about 0.72 M
parameters and 1344 anchors at 128 px (4 per cell on 16x16 + 8x8 + 4x4 maps), so it trains from
scratch on two CPU cores in minutes. It is a stock ``gluoncv.model_zoo.ssd.SSD`` (``network=None``,
``features`` = the body factory), so convert, quantize and evaluate treat it like the zoo SSDs.
"""
from __future__ import annotations

from typing import Sequence

from mxnet import gluon, init
from mxnet.gluon import nn

BASE_SIZE = 128
# (out channels, stride) of the nine 3x3 conv-BN-ReLU layers; features are taken after the
# layers whose indices are in OUTPUTS (strides 8, 16, 32).
LAYERS = ((16, 2), (32, 2), (64, 1), (64, 2), (64, 1), (128, 2), (128, 1), (128, 2), (128, 1))
OUTPUTS = (4, 6, 8)
# Anchor sizes in input pixels: stage k gets sizes[k] and sqrt(sizes[k] * sizes[k+1]) at ratio
# 1, plus sizes[k] at ratios 2 and 1/2 -> 4 anchors per cell.
SIZES = (16, 32, 64, 128)
RATIOS = ((1, 2, 0.5),) * 3
STEPS = (8, 16, 32)


class PlainBody(gluon.HybridBlock):
    """Stacked conv-BN-ReLU layers returning the feature maps listed in OUTPUTS."""

    def __init__(self, norm_layer=nn.BatchNorm, norm_kwargs=None, **kwargs):
        super().__init__(**kwargs)
        norm_kwargs = norm_kwargs or {}
        self.stages = []
        with self.name_scope():
            stage = nn.HybridSequential()
            for index, (channels, stride) in enumerate(LAYERS):
                # He init set on the layer itself: training from scratch must not depend on the
                # global initializer the train stage happens to pass.
                stage.add(nn.Conv2D(channels, 3, stride, 1, use_bias=False,
                                    weight_initializer=init.MSRAPrelu(slope=0.0)),
                          norm_layer(**norm_kwargs), nn.Activation("relu"))
                if index in OUTPUTS:
                    self.register_child(stage, f"stage{len(self.stages)}")
                    self.stages.append(stage)
                    stage = nn.HybridSequential()

    def hybrid_forward(self, F, x):  # noqa: N803 (gluon's signature)
        outputs = []
        for stage in self.stages:
            x = stage(x)
            outputs.append(x)
        return outputs


def plain_body(pretrained=False, norm_layer=nn.BatchNorm, norm_kwargs=None, **_ignored):
    """The ``features`` factory SSD calls (it passes pretrained/ctx/root/norm_layer/norm_kwargs)."""
    if pretrained:
        raise ValueError("the demo body has no pretrained weights; it trains from scratch")
    return PlainBody(norm_layer=norm_layer, norm_kwargs=norm_kwargs)


def demo_ssd(classes: Sequence[str]):
    """A fresh, uninitialised demo SSD for ``classes``."""
    from gluoncv.model_zoo.ssd import SSD

    return SSD(network=None, base_size=BASE_SIZE, features=plain_body, num_filters=None,
               sizes=SIZES, ratios=list(RATIOS), steps=STEPS, classes=list(classes),
               pretrained=False)
