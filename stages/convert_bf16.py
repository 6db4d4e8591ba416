"""Convert a symbolic FP32 detector to BF16 with MXNet's AMP (convolutions in bfloat16).

    python -m stages.convert_bf16 coco --fp32 model/coco/fp32 --out model/coco/bf16

Reads params ``bf16.<branch>``. Stops first, with exit code 1 and a message naming the CPU, if
the CPU has no BF16 instructions (``stages.bf16.require_bf16``): bfloat16 would run emulated,
slower than FP32. Writes ``<out>-symbol.json`` (with its ``amp_cast`` nodes),
``<out>-0000.params`` and ``<out>-meta.json`` (the FP32 meta plus precision bf16, the layers
running in bfloat16 and in FP32, and the CPU it was made on), after checking that the reloaded
files give the converted block's detections.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

from stages.bf16 import export_bf16, lowered_layers, read_cpuinfo, require_bf16, to_bf16
from stages.common import StageError, file_digest, library_versions, main_guard
from stages.config import ParamsError, Section, load_branch
from stages.export import StagingDir, check_input, publish, verify_roundtrip
from stages.inference import load_symbol_block, model_files, model_outputs, read_meta
from stages.outputs import check_outputs

log = logging.getLogger(__name__)


class Bf16Params(Section):
    """``bf16.<branch>`` in params.yaml."""

    exclude_layers: list[str] = []  # names of layers kept in FP32 (e.g. a class predictor)
    # store the weights of bfloat16 layers in bfloat16 (half the file; same detections)
    cast_optional_params: bool = True


def build_meta(fp32_meta: dict, p: Bf16Params, lowered: dict, cpu: dict, fp32_params_md5: str,
               params_md5: str) -> dict:
    """BF16 meta: the FP32 meta with precision bf16, what was lowered, and where."""
    meta = dict(fp32_meta)
    meta.update({
        "precision": "bf16",
        "bf16": {"exclude_layers": list(p.exclude_layers),
                 "cast_optional_params": p.cast_optional_params, **lowered},
        "cpu": cpu,
        "params_md5": params_md5,
        "fp32_params_md5": fp32_params_md5,
        "libraries": library_versions(),
    })
    return meta


def check_excluded(p: Bf16Params, branch: str, fp32: Path) -> None:
    """Every name of ``exclude_layers`` must be a convolution or fully connected layer of the
    FP32 model (a typo would silently convert the layer)."""
    try:
        nodes = json.loads(Path(f"{fp32}-symbol.json").read_text())["nodes"]
    except (OSError, ValueError, KeyError) as exc:
        raise StageError(f"cannot read {fp32}-symbol.json: {exc}") from exc
    layers = {n["name"] for n in nodes if n["op"] in ("Convolution", "FullyConnected")}
    unknown = sorted(set(p.exclude_layers) - layers)
    if unknown:
        raise ParamsError(f"bf16.{branch}.exclude_layers: {unknown} name no convolution or fully "
                          f"connected layer of {fp32} (it has {len(layers)}, e.g. "
                          f"{sorted(layers)[:3]})")


def run(p: Bf16Params, branch: str, fp32: Path, out: Path, cpuinfo: str) -> dict:
    """Check the CPU and params, convert, export, verify the reload, publish; return the meta."""
    cpu = require_bf16(cpuinfo)
    fp32_meta = read_meta(fp32)
    if fp32_meta["precision"] != "fp32":
        raise StageError(f"{fp32} is a {fp32_meta['precision']} model, not fp32")
    check_excluded(p, branch, fp32)
    size = int(fp32_meta["data_shape"])
    x = check_input(size)
    fp32_net = load_symbol_block(fp32)
    reference = [o.asnumpy() for o in fp32_net(x)]
    block = to_bf16(fp32_net, x, p.exclude_layers, p.cast_optional_params)
    with StagingDir(out) as tmp_prefix:
        expected = export_bf16(block, tmp_prefix, x)
        verify_roundtrip(tmp_prefix, x, expected, atol=1e-3)
        lowered = lowered_layers(Path(f"{tmp_prefix}-symbol.json").read_text())
        if not lowered["bf16_layers"]:
            raise StageError(f"no layer runs in bfloat16 (bf16.exclude_layers: "
                             f"{list(p.exclude_layers)})")
        meta = build_meta(fp32_meta, p, lowered, cpu, file_digest(f"{fp32}-0000.params"),
                          file_digest(f"{tmp_prefix}-0000.params"))
        publish(tmp_prefix, out, meta)
    drift = float(np.abs(expected[1] - reference[1]).max()) if reference[1].size else 0.0
    log.info("BF16 model %s: %d layers in bfloat16, %d in FP32, %d casts; on the check input "
             "its scores differ from FP32 by up to %.4f (%s, %s)", out,
             len(lowered["bf16_layers"]), len(lowered["fp32_layers"]), lowered["amp_casts"],
             drift, cpu["cpu"], "+".join(cpu["bf16_flags"]))
    return meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("branch", help="params section bf16.<branch>, e.g. coco")
    parser.add_argument("--fp32", required=True, type=Path, help="FP32 model prefix")
    parser.add_argument("--out", required=True, type=Path, help="BF16 model prefix")
    args = parser.parse_args(argv)
    check_outputs(files=model_outputs(args.out), inputs={"--fp32": model_files(args.fp32)})
    p = load_branch("bf16", args.branch, Bf16Params)
    run(p, args.branch, args.fp32, args.out, read_cpuinfo())
    return 0


if __name__ == "__main__":
    main_guard(main)
