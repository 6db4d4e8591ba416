"""The quantize stage with quantize.<branch>.tune, on a small real detector: off changes
nothing; on, a bad calibration is measured, the layers it chose are kept in FP32 and recorded."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from stages import quantize
from stages.quantization import quantized_layers
from tests.stages.coco_helpers import run_in, write_params
from tests.stages.tiny_models import tiny_model

BASE = {"calib_mode": "naive", "calib_images": 4, "batch_size": 2, "seed": 0,
        "exclude_layers": ["flatten", "concat"], "quantized_dtype": "auto"}
TUNE = {"enabled": True, "images": 12, "min_score": 0.5, "threshold": 99.0, "max_layers": 3}


def run(folder: Path, tiny, settings: dict) -> tuple[int, Path]:
    """The stage in ``folder`` (its params.yaml) on the tiny model; the pool is a folder of
    images only: no annotation file exists anywhere the stage could read."""
    folder.mkdir(parents=True, exist_ok=True)
    write_params(folder, quantize={"coco": settings})
    out = folder / "model" / "int8"
    code = run_in(folder, quantize.main, ["coco", "--fp32", tiny.fp32, "--out", out,
                                          "--images", tiny.images,
                                          "--log", folder / "model" / "int8-calibration.log"])
    return code, out


def files(prefix: Path) -> list[bytes]:
    return [Path(f"{prefix}-{s}").read_bytes() for s in ("symbol.json", "0000.params",
                                                          "meta.json")]


def test_tuning_off_is_byte_identical_to_no_tuning_section(tmp_path, tmp_path_factory):
    tiny = tiny_model(tmp_path_factory)
    assert {p.suffix for p in tiny.images.iterdir()} == {".jpg"}  # images only: no labels
    code_a, a = run(tmp_path / "a", tiny, BASE)
    code_b, b = run(tmp_path / "b", tiny, {**BASE, "tune": {**TUNE, "enabled": False}})
    assert code_a == code_b == 0
    assert files(a) == files(b)
    assert "tuning" not in json.loads(Path(f"{a}-meta.json").read_text())


def test_tuning_keeps_the_measured_layers_in_fp32_and_records_it(tmp_path, tmp_path_factory,
                                                                  capfd):
    tiny = tiny_model(tmp_path_factory)
    # calibrated on one image (the random weights' ranges vary a lot between images): INT8 drifts
    bad = {**BASE, "calib_images": 1, "batch_size": 1, "tune": TUNE}
    code, out = run(tmp_path, tiny, bad)
    assert code == 0
    meta = json.loads(Path(f"{out}-meta.json").read_text())
    t = meta["tuning"]
    assert t["settings"] == TUNE and len(t["images"]) == 12
    assert t["images"][0] == meta["calibration"]["image_names"][0]  # calibration image first
    assert len(t["sensitivity"]) == 15  # every convolution of the demo SSD, measured
    assert [s["sensitivity"] for s in t["sensitivity"]] == \
        sorted((s["sensitivity"] for s in t["sensitivity"]), reverse=True)
    assert t["agreement_before"] < t["threshold"]  # the bad calibration is measurably bad
    assert 1 <= len(t["kept_fp32"]) <= 3
    assert t["kept_fp32"] == [s["layer"] for s in t["sensitivity"][:len(t["kept_fp32"])]]
    assert t["agreement_after"] == pytest.approx(t["agreement_tuning"])  # published = measured
    assert t["agreement_after"] > t["agreement_before"]
    assert t["met"] == (t["agreement_after"] >= t["threshold"])
    # the kept layers really run in FP32, the others stay quantized
    symbol = Path(f"{out}-symbol.json").read_text()
    quantized = {n for q in quantized_layers(symbol) for n in q.get("layers", [])}
    assert quantized.isdisjoint(t["kept_fp32"]) and len(quantized) == 15 - len(t["kept_fp32"])
    assert set(t["kept_fp32"]) <= set(meta["excluded_layers"])
    assert "tuning: agreement" in capfd.readouterr().err


def test_tuning_without_calibration_draws_its_images_from_the_pool(tmp_path, tmp_path_factory):
    tiny = tiny_model(tmp_path_factory)
    code, out = run(tmp_path, tiny, {**BASE, "calib_mode": "none",
                                     "tune": {**TUNE, "images": 6, "threshold": 1.0}})
    assert code == 0
    t = json.loads(Path(f"{out}-meta.json").read_text())["tuning"]
    assert len(t["images"]) == 6 and t["kept_fp32"] == [] and t["met"]  # already good enough


@pytest.mark.parametrize("change, message", [
    ({"threshold": 0.0}, "quantize.coco.tune.threshold: Input should be greater than 0"),
    ({"threshold": 100.5}, "quantize.coco.tune.threshold: Input should be less than or equal"),
    ({"max_layers": 0}, "quantize.coco.tune.max_layers: Input should be greater than 0"),
    ({"images": 0}, "quantize.coco.tune.images: Input should be greater than 0"),
    ({"min_score": 1.0}, "quantize.coco.tune.min_score: Input should be less than 1"),
    ({"enabled": "yes"}, "quantize.coco.tune.enabled: Input should be a valid boolean"),
    ({"layers": 3}, "quantize.coco.tune.layers: unknown key"),
])
def test_bad_tune_params_fail_before_work(tmp_path, tmp_path_factory, capfd, change, message):
    tiny = tiny_model(tmp_path_factory)
    code, out = run(tmp_path, tiny, {**BASE, "tune": {**TUNE, **change}})
    assert code == 2
    assert message in capfd.readouterr().err
    assert not (tmp_path / "model").exists()


def test_more_tuning_images_than_the_pool_is_a_clear_error(tmp_path, tmp_path_factory, capfd):
    tiny = tiny_model(tmp_path_factory)
    code, out = run(tmp_path, tiny, {**BASE, "tune": {**TUNE, "images": 17}})
    assert code == 1
    assert "tuning needs 17 images, the calibration pool has 16" in capfd.readouterr().err
    assert not Path(f"{out}-meta.json").exists()
