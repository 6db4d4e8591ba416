"""Quantization pieces: calibration image choice, the quantized-layer report, the log capture."""
import json
import logging
import os
import warnings
from pathlib import Path

import pytest

from stages import quantization
from stages.common import StageError


def test_calibration_images_are_drawn_reproducibly():
    paths = [Path(f"{i:04d}.jpg") for i in range(100)]
    first = quantization.pick_calibration(paths, 8, seed=0)
    assert first == quantization.pick_calibration(list(reversed(paths)), 8, seed=0)
    assert first != quantization.pick_calibration(paths, 8, seed=1)
    assert len(set(first)) == 8


def test_quantized_layers_read_from_symbol():
    nodes = {"nodes": [
        {"op": "null", "name": "data"},
        {"op": "_sg_mkldnn_conv", "name": "q0", "attrs": {"quantized": "true"},
         "subgraphs": [{"nodes": [{"op": "Convolution", "name": "conv0_fwd"}]}]},
        {"op": "_sg_mkldnn_conv", "name": "f1", "attrs": {}},
        {"op": "_contrib_quantized_pooling", "name": "pool0"},
    ]}
    assert quantization.quantized_layers(json.dumps(nodes)) == [
        {"name": "q0", "op": "quantized_conv", "layers": ["conv0_fwd"]},
        {"name": "pool0", "op": "quantized_pooling"}]


def test_list_images_reads_an_image_list_or_globs(tmp_path):
    for name in ("b", "a", "c"):
        (tmp_path / f"{name}.jpg").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("")
    assert [p.name for p in quantization.list_images(tmp_path, None)] == ["a.jpg", "b.jpg",
                                                                          "c.jpg"]
    listing = tmp_path / "trainval.txt"
    listing.write_text("c\n\na 1\n")
    assert [p.name for p in quantization.list_images(tmp_path, listing)] == ["c.jpg", "a.jpg"]


def test_list_images_refuses_missing_images_and_lists(tmp_path):
    with pytest.raises(StageError, match="no \\*.jpg images in"):
        quantization.list_images(tmp_path, None)
    listing = tmp_path / "trainval.txt"
    listing.write_text("absent\n")
    with pytest.raises(StageError, match="1 listed image\\(s\\) missing"):
        quantization.list_images(tmp_path, listing)
    with pytest.raises(StageError, match="cannot read image list"):
        quantization.list_images(tmp_path, tmp_path / "nowhere.txt")
    with pytest.raises(StageError, match="calibration needs 3 images, only 2 available"):
        quantization.pick_calibration([Path("a.jpg"), Path("b.jpg")], 3, seed=0)


def test_stderr_and_the_calibration_logger_go_to_the_file(tmp_path, capfd):
    log_file = tmp_path / "calib.log"
    with quantization.stderr_to(log_file) as calib_log:
        os.write(2, b"from C++\n")
        calib_log.info("layer conv0 is quantized")
    os.write(2, b"back on the console\n")
    text = log_file.read_text()
    assert "from C++" in text and "layer conv0 is quantized" in text
    err = capfd.readouterr().err
    assert "back on the console" in err and "from C++" not in err
    assert not logging.getLogger(calib_log.name).handlers  # the handler is removed again


def test_the_calibration_log_has_no_clock_times_or_paths(tmp_path):
    """The log is a DVC output recorded in dvc.lock: the same run writes the same bytes."""
    log_file = tmp_path / "calib.log"
    with quantization.stderr_to(log_file) as calib_log:
        os.write(2, b"[15:11:45] ../src/operator/x.cc:302: conv0 is quantized.\n")
        calib_log.info("Quantizing graph")
        warnings.warn("Cannot decide type", UserWarning)
    assert log_file.read_text() == ("../src/operator/x.cc:302: conv0 is quantized.\n"
                                    "INFO Quantizing graph\n"
                                    "WARNING UserWarning: Cannot decide type\n")
