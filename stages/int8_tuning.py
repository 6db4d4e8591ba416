"""The MXNet side of accuracy-aware INT8: candidate models built fast, and measured.

Tuning builds one INT8 model per measurement (every candidate layer alone, then each greedy
step). Calibrating each from scratch would repeat the calibration forward passes and, for
entropy, the KL threshold search (~1 s per layer output) every time, so the statistics of every
layer output are collected once (``Thresholds``), thresholds are computed the first time a
candidate needs them, and each candidate is built by MXNet's own ``quantize_net_v2`` in its
``customize`` calibration mode with exactly the thresholds MXNet's quantization pass asks for
(``quantize_graph``'s collector names them). A layer output's threshold does not depend on which
layers are excluded (it is a statistic of the FP32 model), so a candidate is the model plain
quantization with the same exclusions gives, byte for byte (tests/stages/test_int8_tuning.py
checks it for naive, entropy and none).

The collectors and the KL search are MXNet's own (private helpers of ``mxnet.contrib.
quantization`` in the pinned mxnet 1.9.1, used rather than copied so the numbers are MXNet's;
the byte-for-byte test fails if a new MXNet changes them).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from stages.common import StageError
from stages.inference import Detections, chunks, run_network, to_detections
from stages.tuning import TuneResult, agreement

log = logging.getLogger(__name__)


class _EveryOutput:
    """The ``include_layer`` of MXNet's collectors: every layer output and the input."""

    def __contains__(self, name: object) -> bool:
        return name == "data" or (isinstance(name, str) and name.endswith("_output"))


class _FixedThresholds:
    """A ``customize`` collector that collects nothing and hands MXNet fixed thresholds."""

    def __init__(self, thresholds: dict) -> None:
        self.min_max_dict = dict(thresholds)

    def collect(self, name, arr) -> None:  # noqa: ARG002 (MXNet's callback signature)
        return None


@dataclass(frozen=True)
class Recipe:
    """How every candidate is quantized: the stage's settings minus the tuned exclusions."""

    calib_mode: str  # naive | entropy | none
    quantized_dtype: str
    exclude_patterns: tuple[str, ...]  # substrings of layer names kept in FP32 (params)
    data_shape: int


def _quantize(fp32_net, recipe: Recipe, exclude_layers: Sequence[str], calib_mode: str,
              collector=None, calib_data: np.ndarray | None = None):
    """One call of MXNet's ``quantize_net_v2`` with the recipe's fixed settings."""
    import mxnet as mx
    from mxnet.contrib.quantization import quantize_net_v2

    kwargs = {}
    if calib_data is None:
        kwargs["data_shapes"] = [mx.io.DataDesc("data", (1, 3, recipe.data_shape,
                                                         recipe.data_shape))]
    else:
        kwargs.update(calib_data=mx.io.NDArrayIter(data=calib_data, batch_size=len(calib_data)),
                      num_calib_examples=len(calib_data), LayerOutputCollector=collector)
    # no logger: MXNet would switch its per-layer C++ log on for the rest of the process
    return quantize_net_v2(fp32_net, quantized_dtype=recipe.quantized_dtype,
                           quantize_mode="full", exclude_layers=list(exclude_layers),
                           exclude_layers_match=list(recipe.exclude_patterns),
                           calib_mode=calib_mode, ctx=mx.cpu(), **kwargs)


class Thresholds:
    """Calibration statistics of every layer output, collected once; thresholds on demand.

    ``recipe.calib_mode`` naive: (min, max) of each output over the calibration data. entropy:
    each output's histogram, and its KL-optimal threshold computed (and kept) the first time a
    candidate needs it: the search costs ~1 s per layer, and most outputs are never needed.
    ``none`` has no thresholds (ranges are taken at run time).
    """

    def __init__(self, fp32_net, recipe: Recipe, calib_data: np.ndarray | None,
                 batch_size: int) -> None:
        import mxnet as mx
        from mxnet.contrib import quantization as mxq

        self.recipe = recipe
        self._known: dict[str, tuple] = {}
        self._hist: dict = {}
        if recipe.calib_mode == "none":
            return
        self._graph = _fused_graph(fp32_net, recipe)
        if recipe.calib_mode == "naive":
            collector = mxq._LayerOutputMinMaxCollector(quantized_dtype=recipe.quantized_dtype,
                                                        include_layer=_EveryOutput())
        elif recipe.calib_mode == "entropy":
            collector = mxq._LayerHistogramCollector(include_layer=_EveryOutput())
            collector.min_max_dict = {}  # read by the customize mode after collection: unused
        else:
            raise ValueError(f"unknown calibration mode {recipe.calib_mode!r}")
        mxq.quantize_net_v2(fp32_net, quantized_dtype=recipe.quantized_dtype,
                            quantize_mode="full",
                            exclude_layers_match=list(recipe.exclude_patterns),
                            calib_mode="customize",
                            calib_data=mx.io.NDArrayIter(data=calib_data, batch_size=batch_size),
                            num_calib_examples=len(calib_data), ctx=mx.cpu(),
                            LayerOutputCollector=collector)
        if recipe.calib_mode == "naive":
            self._known = dict(collector.min_max_dict)
        else:
            self._hist = dict(collector.hist_dict)

    def needed(self, keep_fp32: Sequence[str]) -> list[str]:
        """The layer outputs a candidate with ``keep_fp32`` in FP32 calibrates (MXNet's own
        quantization pass says which; nothing is calibrated here)."""
        import mxnet as mx
        from mxnet.contrib.quantization import quantize_graph

        symbol, args, auxs, matched = self._graph
        _, _, _, collector = quantize_graph(
            sym=symbol, arg_params=args, aux_params=auxs, ctx=mx.cpu(),
            excluded_sym_names=list(keep_fp32) + matched, calib_mode=self.recipe.calib_mode,
            quantized_dtype=self.recipe.quantized_dtype, quantize_mode="full")
        return list(collector.include_layer)

    def thresholds(self, names: Sequence[str]) -> dict:
        """(min, max) of each named output, as MXNet's naive/entropy calibration sets them."""
        from mxnet.contrib.quantization import _get_optimal_thresholds

        missing = [n for n in names if n not in self._known and n not in self._hist]
        if missing:
            raise StageError(f"no calibration statistics for layer output(s) {missing}: "
                             "the candidate would run uncalibrated")
        todo = {n: self._hist[n] for n in names if n not in self._known}
        if todo:
            self._known.update(_get_optimal_thresholds(todo, self.recipe.quantized_dtype))
        return {n: self._known[n] for n in names}


def _fused_graph(fp32_net, recipe: Recipe):
    """(symbol fused by oneDNN's quantization backend, args, auxs, names the recipe's patterns
    exclude): what ``quantize_net_v2`` builds before its quantization pass."""
    import tempfile

    import mxnet as mx

    fp32_net.hybridize()
    fp32_net(mx.nd.zeros((1, 3, recipe.data_shape, recipe.data_shape)))
    with tempfile.TemporaryDirectory() as tmp:
        fp32_net.export(f"{tmp}/fp32", epoch=0)
        symbol, args, auxs = mx.model.load_checkpoint(f"{tmp}/fp32", 0)
    matched = [s.name for s in symbol.get_internals()
               if any(p in s.name for p in recipe.exclude_patterns)]
    return symbol.get_backend_symbol("MKLDNN_QUANTIZE"), args, auxs, matched


def quantize_candidate(fp32_net, recipe: Recipe, cache: Thresholds, keep_fp32: Sequence[str],
                       sample: np.ndarray):
    """The INT8 SymbolBlock with ``keep_fp32`` (layer names) and the recipe's patterns in FP32,
    calibrated from ``cache`` (one forward of ``sample[:1]``, which collects nothing)."""
    if recipe.calib_mode == "none":
        return _quantize(fp32_net, recipe, keep_fp32, "none")
    fixed = _FixedThresholds(cache.thresholds(cache.needed(keep_fp32)))
    return _quantize(fp32_net, recipe, keep_fp32, "customize", fixed, sample[:1])


def uncalibrated_nodes(symbol_json: str) -> list[str]:
    """Quantized nodes of an INT8 symbol without calibrated ranges (they would take their
    ranges at run time: slower, and not the calibration asked for)."""
    missing = []
    for node in json.loads(symbol_json)["nodes"]:
        attrs = node.get("attrs", {})
        quantized = (node["op"] == "_sg_mkldnn_conv" and attrs.get("quantized") == "true") \
            or node["op"] == "_contrib_quantize_v2"
        if quantized and "min_calib_range" not in attrs:
            missing.append(node["name"])
    return missing


def detect_array(net, data: np.ndarray, batch_size: int) -> list[Detections]:
    """Detections of ``net`` on preprocessed images, boxes in network-input pixels."""
    size = int(data.shape[-1])
    out = []
    for start, part in zip(range(0, len(data), batch_size), chunks(data, batch_size)):
        ids, scores, boxes = run_network(net, part)
        out.extend(to_detections(start + i, ids[i], scores[i], boxes[i], (size, size), size)
                   for i in range(len(part)))
    return out


class AgreementProbe:
    """Agreement of INT8 models with the FP32 model on the tuning images.

    ``probe(keep_fp32)`` builds the candidate with ``keep_fp32`` in FP32 (for
    ``stages.tuning.tune``); ``probe.of(net)`` measures a given model (the published one). The
    FP32 detections are computed once, here.
    """

    def __init__(self, fp32_net, recipe: Recipe, cache: Thresholds, tune_data: np.ndarray,
                 batch_size: int, num_classes: int, min_score: float) -> None:
        self.fp32_net, self.recipe, self.cache = fp32_net, recipe, cache
        self.data, self.batch_size = tune_data, batch_size
        self.num_classes, self.min_score = num_classes, min_score
        self.reference = detect_array(fp32_net, tune_data, batch_size)
        if not any(len(d.ids) for d in self.reference):
            raise StageError(f"the FP32 model detects nothing on the {len(tune_data)} tuning "
                             "images")

    def of(self, net) -> float:
        return agreement(self.reference, detect_array(net, self.data, self.batch_size),
                         self.num_classes, self.min_score)

    def __call__(self, keep_fp32: list[str]) -> float:
        return self.of(quantize_candidate(self.fp32_net, self.recipe, self.cache, keep_fp32,
                                          self.data))


# ---------------------------------------------------------------------------------------------
# What the quantize stage needs around it

@contextlib.contextmanager
def quiet_subgraph_log() -> Iterator[None]:
    """Without MXNet's "Subgraph backend MKLDNN is activated" line for each of the dozens of
    candidate models. MXNet reads MXNET_SUBGRAPH_VERBOSE once, at the process's first bind, so
    this must wrap the first model tuning builds (it does, in the quantize stage)."""
    old = os.environ.get("MXNET_SUBGRAPH_VERBOSE")
    os.environ["MXNET_SUBGRAPH_VERBOSE"] = "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MXNET_SUBGRAPH_VERBOSE", None)
        else:
            os.environ["MXNET_SUBGRAPH_VERBOSE"] = old


def candidate_layers(fp32_symbol_json: str, exclude_patterns: Sequence[str]) -> list[str]:
    """The layers tuning may keep in FP32: every convolution and fully connected layer of the
    FP32 graph that the params' patterns do not already keep in FP32, in graph order."""
    return [n["name"] for n in json.loads(fp32_symbol_json)["nodes"]
            if n["op"] in ("Convolution", "FullyConnected")
            and not any(p in n["name"] for p in exclude_patterns)]


def tuning_images(pool: Sequence[Path], calibration: Sequence[Path], n: int,
                  seed: int) -> list[Path]:
    """``n`` tuning images: the calibration images first, then others of the same pool drawn
    with ``seed`` (the same inputs give the same images)."""
    chosen = list(calibration[:n])
    rest = sorted(set(pool) - set(chosen))
    extra = n - len(chosen)
    if extra > len(rest):
        raise StageError(f"tuning needs {n} images, the calibration pool has {len(pool)}")
    return chosen + random.Random(seed).sample(rest, extra)


def tuning_record(result: TuneResult, after: float, images: Sequence[str],
                  settings: dict) -> dict:
    """The ``tuning`` entry of the INT8 meta: settings, images, agreement before/after, each
    layer's sensitivity, the layers kept in FP32."""
    record = result.to_dict()
    return {"settings": dict(settings), "images": list(images),
            "agreement_before": record.pop("baseline"), "agreement_after": after,
            "agreement_tuning": record.pop("final"), **record}
