"""The convert_bf16 stage: a BF16 model that reloads to the converted block's detections, its
meta, and the refusals (no BF16 CPU, bad params, bad paths) that leave nothing behind."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from stages import convert_bf16
from tests.stages.coco_helpers import run_in, write_params
from tests.stages.test_bf16 import CASCADE, EPYC, needs_bf16
from tests.stages.tiny_models import tiny_model


def run(folder: Path, tiny, out: Path | None = None, **params) -> tuple[int, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    write_params(folder, bf16={"coco": {"exclude_layers": [], "cast_optional_params": True,
                                        **params}})
    out = out or folder / "model" / "bf16"
    code = run_in(folder, convert_bf16.main, ["coco", "--fp32", tiny.fp32, "--out", out])
    return code, out


@needs_bf16
def test_bf16_model_and_meta(tmp_path, tmp_path_factory, capfd):
    tiny = tiny_model(tmp_path_factory)
    code, out = run(tmp_path, tiny, exclude_layers=["ssd0_convpredictor0_conv0_fwd"])
    assert code == 0
    meta = json.loads(Path(f"{out}-meta.json").read_text())
    fp32_meta = json.loads(Path(f"{tiny.fp32}-meta.json").read_text())
    assert meta["precision"] == "bf16"
    assert {k: meta[k] for k in fp32_meta if k != "precision"} == \
        {k: v for k, v in fp32_meta.items() if k != "precision"}  # classes, head, mean, ...
    assert meta["bf16"]["fp32_layers"] == ["ssd0_convpredictor0_conv0_fwd"]
    assert len(meta["bf16"]["bf16_layers"]) == 14 and meta["bf16"]["amp_casts"] > 0
    assert meta["cpu"]["bf16_flags"]  # made on a CPU with BF16 instructions, named
    symbol = json.loads(Path(f"{out}-symbol.json").read_text())
    assert any(n["op"] == "amp_cast" for n in symbol["nodes"])
    assert "14 layers in bfloat16, 1 in FP32" in capfd.readouterr().err


def test_a_cpu_without_bf16_stops_before_work(tmp_path, tmp_path_factory, capfd, monkeypatch):
    tiny = tiny_model(tmp_path_factory)
    monkeypatch.setattr(convert_bf16, "read_cpuinfo", lambda: CASCADE)  # the machine's input
    code, out = run(tmp_path, tiny)
    assert code == 1
    err = capfd.readouterr().err
    assert "Intel(R) Xeon(R) Gold 6248" in err and "no BF16 instructions" in err
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize("params, message", [
    ({"exclude_layers": ["ssd0_no_such_conv"]}, "bf16.coco.exclude_layers: ['ssd0_no_such_conv']"
                                                " name no convolution"),
    ({"exclude_layers": "conv0"}, "bf16.coco.exclude_layers: Input should be a valid list"),
    ({"cast_optional_params": 1}, "bf16.coco.cast_optional_params: Input should be a valid "
                                  "boolean"),
    ({"layers": []}, "bf16.coco.layers: unknown key"),
])
def test_bad_params_fail_before_work(tmp_path, tmp_path_factory, capfd, params, message):
    tiny = tiny_model(tmp_path_factory)
    code, out = run(tmp_path, tiny, **params)
    assert code == 2
    assert message in capfd.readouterr().err
    assert not (tmp_path / "model").exists()


def test_an_output_over_the_input_model_is_refused(tmp_path, tmp_path_factory, capfd):
    tiny = tiny_model(tmp_path_factory)
    before = Path(f"{tiny.fp32}-meta.json").read_bytes()
    code, _ = run(tmp_path, tiny, out=tiny.fp32)
    assert code == 2
    assert "--fp32" in capfd.readouterr().err
    assert Path(f"{tiny.fp32}-meta.json").read_bytes() == before


def test_a_model_that_is_not_fp32_is_refused(tmp_path, tmp_path_factory, capfd, monkeypatch):
    tiny = tiny_model(tmp_path_factory)
    monkeypatch.setattr(convert_bf16, "read_cpuinfo", lambda: EPYC)  # past the CPU check
    other = tmp_path / "int8"
    for suffix in ("symbol.json", "0000.params"):
        Path(f"{other}-{suffix}").write_bytes(Path(f"{tiny.fp32}-{suffix}").read_bytes())
    meta = json.loads(Path(f"{tiny.fp32}-meta.json").read_text())
    Path(f"{other}-meta.json").write_text(json.dumps({**meta, "precision": "int8"}))
    (tmp_path / "w").mkdir()
    write_params(tmp_path / "w", bf16={"coco": {}})
    code = run_in(tmp_path / "w", convert_bf16.main,
                  ["coco", "--fp32", other, "--out", tmp_path / "w" / "bf16"])
    assert code == 1 and "is a int8 model, not fp32" in capfd.readouterr().err
    assert not list((tmp_path / "w").glob("bf16*"))
