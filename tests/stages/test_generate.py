"""The synthetic dataset generator: deterministic samples, real VOC/COCO files, stable archives."""
from __future__ import annotations

import json
import tarfile
import zipfile
from xml.etree import ElementTree as ET

import numpy as np
import pytest

from stages.common import run_stage
from stages.generate import ARCHIVES, main
from stages.layouts import write_coco, write_voc
from stages.shapes import make_samples

CLASSES = ["rectangle", "ellipse", "triangle", "cross"]


def test_samples_are_deterministic_and_well_formed():
    a = make_samples(6, CLASSES, 64, 3, seed=7)
    b = make_samples(6, CLASSES, 64, 3, seed=7)
    later = make_samples(3, CLASSES, 64, 3, seed=7, first_index=3)
    other_seed = make_samples(6, CLASSES, 64, 3, seed=8)
    for s, t in zip(a, b):
        assert s.name == t.name and np.array_equal(s.image, t.image)
        assert np.array_equal(s.boxes, t.boxes) and np.array_equal(s.labels, t.labels)
    # Image i depends only on (seed, i): a later range reproduces the tail of a longer one.
    assert [s.name for s in later] == ["000003", "000004", "000005"]
    assert all(np.array_equal(s.image, t.image) for s, t in zip(a[3:], later))
    assert not any(np.array_equal(s.image, t.image) for s, t in zip(a, other_seed))
    for s in a:
        assert s.image.shape == (64, 64, 3) and s.image.dtype == np.uint8
        assert s.boxes.dtype == np.float32 and s.labels.dtype == np.int64
        assert 1 <= len(s.labels) <= 3 and s.boxes.shape == (len(s.labels), 4)
        assert ((s.labels >= 0) & (s.labels < len(CLASSES))).all()
        x0, y0, x1, y1 = s.boxes.T
        assert (x0 >= 0).all() and (y0 >= 0).all() and (x1 < 64).all() and (y1 < 64).all()
        assert (x1 > x0).all() and (y1 > y0).all()


def test_boxes_are_tight_around_the_drawn_shape():
    # No noise and a single object: the shape's pixels differ from the background only inside
    # the box, and they reach all four of its edges.
    for s in make_samples(5, ["rectangle"], 64, 1, seed=1, noise=0):
        x0, y0, x1, y1 = s.boxes[0].astype(int)
        assert s.labels.tolist() == [0]
        inside = s.image[y0:y1 + 1, x0:x1 + 1].astype(int)
        colour = inside[(y1 - y0) // 2, (x1 - x0) // 2]
        is_shape = (np.abs(inside - colour).sum(axis=2) == 0)
        assert is_shape[0].any() and is_shape[-1].any()
        assert is_shape[:, 0].any() and is_shape[:, -1].any()


def test_write_voc_reads_back_through_gluoncv(tmp_path):
    from gluoncv.data import VOCDetection

    samples = make_samples(4, CLASSES, 64, 4, seed=3)
    base = write_voc(tmp_path / "VOCdevkit", 2007, {"test": samples}, CLASSES)
    assert (base / "ImageSets/Main/test.txt").read_text().split() == [s.name for s in samples]
    assert (base / "ImageSets/Main/cross_test.txt").exists()
    xml = ET.parse(base / "Annotations" / f"{samples[0].name}.xml").getroot()
    assert xml.find("size/width").text == "64" and xml.find("object/difficult").text == "0"
    xmin = int(xml.find("object/bndbox/xmin").text)
    assert xmin == int(samples[0].boxes[0, 0]) + 1  # VOC is 1-based

    class Shapes(VOCDetection):
        CLASSES = CLASSES

    dataset = Shapes(str(tmp_path / "VOCdevkit"), splits=[(2007, "test")])
    assert len(dataset) == 4
    for (image, label), s in zip(dataset, samples):
        assert image.shape == (64, 64, 3)
        assert np.abs(image.asnumpy().astype(int) - s.image).mean() < 16  # JPEG loss on noise
        np.testing.assert_array_equal(label[:, :4], s.boxes)
        np.testing.assert_array_equal(label[:, 4], s.labels)
        assert (label[:, 5] == 0).all()  # difficult


def test_write_coco_loads_in_pycocotools(tmp_path):
    from pycocotools.coco import COCO

    samples = make_samples(3, CLASSES, 48, 2, seed=5, first_index=10)
    path = write_coco(tmp_path, "val2017", samples, CLASSES)
    coco = COCO(str(path))
    assert sorted(coco.getImgIds()) == [10, 11, 12]
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == CLASSES
    image = coco.loadImgs(10)[0]
    assert image["width"] == 48 and image["coco_url"].endswith(image["file_name"])
    assert (tmp_path / "val2017" / image["file_name"]).is_file()
    anns = coco.loadAnns(coco.getAnnIds(imgIds=10))
    x0, y0, x1, y1 = samples[0].boxes[0]
    assert anns[0]["bbox"] == [x0, y0, x1 - x0 + 1, y1 - y0 + 1]
    assert anns[0]["category_id"] == samples[0].labels[0] + 1 and anns[0]["iscrowd"] == 0


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
