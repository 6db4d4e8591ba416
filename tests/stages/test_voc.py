"""VOC helpers: loading generated VOC files through GluonCV and VOC07 mAP scoring."""
from __future__ import annotations

import numpy as np
import pytest

from stages.common import StageError
from stages.dataset_files import write_voc
from stages.synthetic import make_samples
from stages.voc import (detections_from_records, detections_records, image_ids, image_paths,
                        labels, load_voc, score_voc07)

CLASSES = ["rectangle", "ellipse", "triangle", "cross"]


@pytest.fixture(scope="module")
def voc_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("voc") / "VOCdevkit"
    samples = make_samples(12, CLASSES, 96, 4, seed=2)
    write_voc(root, 2007, {"test": samples}, CLASSES)
    return root, samples


def as_detections(gt: list[np.ndarray]) -> list[tuple]:
    """Ground truth fed back as detections with score 1."""
    return [(g[:, :4], g[:, 4].astype(int), np.ones(len(g))) for g in gt]


def test_load_voc_reads_labels_in_gluoncv_frame(voc_set):
    root, samples = voc_set
    ds = load_voc(str(root), [(2007, "test")], CLASSES)
    assert image_ids(ds) == [s.name for s in samples]
    assert all(p.endswith(f"{s.name}.jpg") for p, s in zip(image_paths(ds), samples))
    for lab, s in zip(labels(ds), samples):
        assert lab.shape == (len(s.labels), 6)
        # generator: 0-based inclusive pixels, written 1-based; GluonCV subtracts 1 again
        np.testing.assert_array_equal(lab[:, :4], s.boxes)
        np.testing.assert_array_equal(lab[:, 4], s.labels)
        assert (lab[:, 5] == 0).all()


def test_ground_truth_as_detections_scores_100(voc_set):
    root, _ = voc_set
    gt = labels(load_voc(str(root), [(2007, "test")], CLASSES))
    result = score_voc07(as_detections(gt), gt, CLASSES)
    assert result["map"] == pytest.approx(100.0)
    assert all(ap == pytest.approx(100.0) for ap in result["per_class"].values())
    recall, precision = result["pr"]
    assert recall[0] == 0 and recall[-1] == 1 and np.allclose(precision, 1.0)

    # through the detections.json format and back (catches box-format mistakes)
    ids = [f"{i:06d}" for i in range(len(gt))]
    records = detections_records(ids, as_detections(gt))
    assert set(records[0]) == {"image_id", "category_id", "bbox", "score"}
    assert min(r["category_id"] for r in records) >= 1
    again = detections_from_records(records, ids)
    assert score_voc07(again, gt, CLASSES)["map"] == pytest.approx(100.0)


def test_misses_false_positives_and_difficult_objects(voc_set):
    root, _ = voc_set
    gt = labels(load_voc(str(root), [(2007, "test")], CLASSES))
    dets = as_detections(gt)
    # drop one object: its class loses recall
    boxes, ids, scores = dets[0]
    missed_class = CLASSES[ids[0]]
    dets[0] = (boxes[1:], ids[1:], scores[1:])
    result = score_voc07(dets, gt, CLASSES)
    assert result["map"] < 100.0 and result["per_class"][missed_class] < 100.0
    # the same object marked difficult: neither needed nor counted when detected anyway
    hard = [g.copy() for g in gt]
    hard[0][0, 5] = 1
    assert score_voc07(dets, hard, CLASSES)["map"] == pytest.approx(100.0)
    assert score_voc07(as_detections(gt), hard, CLASSES)["map"] == pytest.approx(100.0)
    # a confident false positive ranks first and costs precision
    fp = as_detections(gt)
    b, i, s = fp[1]
    fp[1] = (np.vstack([b, [[0, 0, 3, 3]]]), np.append(i, i[0]), np.append(s, 2.0))
    assert score_voc07(fp, gt, CLASSES)["map"] < 100.0


def test_class_without_ground_truth_is_undefined_not_zero(voc_set):
    root, _ = voc_set
    gt = labels(load_voc(str(root), [(2007, "test")], CLASSES))
    result = score_voc07(as_detections(gt), gt, [*CLASSES, "unseen"])
    assert result["per_class"]["unseen"] is None and result["map"] == pytest.approx(100.0)


def test_missing_split_is_a_stage_error(voc_set):
    root, _ = voc_set
    with pytest.raises(StageError, match="cannot read VOC split"):
        load_voc(str(root), [(2012, "trainval")], CLASSES)


def test_items_are_the_images_keyed_by_id_and_boxes_are_clipped_to_each(voc_set):
    from stages.inference import Detections
    from stages.voc import clip_to_images, image_items

    root, samples = voc_set
    ds = load_voc(str(root), [(2007, "test")], CLASSES)
    items = image_items(ds, 3)
    assert [it.key for it in items] == [s.name for s in samples[:3]]
    assert all(it.path.is_file() for it in items)
    det = Detections("a", np.array([0, 1]), np.array([0.5, 0.4], np.float32),
                     np.array([[-3, 2, 70, 50], [1, 1, 5, 5]], np.float32))
    (out,) = clip_to_images([det], [(64.0, 48.0)])
    assert out.boxes.tolist() == [[0, 2, 64, 48], [1, 1, 5, 5]] and out.key == "a"
    assert out.ids.tolist() == [0, 1]


def test_eval_dir_rows_are_rounded_and_undefined_ap_is_empty():
    from stages.voc import per_class_rows, pr_rows

    assert per_class_rows({"a": 12.345678, "b": None}) == [["a", 12.3457], ["b", ""]]
    assert pr_rows(np.array([0.0, 0.123456]), np.array([1.0, 0.1234567891])) == \
        [[0.0, 1.0], [0.1235, 0.123457]]
