"""stages/bf16.py: CPU capability detection (both paths), conversion, export and reload."""
from __future__ import annotations

import json
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest

from stages import bf16
from stages.common import StageError
from stages.inference import load_symbol_block
from tests.stages.tiny_models import tiny_model

EPYC = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9B14
flags\t\t: fpu vme sse sse2 avx2 avx512f avx512_vnni avx512_bf16 vaes
processor\t: 1
model name\t: AMD EPYC 9B14
flags\t\t: fpu vme sse sse2 avx2 avx512f avx512_vnni avx512_bf16 vaes
"""
SAPPHIRE = "model name\t: Intel(R) Xeon(R) Platinum 8480+\nflags\t: avx512f amx_bf16 amx_tile\n"
CASCADE = ("model name\t: Intel(R) Xeon(R) Gold 6248 CPU @ 2.50GHz\n"
           "flags\t: sse avx2 avx512f avx512bw avx512_vnni\n")
HAS_BF16 = bool(bf16.bf16_flags(bf16.read_cpuinfo()))
needs_bf16 = pytest.mark.skipif(not HAS_BF16, reason="this CPU has no BF16 instructions: the "
                                "bf16 stages refuse to run on it (tested by the 'no BF16' tests)")


@pytest.mark.parametrize("text, flags", [(EPYC, ["avx512_bf16"]), (SAPPHIRE, ["amx_bf16"])])
def test_cpus_with_bf16_instructions_pass(text, flags):
    assert bf16.require_bf16(text) == {"cpu": bf16.cpu_name(text), "bf16_flags": flags}


def test_a_cpu_without_bf16_is_refused_with_its_name_and_the_flags_it_lacks():
    with pytest.raises(StageError) as err:
        bf16.require_bf16(CASCADE)
    message = str(err.value)
    assert "Intel(R) Xeon(R) Gold 6248" in message
    assert "avx512_bf16" in message and "amx_bf16" in message and "emulated" in message


def test_no_cpuinfo_is_refused_too(tmp_path):
    assert bf16.read_cpuinfo(tmp_path / "missing") == ""
    with pytest.raises(StageError, match="no /proc/cpuinfo"):
        bf16.require_bf16("")


def test_flags_are_whole_words():
    assert bf16.bf16_flags("flags : avx512_bf16x amx_bf16_not\n") == []
    assert bf16.cpu_name("flags : x\n") == "unknown CPU"


@needs_bf16
def test_conversion_keeps_amp_casts_reloads_exactly_and_stays_close(tmp_path, tmp_path_factory):
    tiny = tiny_model(tmp_path_factory)
    x = mx.nd.array(tiny.data[:4])
    fp32 = [o.asnumpy() for o in load_symbol_block(tiny.fp32)(x)]
    block = bf16.to_bf16(load_symbol_block(tiny.fp32), x)
    expected = bf16.export_bf16(block, tmp_path / "bf16", x)
    symbol = Path(tmp_path / "bf16-symbol.json").read_text()
    lowered = bf16.lowered_layers(symbol)
    assert len(lowered["bf16_layers"]) == 15 and lowered["fp32_layers"] == []
    assert lowered["amp_casts"] > 0
    weights = mx.nd.load(str(tmp_path / "bf16-0000.params"))
    assert any(v.dtype == np.dtype([("bfloat16", "<u2")]) for v in weights.values())

    got = [o.asnumpy() for o in load_symbol_block(tmp_path / "bf16")(x)]
    for a, b in zip(expected, got):
        np.testing.assert_array_equal(a, b)  # the files are the converted model
    assert got[1].dtype == np.float32  # the head stays FP32
    # bfloat16 keeps 8 bits of mantissa: the top scores move by far less than 0.05
    top = fp32[1][:, :5, 0]
    assert np.abs(got[1][:, :5, 0] - top).max() < 0.05
    assert not np.array_equal(got[1], fp32[1])  # and it did change something: it is not FP32


@needs_bf16
def test_excluded_layers_stay_fp32(tmp_path, tmp_path_factory):
    tiny = tiny_model(tmp_path_factory)
    x = mx.nd.array(tiny.data[:2])
    layer = "ssd0_plainbody0_conv0_fwd"
    block = bf16.to_bf16(load_symbol_block(tiny.fp32), x, exclude_layers=[layer])
    bf16.export_bf16(block, tmp_path / "bf16", x)
    lowered = bf16.lowered_layers((tmp_path / "bf16-symbol.json").read_text())
    assert lowered["fp32_layers"] == [layer] and len(lowered["bf16_layers"]) == 14


@needs_bf16
def test_mxnets_default_export_would_drop_the_casts(tmp_path, tmp_path_factory):
    """Why export_bf16 passes remove_amp_cast=False: the default writes a graph without casts
    beside bfloat16 weights, which does not run."""
    tiny = tiny_model(tmp_path_factory)
    x = mx.nd.array(tiny.data[:2])
    block = bf16.to_bf16(load_symbol_block(tiny.fp32), x)
    block.export(str(tmp_path / "plain"), epoch=0)
    nodes = json.loads((tmp_path / "plain-symbol.json").read_text())["nodes"]
    assert not any(n["op"] == "amp_cast" for n in nodes)
    with pytest.raises(mx.base.MXNetError, match="uniform type"):
        load_symbol_block(tmp_path / "plain")(x)
