"""BF16 as a third precision: CPU capability, conversion with MXNet's AMP, what was lowered.

MXNet 1.9.1 lowers a symbolic FP32 model to bfloat16 with ``mxnet.contrib.amp``: convolutions
and fully connected layers (and the BatchNorm/ReLU between them) run in bfloat16, MXNet inserts
``amp_cast`` nodes at the boundaries, and the detection head (softmax, decoding, NMS) stays in
FP32, so the outputs are FP32 as before. Two traps this module handles:

- ``export``/``tojson`` drop ``amp_cast`` nodes unless told not to (``remove_amp_cast=False``);
  without them the saved graph is the FP32 graph with bfloat16 weights, which does not load.
- On a CPU without BF16 instructions (``avx512_bf16``, or ``amx_bf16`` on recent Xeons) oneDNN
  emulates bfloat16 with many FP32 instructions, or has no kernel at all: a model that should be
  faster than FP32 crawls. Every BF16 step calls ``require_bf16`` first and stops with a message
  naming the CPU and its missing flags (README "BF16").
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

from stages.common import StageError

log = logging.getLogger(__name__)

BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of CPUs with BF16 instructions
CPUINFO = Path("/proc/cpuinfo")


# ---------------------------------------------------------------------------------------------
# CPU capability

def read_cpuinfo(path: Path = CPUINFO) -> str:
    """The text of /proc/cpuinfo ('' where there is none, e.g. not Linux)."""
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def cpu_flags(cpuinfo: str) -> set[str]:
    """The flags of the first processor listed in a /proc/cpuinfo text."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def cpu_name(cpuinfo: str) -> str:
    """The CPU's model name from a /proc/cpuinfo text ('unknown CPU' if absent)."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            return value.strip()
    return "unknown CPU"


def bf16_flags(cpuinfo: str) -> list[str]:
    """The BF16 instruction flags this CPU has (empty: no BF16 instructions)."""
    flags = cpu_flags(cpuinfo)
    return [f for f in BF16_FLAGS if f in flags]


def require_bf16(cpuinfo: str) -> dict:
    """The CPU record for provenance ({cpu, bf16_flags}); StageError if the CPU has no BF16
    instructions, since bfloat16 would then run emulated, far slower than FP32."""
    found = bf16_flags(cpuinfo)
    name = cpu_name(cpuinfo)
    if not found:
        where = "no /proc/cpuinfo to read" if not cpuinfo else \
            f"{name} lists neither {' nor '.join(BF16_FLAGS)} in /proc/cpuinfo"
        raise StageError(
            f"this CPU has no BF16 instructions ({where}): bfloat16 would run emulated, slower "
            "than FP32, so the bf16 stages refuse to run here. Run them on a CPU with "
            "AVX512-BF16 or AMX (README \"BF16\"), or leave the bf16 precision out.")
    return {"cpu": name, "bf16_flags": found}


# ---------------------------------------------------------------------------------------------
# Conversion

def to_bf16(fp32_net, x, exclude_layers: Sequence[str] = (), cast_optional_params: bool = True):
    """The BF16 version of a (hybridizable) FP32 SymbolBlock, run once on ``x`` (an NDArray
    batch) so it can be exported. ``exclude_layers``: names of layers kept in FP32."""
    import mxnet as mx
    from mxnet.contrib import amp

    fp32_net.hybridize()
    fp32_net(x)  # AMP converts the cached graph: it must exist
    try:
        block = amp.convert_hybrid_block(fp32_net, target_dtype="bfloat16", ctx=mx.cpu(),
                                         excluded_sym_names=list(exclude_layers) or None,
                                         cast_optional_params=cast_optional_params)
    except (mx.base.MXNetError, AssertionError, ValueError) as exc:
        raise StageError(f"bfloat16 conversion failed: {exc}") from exc
    block.hybridize()
    block(x)
    return block


def export_bf16(block, prefix: Path, x) -> list:
    """Run ``x`` through ``block`` and export it to ``prefix`` keeping its ``amp_cast`` nodes;
    return the outputs as numpy arrays (for the reload check)."""
    outputs = [o.asnumpy() for o in block(x)]
    block.export(str(prefix), epoch=0, remove_amp_cast=False)
    return outputs


def lowered_layers(symbol_json: str) -> dict:
    """What runs in bfloat16 in an exported graph: the compute layers (Convolution,
    FullyConnected) whose output is bfloat16 by MXNet's own type inference, and the count of
    ``amp_cast`` nodes."""
    import mxnet as mx

    sym = mx.sym.load_json(symbol_json)
    internals = sym.get_internals()
    arg_types, out_types, _ = internals.infer_type_partial(data="float32")
    if out_types is None:
        raise StageError("cannot infer the types of the bfloat16 graph")
    types = dict(zip(internals.list_outputs(), out_types))
    nodes = json.loads(symbol_json)["nodes"]
    compute = [n["name"] for n in nodes if n["op"] in ("Convolution", "FullyConnected")]
    bf16 = [name for name in compute if _is_bf16(types.get(f"{name}_output"))]
    return {"bf16_layers": bf16, "fp32_layers": [n for n in compute if n not in bf16],
            "amp_casts": sum(n["op"] in ("amp_cast", "amp_multicast") for n in nodes)}


def _is_bf16(dtype) -> bool:
    """MXNet reports bfloat16 as numpy's structured ('bfloat16', '<u2') dtype."""
    import numpy as np

    return dtype is not None and np.dtype(dtype).names == ("bfloat16",)
