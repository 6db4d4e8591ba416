"""Dataset files: generated samples written as real VOC and COCO files, read back by the
libraries the stages use; archives packed deterministically."""
from __future__ import annotations

import tarfile
import zipfile
from xml.etree import ElementTree as ET

import numpy as np

from stages.dataset_files import ARCHIVE_MTIME, pack_tar, pack_zip, write_coco, write_voc
from stages.synthetic import make_samples

CLASSES = ["rectangle", "ellipse", "triangle", "cross"]


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


def test_archives_do_not_depend_on_file_times_or_order(tmp_path):
    import os

    for name in ("a", "b"):
        root = tmp_path / name / "tree"
        (root / "sub").mkdir(parents=True)
        files = ["sub/y.txt", "x.txt"] if name == "a" else ["x.txt", "sub/y.txt"]
        for i, rel in enumerate(files):
            (root / rel).write_text(rel)
            os.utime(root / rel, (1_000_000 * (i + 1),) * 2)
        pack_zip(root, tmp_path / name / "t.zip")
        pack_tar(root, tmp_path / name / "t.tar")
    for archive in ("t.zip", "t.tar"):
        assert (tmp_path / "a" / archive).read_bytes() == (tmp_path / "b" / archive).read_bytes()
    with tarfile.open(tmp_path / "a" / "t.tar") as tf:
        assert tf.getnames() == ["tree", "tree/sub", "tree/sub/y.txt", "tree/x.txt"]
        assert {m.mtime for m in tf.getmembers()} == {ARCHIVE_MTIME}
    with zipfile.ZipFile(tmp_path / "a" / "t.zip") as zf:
        assert zf.namelist() == ["tree/", "tree/sub/", "tree/sub/y.txt", "tree/x.txt"]
