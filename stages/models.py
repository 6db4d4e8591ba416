"""Detection networks by name, and building them with their weights.

- ``NETWORKS`` / ``build_network``: GluonCV's model zoo SSDs plus the project's own small demo
  SSD. Every entry returns a ``gluoncv.model_zoo.ssd.SSD`` so the convert/quantize/evaluate stages
  can treat them alike. Unknown names fail with the list of known ones.
- ``build_detector``: a network to train, its base from a weights file or random.
- ``load_ssd``: a network with all its weights (a ``.params`` file or a trained-model
  directory), plus the ``Source`` recorded in the exported model's meta.

No function here downloads anything: GluonCV's pretrained files reach the stages as files that
the fetch_weights stage wrote (sha1-checked, DVC outputs; stages/pretrained.py).
- ``init_like_trained``: random weights that score like a trained detector (tests, benchmarks).

MXNet is imported inside the functions: the train stage sets its thread count first.
"""
from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from stages.common import StageError
from stages.config import ParamsError

log = logging.getLogger(__name__)

# GluonCV's SSD normalisation (RGB, 0..1 scale, ImageNet statistics): how the networks expect
# their input. Written to every model's meta so each consumer preprocesses alike.
GLUONCV_MEAN = (0.485, 0.456, 0.406)
GLUONCV_STD = (0.229, 0.224, 0.225)


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


# ---------------------------------------------------------------------------------------------
# A network to train

def build_detector(network: str, classes: Sequence[str], base: Path | None, seed: int):
    """The registered SSD with ``classes``, its base network's weights from the file ``base``
    (e.g. GluonCV's ImageNet-pretrained ``vgg16_atrous``) or, with None, random.

    Everything not loaded is initialised from ``seed`` (on the CPU, so devices don't matter).
    """
    import mxnet as mx

    mx.random.seed(seed)
    net = build_network(network, classes=list(classes))
    if base is not None:
        load_base(net, base)
    with warnings.catch_warnings():  # re-initialising the loaded base warns; it is skipped
        warnings.simplefilter("ignore")
        net.initialize()
    return net


def load_base(net, path: Path) -> None:
    """Load a base-network weights file into ``net.features`` as GluonCV does with its
    pretrained base (``allow_missing``: the SSD's extra layers are not in it; nothing extra)."""
    import mxnet as mx

    if not path.is_file():
        raise StageError(f"pretrained base weights {str(path)!r}: no such file")
    try:
        saved = mx.nd.load(str(path))
    except mx.base.MXNetError as exc:
        raise StageError(f"pretrained base {path}: not an MXNet .params file ({exc})") from None
    own = set(net.features._collect_params_with_prefix())  # pylint: disable=protected-access
    if not own & set(saved):
        raise StageError(f"pretrained base {path}: none of its {len(saved)} arrays matches a "
                         f"parameter of the network's base (e.g. {sorted(own)[:3]})")
    try:
        net.features.load_parameters(str(path), allow_missing=True, ignore_extra=False)
    except (AssertionError, mx.base.MXNetError, ValueError, RuntimeError) as exc:
        raise StageError(f"pretrained base {path}: does not fit the network's base "
                         f"({exc})") from None
    log.info("loaded %d base arrays from %s", len(own & set(saved)), path)


def check_input_size(net, data_shape: int) -> None:
    """Refuse a data_shape other than the size the net's anchors are laid out for.

    (GluonCV would train at any size, but the exported detector's anchors are fixed for the base
    size: the train stage checks before training, the convert stage before exporting.)
    """
    base = getattr(net.anchor_generators[0], "_im_size", (data_shape, data_shape))
    if tuple(base) != (data_shape, data_shape):
        raise StageError(f"data_shape {data_shape} differs from the network's base size "
                         f"{base[0]}: set data_shape: {base[0]}")


# ---------------------------------------------------------------------------------------------
# A network with all its weights (for export)

@dataclass(frozen=True)
class Source:
    """Where the weights came from (recorded in meta)."""

    network: str
    classes: tuple[str, ...]
    data_shape: int
    weights: str  # the path of the .params file
    mean: tuple[float, float, float] = GLUONCV_MEAN
    std: tuple[float, float, float] = GLUONCV_STD


def load_ssd(weights: str, network: str | None, data_shape: int | None,
             trained_dir: Path | None, weights_file: Path | None = None):
    """The SSD with its weights → (ssd, Source).

    ``weights``: ``trained`` (network, classes and data_shape from ``trained_dir/net.json``,
    weights from its ``net.params``) or ``file`` (the ``.params`` file ``weights_file`` of
    ``network``, e.g. GluonCV's COCO-pretrained weights that the fetch_weights stage wrote).
    """
    if weights == "trained":
        info = read_trained_info(trained_dir)
        ssd = build_network(info["network"], classes=info["classes"])
        params_file = trained_dir / "net.params"
        _load_params(ssd, params_file)
        return ssd, Source(info["network"], tuple(info["classes"]), int(info["data_shape"]),
                           str(params_file), tuple(info.get("mean", GLUONCV_MEAN)),
                           tuple(info.get("std", GLUONCV_STD)))
    if weights_file is None:
        raise ParamsError("convert: weights: file needs --weights <file>")
    ssd = build_network(network, pretrained=False, pretrained_base=False)
    _load_params(ssd, weights_file)
    return ssd, Source(network, tuple(ssd.classes), data_shape, str(weights_file))


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
    import mxnet as mx

    if not params_file.is_file():
        raise StageError(f"weights file not found: {params_file}")
    try:
        ssd.load_parameters(str(params_file), ctx=mx.cpu())
    except (AssertionError, mx.base.MXNetError, ValueError, RuntimeError) as exc:
        raise StageError(f"{params_file}: does not fit the network ({exc})") from exc


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
