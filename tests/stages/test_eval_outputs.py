"""Shared evaluation outputs: the speed contract, stable CSV, the eval dir with samples."""
from pathlib import Path

import numpy as np
import pytest

from stages import eval_outputs
from stages.common import StageError
from stages.inference import Detections, ImageItem
from stages.outputs import MARKER
from stages.synthetic import encode_jpeg


def test_latency_summary_keys():
    s = eval_outputs.latency_summary([0.1, 0.2, 0.3, 0.4], images=16, wall=2.0, batch_size=4,
                                  threads=2)
    assert s == {"images_per_s": 8.0, "latency_p50_ms": pytest.approx(250.0),
                 "latency_p90_ms": pytest.approx(370.0), "batch_size": 4, "threads": 2,
                 "images": 16}


def test_csv_text_fixed_or_as_rounded():
    rows = [("person", 12.3456789), ("stop sign", 0.0)]
    assert eval_outputs.csv_text(("class", "ap"), rows, float_digits=6) == \
        "class,ap\nperson,12.345679\nstop sign,0.000000\n"
    assert eval_outputs.csv_text(["class", "ap"], [["a", 1.5], ["b", ""], ["c", 2]]) == \
        "class,ap\na,1.5\nb,\nc,2\n"
    assert eval_outputs.csv_text(["class", "ap"], []) == "class,ap\n"
    # a name with the separator is quoted, not split into two columns
    assert eval_outputs.csv_text(["class", "ap"], [["a, b", 1.0]]) == 'class,ap\n"a, b",1.0\n'


def test_eval_dir_has_the_files_and_samples_above_the_threshold(tmp_path):
    items = []
    for i in range(3):
        path = tmp_path / f"{i}.jpg"
        path.write_bytes(encode_jpeg(np.full((40, 60, 3), 80, np.uint8)))
        items.append(ImageItem(f"img{i}", path))
    dets = [Detections(it.key, np.array([0, 1]), np.array([0.9, 0.1], np.float32),
                       np.array([[5, 5, 30, 20], [0, 0, 10, 10]], np.float32)) for it in items]
    out = tmp_path / "eval" / "voc_fp32"
    eval_outputs.write_eval_dir(out, {"pr.csv": "recall,precision\n"}, items, dets, ["a", "b"],
                                samples=2, draw_thresh=0.5)
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "pr.csv", "samples"]
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["img0.png", "img1.png"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp left


def test_eval_dir_is_not_replaced_when_writing_fails(tmp_path):
    out = tmp_path / "eval"
    out.mkdir()
    (out / MARKER).write_text("")  # an earlier output of a stage: it may be replaced
    (out / "old.csv").write_text("old")
    missing = ImageItem("gone", tmp_path / "gone.jpg")
    det = Detections("gone", np.zeros(0, np.int64), np.zeros(0, np.float32),
                     np.zeros((0, 4), np.float32))
    with pytest.raises(StageError, match="cannot read image"):
        eval_outputs.write_eval_dir(out, {"new.csv": "x"}, [missing], [det], ["a"], 1, 0.3)
    assert [p.name for p in tmp_path.iterdir()] == ["eval"]
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "old.csv"]


def test_a_model_of_another_precision_is_refused():
    eval_outputs.expect_precision({"precision": "int8"}, Path("m/int8"), "int8")
    with pytest.raises(StageError, match="m/fp32 is a fp32 model, not int8"):
        eval_outputs.expect_precision({"precision": "fp32"}, Path("m/fp32"), "int8")


def test_a_bf16_model_is_refused_on_a_cpu_without_bf16(monkeypatch):
    from stages import bf16
    from tests.stages.test_bf16 import CASCADE, EPYC

    monkeypatch.setattr(bf16, "read_cpuinfo", lambda: CASCADE)
    with pytest.raises(StageError, match="no BF16 instructions"):
        eval_outputs.expect_precision({"precision": "bf16"}, Path("m/bf16"), "bf16")
    eval_outputs.expect_precision({"precision": "int8"}, Path("m/int8"), "int8")  # unaffected
    monkeypatch.setattr(bf16, "read_cpuinfo", lambda: EPYC)
    eval_outputs.expect_precision({"precision": "bf16"}, Path("m/bf16"), "bf16")


def test_int8_sensitivity_table_with_and_without_tuning():
    tuning = {"kept_fp32": ["conv3"], "sensitivity": [
        {"layer": "conv3", "agreement_alone": 81.9, "sensitivity": 18.1},
        {"layer": "conv1", "agreement_alone": 99.5, "sensitivity": 0.5}]}
    tables = eval_outputs.precision_tables({"precision": "int8", "tuning": tuning})
    assert tables["sensitivity.csv"].splitlines() == [
        "layer,agreement_alone,sensitivity,kept_fp32",
        "conv3,81.9000,18.1000,1", "conv1,99.5000,0.5000,0"]
    untuned = eval_outputs.precision_tables({"precision": "int8"})
    assert untuned == {"sensitivity.csv": "layer,agreement_alone,sensitivity,kept_fp32\n"}
    assert eval_outputs.precision_tables({"precision": "bf16"}) == {}
