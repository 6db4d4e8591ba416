"""Detection networks by name: GluonCV's model zoo SSDs plus the project's own small demo SSD.

Every entry returns a ``gluoncv.model_zoo.ssd.SSD`` so the convert/quantize/evaluate stages can
treat them alike. Unknown names fail with the list of known ones.
"""
from __future__ import annotations

from typing import Callable, Sequence

from stages.common import StageError


def _zoo(zoo_name: str) -> Callable[..., object]:
    """Factory for a GluonCV zoo SSD; ``classes`` re-targets its class predictors if they differ."""

    def build(classes: Sequence[str] | None = None, pretrained: bool = False,
              pretrained_base: bool = False):
        from gluoncv import model_zoo

        net = model_zoo.get_model(zoo_name, pretrained=pretrained,
                                  pretrained_base=pretrained_base)
        if classes is not None and list(classes) != list(net.classes):
            if not pretrained:  # reset_class reads the old predictors' context: give them one
                net.class_predictors.initialize()
            net.reset_class(list(classes))
        return net

    return build


def _demo(classes: Sequence[str] | None = None, pretrained: bool = False,
          pretrained_base: bool = False):
    """The demo's small SSD (stages/demo_net.py); it has no pretrained weights of any kind."""
    from stages.demo_net import demo_ssd

    if pretrained or pretrained_base:
        raise StageError("network 'demo_ssd' has no pretrained weights: set pretrained and "
                         "pretrained_base to false (it trains from scratch)")
    if not classes:
        raise StageError("network 'demo_ssd' needs its class names (classes=[...])")
    return demo_ssd(classes)


NETWORKS: dict[str, Callable[..., object]] = {
    "ssd_300_vgg16_atrous_coco": _zoo("ssd_300_vgg16_atrous_coco"),
    "ssd_300_vgg16_atrous_voc": _zoo("ssd_300_vgg16_atrous_voc"),
    "demo_ssd": _demo,
}


def build_network(name: str, **kwargs):
    """Build the network registered as ``name`` (see NETWORKS)."""
    try:
        factory = NETWORKS[name]
    except KeyError:
        raise StageError(f"unknown network {name!r}; known: {', '.join(sorted(NETWORKS))}") from None
    return factory(**kwargs)


def init_like_trained(ssd, seed: int = 0, spread: float = 1.5, background: float = 9.0,
                      data_shape: int = 300) -> None:
    """Random weights whose class scores look like a trained detector's (for tests, benchmarks).

    A freshly initialised SSD scores every anchor and class alike (about 1/(C+1), above the 0.01
    threshold), so decoding and NMS work on all N*C candidates, far more than with real weights.
    Here every class predictor is rescaled so its logits have standard deviation ``spread`` on a
    fixed random input, and its background channels get bias ``background``: most anchors are
    then confidently background and only a thin tail of (anchor, class) pairs passes 0.01 (with
    the defaults on SSD300-COCO and generated 640x480 scenes: ~1,100 per image, ~10 above 0.05).
    """
    import mxnet as mx
    import numpy as np

    mx.random.seed(seed)
    ssd.initialize(mx.init.Xavier(), force_reinit=True)
    x = mx.nd.array(np.random.RandomState(seed).normal(0, 1, (1, 3, data_shape, data_shape)))
    ssd(x)  # completes deferred initialisation
    stride = ssd.num_classes + 1
    for feat, cp in zip(ssd.features(x), ssd.class_predictors):
        logits = cp(feat).asnumpy()
        conv = cp.predictor
        conv.weight.set_data(conv.weight.data() * (spread / max(float(logits.std()), 1e-6)))
        bias = np.zeros(conv.bias.shape, np.float32)
        bias[0::stride] = background
        conv.bias.set_data(mx.nd.array(bias))
