"""The generate stage: the five archives of the real layout, byte-identical on every run."""
from __future__ import annotations

import json
import tarfile
import zipfile

import pytest

from stages.common import run_stage
from stages.generate import ARCHIVES, main
from stages.synthetic import make_samples

PARAMS = """generate:
  classes: [rectangle, ellipse, triangle]
  image_size: 48
  num_train: 6
  num_test: 3
  max_objects: 2
  seed: 0
  jpeg_quality: 90
"""


def test_stage_writes_byte_identical_archives_in_the_real_layout(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(PARAMS)
    assert run_stage(main, ["--out", "a"]) == 0
    assert run_stage(main, ["--out", "b"]) == 0
    for name in ARCHIVES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    with zipfile.ZipFile(tmp_path / "a/val2017.zip") as zf:
        assert sorted(zf.namelist())[:2] == ["val2017/", "val2017/000000000006.jpg"]
    with zipfile.ZipFile(tmp_path / "a/annotations_trainval2017.zip") as zf:
        data = json.loads(zf.read("annotations/instances_val2017.json"))
        assert len(data["images"]) == 3
    expected = {"VOCtrainval_06-Nov-2007.tar": ("VOC2007", "trainval", 3),
                "VOCtest_06-Nov-2007.tar": ("VOC2007", "test", 3),
                "VOCtrainval_11-May-2012.tar": ("VOC2012", "trainval", 3)}
    for name, (voc, split, count) in expected.items():
        with tarfile.open(tmp_path / "a" / name) as tf:
            listing = tf.extractfile(f"VOCdevkit/{voc}/ImageSets/Main/{split}.txt").read().split()
            assert len(listing) == count
            assert f"VOCdevkit/{voc}/JPEGImages/{listing[0].decode()}.jpg" in tf.getnames()


def test_bad_params_fail_before_writing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(PARAMS.replace("max_objects: 2", "max_objects: 0")
                                          + "  object_scale: [0.6, 0.2]\n")
    assert run_stage(main, ["--out", "a"]) == 2
    assert not (tmp_path / "a").exists()
    with pytest.raises(ValueError, match="classes"):
        make_samples(1, [], 32, 1, seed=0)
