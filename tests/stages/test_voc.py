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


def test_items_are_the_images_keyed_by_id(voc_set):
    from stages.voc import image_items

    root, samples = voc_set
    ds = load_voc(str(root), [(2007, "test")], CLASSES)
    items = image_items(ds, 3)
    assert [it.key for it in items] == [s.name for s in samples[:3]]
    assert all(it.path.is_file() for it in items)


# Hand-computed frames. Per image: an object matched exactly (score 0.9) and one whose detection
# is too tall by a margin that falls on either side of IoU 0.5 depending on the frame, because
# VOC07 adds 1 pixel to x2 and y2 before the IoU (on a 1-pixel-wide scale in either frame).
# Both objects of class 0; 11-point AP: one hit of two at precision 1, then a false positive:
# recall points 0..0.5 have precision 1, 0.6..1 none, AP = 6/11; both hits: AP = 1.
FRAME_CASES = {
    # 1200 x 1200 image shrunk to 300 (x 1/4). Object [0,0,99,99], detection [0,0,99,201]:
    # original frame IoU 100*100 / (100*202) = 0.495 (miss); network frame 0.25-scaled boxes
    # [0,0,24.75,24.75] vs [0,0,24.75,50.25], IoU 25.75 / 51.25 = 0.5024 (hit).
    "shrunk": dict(size=(1200, 1200), truth=[[500, 500, 599, 599], [0, 0, 99, 99]],
                   raw=[[125, 125, 149.75, 149.75], [0, 0, 24.75, 50.25]],
                   expect={"network": 100.0, "original": 600 / 11}),
    # 200 wide x 100 high image enlarged to 300 (x 1.5, x 3). Object [0,0,49,29], detection
    # [0,0,49,58.7]: original IoU 30 / 59.7 = 0.5025 (hit); network frame object [0,0,73.5,87]
    # vs detection [0,0,73.5,176.1], IoU 88 / 177.1 = 0.4969 (miss).
    "enlarged": dict(size=(100, 200), truth=[[100, 10, 149, 49], [0, 0, 49, 29]],
                     raw=[[150, 30, 223.5, 147], [0, 0, 73.5, 176.1]],
                     expect={"network": 600 / 11, "original": 100.0}),
}


@pytest.mark.parametrize("case", sorted(FRAME_CASES))
@pytest.mark.parametrize("frame", ["network", "original"])
def test_the_two_frames_score_the_hand_computed_values(case, frame):
    from stages.inference import to_detections
    from stages.voc import in_frame

    c = FRAME_CASES[case]
    det = to_detections("img", np.zeros(2, np.float32), np.array([0.9, 0.8], np.float32),
                        np.array(c["raw"], np.float32), c["size"], 300)
    truth = np.array([[*box, 0, 0] for box in c["truth"]], np.float32)
    boxes, gt = in_frame([det], [truth], frame, 300)
    result = score_voc07(boxes, gt, CLASSES)
    assert result["map"] == pytest.approx(c["expect"][frame], abs=1e-9)
    assert result["per_class"]["rectangle"] == pytest.approx(c["expect"][frame], abs=1e-9)


def test_network_frame_resizes_the_ground_truth_like_gluoncvs_val_transform():
    """The labels GluonCV's SSDDefaultValTransform gives (what eval_ssd.py scores against)."""
    import mxnet as mx
    from gluoncv.data.transforms.presets.ssd import SSDDefaultValTransform

    from stages.inference import to_detections
    from stages.voc import in_frame

    truth = np.array([[3, 7, 211, 97, 1, 0], [0, 0, 222, 130, 0, 1]], np.float32)
    image = mx.nd.zeros((131, 223, 3), dtype="uint8")
    _, want = SSDDefaultValTransform(300, 300)(image, truth.astype(np.float64))
    det = to_detections("img", np.zeros(0), np.zeros(0), np.zeros((0, 4)), (131, 223), 300)
    _, (got,) = in_frame([det], [truth], "network", 300)
    assert got.dtype == np.float32 and got.shape == (2, 6)
    np.testing.assert_array_equal(got, want)


def test_in_frame_refuses_mismatched_inputs():
    from stages.inference import Detections, to_detections
    from stages.voc import in_frame

    det = to_detections("img", np.zeros(0), np.zeros(0), np.zeros((0, 4)), (10, 10), 300)
    with pytest.raises(ValueError, match="1 detection sets for 2 images"):
        in_frame([det], [np.zeros((0, 6))] * 2, "network", 300)
    with pytest.raises(ValueError, match="unknown frame 'image'; allowed: network, original"):
        in_frame([det], [np.zeros((0, 6))], "image", 300)
    bare = Detections("a", np.zeros(0), np.zeros(0), np.zeros((0, 4)))
    with pytest.raises(ValueError, match="'a' carry no network-frame boxes"):
        in_frame([bare], [np.zeros((0, 6))], "network", 300)


def test_eval_dir_rows_are_rounded_and_undefined_ap_is_empty():
    from stages.voc import per_class_rows, pr_rows

    assert per_class_rows({"a": 12.345678, "b": None}) == [["a", 12.3457], ["b", ""]]
    assert pr_rows(np.array([0.0, 0.123456]), np.array([1.0, 0.1234567891])) == \
        [[0.0, 1.0], [0.1235, 0.123457]]
