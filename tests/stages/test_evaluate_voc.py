"""The VOC evaluate stage on a tiny generated set: a demo SSD in the trained-model format,
converted and quantized by the project's own stages, evaluated in FP32 and INT8."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from stages.common import run_stage
from stages.evaluate_voc import main

CLASSES = ["rectangle", "ellipse", "triangle"]
SIZE = 128  # the demo SSD's base size
SPEED_KEYS = ["batch_size", "images", "images_per_s", "latency_p50_ms", "latency_p90_ms",
              "threads"]


def params(**evaluate) -> dict:
    return {
        "convert": {"voc": {"weights": "trained", "head": "gluoncv"}},
        "quantize": {"voc": {"calib_mode": "naive", "calib_images": 8, "batch_size": 4,
                             "exclude_layers": ["flatten", "concat"], "seed": 1}},
        "evaluate": {"voc": {"split": [2007, "test"], "batch_size": 4, "threads": 2,
                             "samples": 2, "draw_thresh": 0.05, "max_images": 0, **evaluate}},
    }


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(workdir with params.yaml, devkit, fp32 prefix, int8 prefix) built by the real stages."""
    import mxnet as mx

    from stages.common import write_json
    from stages.convert import main as convert_main
    from stages.dataset_files import write_voc
    from stages.synthetic import make_samples
    from stages.models import build_network, init_like_trained
    from stages.quantize import main as quantize_main

    root = tmp_path_factory.mktemp("evalvoc")
    devkit = root / "VOCdevkit"
    write_voc(devkit, 2007, {"trainval": make_samples(8, CLASSES, SIZE, 3, seed=4),
                             "test": make_samples(6, CLASSES, SIZE, 3, seed=4, first_index=8)},
              CLASSES)
    trained = root / "trained"
    trained.mkdir()
    net = build_network("demo_ssd", classes=CLASSES)
    init_like_trained(net, seed=3, background=4.0, data_shape=SIZE)
    net(mx.nd.zeros((1, 3, SIZE, SIZE)))
    net.save_parameters(str(trained / "net.params"))
    write_json(trained / "net.json", {"network": "demo_ssd", "classes": CLASSES,
                                      "data_shape": SIZE})
    (root / "params.yaml").write_text(yaml.safe_dump(params()))
    voc07 = devkit / "VOC2007"
    cwd = Path.cwd()
    try:
        import os
        os.chdir(root)
        assert run_stage(convert_main, ["voc", "--out", "model/fp32", "--trained", "trained"]) == 0
        assert run_stage(quantize_main, [
            "voc", "--fp32", "model/fp32", "--out", "model/int8", "--images",
            str(voc07 / "JPEGImages"), "--image-list", str(voc07 / "ImageSets/Main/trainval.txt"),
            "--log", "model/int8-calibration.log"]) == 0
    finally:
        os.chdir(cwd)
    return root, devkit


def run_eval(root: Path, devkit: Path, precision: str, tag: str = "") -> int:
    return run_stage(main, ["voc", precision, "--model", f"model/{precision}", "--data",
                            str(devkit), "--metrics", f"metrics{tag}/voc_{precision}.json",
                            "--speed", f"metrics{tag}/speed_voc_{precision}.json",
                            "--eval-dir", f"eval{tag}/voc_{precision}"])


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_evaluate_writes_the_contract_files(models, monkeypatch, precision):
    root, devkit = models
    monkeypatch.chdir(root)
    assert run_eval(root, devkit, precision) == 0

    metrics = json.loads((root / f"metrics/voc_{precision}.json").read_text())
    assert sorted(metrics) == ["images", "map"]
    assert metrics["images"] == 6 and 0.0 <= metrics["map"] <= 100.0
    speed = json.loads((root / f"metrics/speed_voc_{precision}.json").read_text())
    assert sorted(speed) == SPEED_KEYS and speed["images"] == 6 and speed["batch_size"] == 4

    out = root / f"eval/voc_{precision}"
    with (out / "per_class.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["class"] for r in rows] == CLASSES and all(r.keys() == {"class", "ap"} for r in rows)
    with (out / "pr.csv").open() as fh:
        pr = list(csv.DictReader(fh))
    assert len(pr) == 101 and float(pr[0]["recall"]) == 0 and float(pr[-1]["recall"]) == 1
    detections = json.loads((out / "detections.json").read_text())
    assert detections, "the like-trained weights give some detections"
    ids = {f"{i:06d}" for i in range(8, 14)}
    for d in detections:
        assert set(d) == {"image_id", "category_id", "bbox", "score"}
        assert d["image_id"] in ids and 1 <= d["category_id"] <= len(CLASSES)
        x, y, w, h = d["bbox"]
        assert 0 <= x and 0 <= y and w >= 0 and h >= 0 and x + w <= SIZE and y + h <= SIZE
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["000008.png", "000009.png"]
    assert json.loads((out / "provenance.json").read_text())["model"]["meta"]["precision"] == \
        precision

    # a rerun reproduces the accuracy files byte for byte
    assert run_eval(root, devkit, precision, tag="_again") == 0
    for rel in (f"voc_{precision}.json",):
        assert (root / "metrics" / rel).read_bytes() == (root / "metrics_again" / rel).read_bytes()
    for rel in ("per_class.csv", "pr.csv", "detections.json"):
        assert (out / rel).read_bytes() == (root / f"eval_again/voc_{precision}" / rel).read_bytes()


def test_precision_mismatch_and_bad_params_fail_before_writing(models, monkeypatch, tmp_path,
                                                               capsys):
    root, devkit = models
    monkeypatch.chdir(root)
    args = ["voc", "int8", "--model", "model/fp32", "--data", str(devkit), "--metrics",
            str(tmp_path / "m.json"), "--speed", str(tmp_path / "s.json"), "--eval-dir",
            str(tmp_path / "eval")]
    assert run_stage(main, args) == 1
    assert "model/fp32 is a fp32 model, not int8" in capsys.readouterr().err

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params(split=[2007, "tset"],
                                                                batch_size=0)))
    monkeypatch.chdir(tmp_path)
    assert run_stage(main, args) == 2
    err = capsys.readouterr().err
    assert "evaluate.voc.split.1" in err and "evaluate.voc.batch_size" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_an_eval_dir_with_foreign_content_is_refused_before_work(models, monkeypatch, tmp_path,
                                                                  capsys):
    root, devkit = models
    monkeypatch.chdir(root)
    foreign = tmp_path / "results"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("mine")
    args = ["voc", "fp32", "--model", "model/fp32", "--data", str(devkit), "--metrics",
            str(tmp_path / "m.json"), "--speed", str(tmp_path / "s.json"), "--eval-dir",
            str(foreign)]
    assert run_stage(main, args) == 2
    assert "--eval-dir" in capsys.readouterr().err
    assert [p.name for p in foreign.iterdir()] == ["thesis.tex"]
    assert not (tmp_path / "m.json").exists()
