"""stages/int8_tuning.py on a real (tiny) detector: candidates built from thresholds collected
once are exactly what plain quantization with the same exclusions gives."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import mxnet as mx
import pytest

from stages.common import StageError

from stages import int8_tuning, quantization
from stages.inference import load_symbol_block
from stages.quantize import QuantizeParams
from tests.stages.tiny_models import tiny_model

PATTERNS = ("flatten", "concat")
LAYER = "ssd0_plainbody0_conv4_fwd"


def exported(net, prefix: Path, x) -> tuple[str, str, str]:
    """(symbol md5, params md5, symbol text) of ``net`` exported after one forward."""
    net.hybridize()
    net(x)
    net.export(str(prefix), epoch=0)
    symbol = Path(f"{prefix}-symbol.json").read_text()
    params = Path(f"{prefix}-0000.params").read_bytes()
    return hashlib.md5(symbol.encode()).hexdigest(), hashlib.md5(params).hexdigest(), symbol


def quantized_convs(symbol: str) -> list[str]:
    return [name for q in quantization.quantized_layers(symbol) for name in q.get("layers", [])]


@pytest.mark.parametrize("mode", ["naive", "entropy", "none"])
def test_candidates_equal_plain_quantization_byte_for_byte(tmp_path, tmp_path_factory, mode):
    tiny = tiny_model(tmp_path_factory)
    calib = tiny.data[:8]
    x = mx.nd.array(tiny.data[:2])
    recipe = int8_tuning.Recipe(mode, "auto", PATTERNS, 128)
    fp32 = load_symbol_block(tiny.fp32)
    cache = int8_tuning.Thresholds(fp32, recipe, None if mode == "none" else calib, 4)
    # entropy: one case, its KL threshold search costs ~1 s per layer output on 2 cores
    for keep in ([[LAYER]] if mode == "entropy" else [[], [LAYER]]):
        params = QuantizeParams(calib_mode=mode, calib_images=8, batch_size=4,
                                         exclude_layers=list(PATTERNS) + keep)
        plain = quantization.quantize(load_symbol_block(tiny.fp32), None if mode == "none" else calib,
                                  128, params, None)
        candidate = int8_tuning.quantize_candidate(fp32, recipe, cache, keep, tiny.data)
        want = exported(plain, tmp_path / f"plain{len(keep)}", x)
        got = exported(candidate, tmp_path / f"cand{len(keep)}", x)
        assert got[:2] == want[:2]
        convs = quantized_convs(got[2])
        assert len(convs) == 15 - len(keep) and (LAYER in convs) != bool(keep)
        if mode != "none":
            assert int8_tuning.uncalibrated_nodes(got[2]) == []


def test_uncalibrated_nodes_are_found():
    nodes = {"nodes": [
        {"op": "_contrib_quantize_v2", "name": "data_quantize",
         "attrs": {"min_calib_range": "-1", "max_calib_range": "1"}},
        {"op": "_sg_mkldnn_conv", "name": "q0", "attrs": {"quantized": "true"}},
        {"op": "_sg_mkldnn_conv", "name": "f1", "attrs": {}},
        {"op": "_contrib_quantize_v2", "name": "q_in", "attrs": {}},
    ]}
    assert int8_tuning.uncalibrated_nodes(json.dumps(nodes)) == ["q0", "q_in"]


def test_measure_is_100_with_everything_in_fp32_and_less_with_a_bad_calibration(
        tmp_path_factory):
    tiny = tiny_model(tmp_path_factory)
    fp32 = load_symbol_block(tiny.fp32)
    # calibrated on one image with entropy: thresholds from a single histogram
    recipe = int8_tuning.Recipe("entropy", "auto", PATTERNS, 128)
    cache = int8_tuning.Thresholds(fp32, recipe, tiny.data[:1], batch_size=1)
    measure = int8_tuning.AgreementProbe(fp32, recipe, cache, tiny.data, 8,
                                            num_classes=4, min_score=0.5)
    convs = [n["name"] for n in json.loads(Path(f"{tiny.fp32}-symbol.json").read_text())["nodes"]
             if n["op"] == "Convolution"]
    assert measure(convs) == pytest.approx(100.0)  # nothing quantized: FP32's own detections
    quantized = measure([])
    assert 0.0 < quantized < 100.0
    assert measure([]) == quantized  # deterministic: same candidate, same agreement


def test_a_model_that_detects_nothing_cannot_be_tuned(tmp_path, tmp_path_factory):
    from tests.stages.tiny_models import export_tiny_fp32

    tiny = tiny_model(tmp_path_factory)
    silent = load_symbol_block(export_tiny_fp32(tmp_path, background=60.0))  # all background
    recipe = int8_tuning.Recipe("none", "auto", PATTERNS, 128)
    cache = int8_tuning.Thresholds(silent, recipe, None, 2)
    with pytest.raises(StageError, match="detects nothing on the 4 tuning images"):
        int8_tuning.AgreementProbe(silent, recipe, cache, tiny.data[:4], 2, 4, 0.5)


def test_missing_statistics_fail_instead_of_running_uncalibrated(tmp_path_factory):
    tiny = tiny_model(tmp_path_factory)
    recipe = int8_tuning.Recipe("naive", "auto", PATTERNS, 128)
    cache = int8_tuning.Thresholds(load_symbol_block(tiny.fp32), recipe, tiny.data[:2], 2)
    assert "data" in cache.needed([])
    with pytest.raises(StageError, match="no calibration statistics for layer output"):
        cache.thresholds(["data", "not_a_layer_output"])
