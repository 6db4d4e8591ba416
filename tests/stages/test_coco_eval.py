"""COCO scoring: ground truth fed back scores 100, mistakes score less, class names checked."""
import numpy as np
import pytest

from stages import coco_eval as ev
from stages.common import StageError
from stages.inference import to_detections
from tests.stages.coco_helpers import COCO_IDS, coco_classes, write_coco_set


def ground_truth_as_network_output(coco, data_shape=300, rescale=True):
    """Each image's annotations as the detector would emit them: class index (position of the
    category among sorted ids), score 1, xyxy (x2 = x + w - 1) in network-input pixels."""
    cat_ids = sorted(coco.getCatIds())
    dets = []
    for image_id in sorted(coco.getImgIds()):
        info = coco.imgs[image_id]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
        scale = np.array([info["width"], info["height"]] * 2, np.float64) / data_shape
        boxes = np.array([[x, y, x + w - 1, y + h - 1] for x, y, w, h in
                          (a["bbox"] for a in anns)], np.float64).reshape(-1, 4) / scale
        ids = np.array([cat_ids.index(a["category_id"]) for a in anns], np.float32)
        size = (info["height"], info["width"]) if rescale else (data_shape, data_shape)
        dets.append(to_detections(image_id, ids, np.ones(len(anns), np.float32),
                                  boxes.astype(np.float32), size, data_shape))
    return dets


def test_ground_truth_fed_back_scores_100(tmp_path):
    _, annotations = write_coco_set(tmp_path / "coco")
    coco = ev.load_coco(annotations)
    category_ids = ev.category_ids_for(coco_classes(), coco)
    assert category_ids == COCO_IDS

    results = ev.to_coco_results(ground_truth_as_network_output(coco), category_ids, 0.05, True)
    scores = ev.score_detections(coco, results, sorted(coco.getImgIds()))
    metrics = ev.metrics_from(scores, len(coco.getImgIds()))

    assert len(results) == len(coco.getAnnIds())
    assert metrics["map"] == metrics["map50"] == metrics["map75"] == 100.0
    assert metrics["ar100"] == 100.0
    assert {ap for _, ap in ev.per_class_ap(scores.precision, coco_classes())} == {100.0}
    assert ev.pr_curve(scores.precision)[-1] == (1.0, 1.0)


def test_shifted_or_misfiled_detections_score_less(tmp_path):
    _, annotations = write_coco_set(tmp_path / "coco")
    coco = ev.load_coco(annotations)
    dets = ground_truth_as_network_output(coco)
    ids = sorted(coco.getImgIds())
    wrong_ids = list(reversed(COCO_IDS))  # a category-id bug
    not_rescaled = ground_truth_as_network_output(coco, rescale=False)  # a rescaling bug
    for results in (ev.to_coco_results(dets, wrong_ids, 0.05, True),
                    ev.to_coco_results(not_rescaled, COCO_IDS, 0.05, True)):
        assert ev.metrics_from(ev.score_detections(coco, results, ids), len(ids))["map"] < 100


def test_no_detections_scores_zero(tmp_path):
    _, annotations = write_coco_set(tmp_path / "coco")
    coco = ev.load_coco(annotations)
    metrics = ev.metrics_from(ev.score_detections(coco, [], sorted(coco.getImgIds())), 6)
    assert metrics["map"] == 0.0 and metrics["images"] == 6


def test_class_names_must_match_the_categories(tmp_path):
    _, annotations = write_coco_set(tmp_path / "coco")
    coco = ev.load_coco(annotations)
    classes = coco_classes()
    classes[3] = "motorbike"
    with pytest.raises(StageError, match="#3: model 'motorbike' vs annotations 'motorcycle'"):
        ev.category_ids_for(classes, coco)
    with pytest.raises(StageError, match="model's 20 classes do not match"):
        ev.category_ids_for(classes[:20], coco)


def test_boxes_become_coco_xywh_with_gluoncv_plus_one():
    det = to_detections(7, np.array([1, 0], np.float32), np.array([0.5, 0.01], np.float32),
                        np.array([[10, 20, 29, 59], [0, 0, 5, 5]], np.float32), (300, 300), 300)
    assert ev.to_coco_results([det], [5, 9], 0.05, True) == [
        {"image_id": 7, "category_id": 9, "bbox": [10.0, 20.0, 20.0, 40.0], "score": 0.5}]
    assert ev.to_coco_results([det], [5, 9], 0.0, False)[0]["bbox"] == [10.0, 20.0, 19.0, 39.0]


def test_missing_or_malformed_annotations_are_clear_errors(tmp_path):
    with pytest.raises(StageError, match="annotation file not found"):
        ev.load_coco(tmp_path / "absent.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [{"id": 1}], "annotations": [{"image_id": 1}]}')
    with pytest.raises(StageError, match="not a COCO instances file"):
        ev.load_coco(bad)


def test_image_items_in_id_order_and_missing_files_refused(tmp_path):
    images, annotations = write_coco_set(tmp_path / "coco")
    coco = ev.load_coco(annotations)
    items = ev.image_items(coco, images, 0)
    assert [it.key for it in items] == sorted(coco.getImgIds())
    assert [it.key for it in ev.image_items(coco, images, 2)] == sorted(coco.getImgIds())[:2]
    items[0].path.unlink()
    with pytest.raises(StageError, match="1 image file\\(s\\) of the annotations missing"):
        ev.image_items(coco, images, 0)


def test_a_detection_past_the_image_border_is_scored_clipped(tmp_path):
    """GluonCV's stock head decodes without clipping; its evaluation clips to the network input
    before rescaling. Unclipped, this box (IoU 0.76 with the object at the border) would miss
    the IoU thresholds above 0.75 and score AP 60 instead of 100."""
    import json

    annotations = tmp_path / "instances.json"
    annotations.write_text(json.dumps({
        "images": [{"id": 1, "width": 600, "height": 400, "file_name": "1.jpg"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 300, 200],
                         "area": 60000, "iscrowd": 0}],
        "categories": [{"id": 1, "name": "thing"}]}))
    coco = ev.load_coco(annotations)
    # network frame (300 x 300): reaches 30 px left of and 15 px above the input
    raw = np.array([[-30, -15, 149.5, 149.25]], np.float32)
    det = to_detections(1, np.zeros(1, np.float32), np.ones(1, np.float32), raw, (400, 600), 300)
    results = ev.to_coco_results([det], [1], 0.05, True)
    assert results[0]["bbox"] == [0.0, 0.0, 300.0, 200.0]
    assert ev.metrics_from(ev.score_detections(coco, results, [1]), 1)["map"] == 100.0
    # the same box unclipped (raw x 2 and x 4/3, +1 width) passes only the thresholds <= 0.75
    unclipped = [dict(results[0], bbox=[-60.0, -20.0, 360.0, 220.0])]
    assert ev.metrics_from(ev.score_detections(coco, unclipped, [1]), 1)["map"] == 60.0


def test_results_are_gluoncvs_to_the_last_bit(tmp_path):
    """The COCO results the stage scores are the ones GluonCV's own COCODetectionMetric makes
    from the same network output (eval_ssd.py: boxes clipped to the input, rescaled in float64,
    w = x2 - (x1 - 1)): same boxes and scores, unrounded, so the same stats to the last digit."""
    from types import SimpleNamespace

    from gluoncv.utils.metrics.coco_detection import COCODetectionMetric
    from pycocotools.coco import COCO

    sizes = {3: (427, 640), 8: (500, 375), 11: (333, 500)}  # (height, width)
    gt = COCO()
    gt.dataset = {"images": [{"id": k, "height": h, "width": w} for k, (h, w) in sizes.items()],
                  "annotations": [], "categories": [{"id": c} for c in COCO_IDS[:5]]}
    gt.createIndex()
    rng = np.random.default_rng(0)
    n, shape = 40, 300
    ids = rng.integers(-1, 6, (len(sizes), n, 1)).astype(np.float32)  # 5 = no such class
    scores = rng.random((len(sizes), n, 1), dtype=np.float32)
    corners = rng.uniform(-30, 330, (len(sizes), n, 2, 2)).astype(np.float32)
    boxes = np.concatenate([corners.min(axis=2), corners.max(axis=2)], axis=-1)

    metric = COCODetectionMetric(SimpleNamespace(coco=gt, contiguous_id_to_json=dict(enumerate(COCO_IDS[:5]))),
                                 str(tmp_path / "gluoncv"), use_time=False, cleanup=True,
                                 score_thresh=0.05, data_shape=(shape, shape))
    metric.update(np.clip(boxes, 0, shape), ids, scores)  # eval_ssd.py: bboxes.clip(0, 300)
    dets = [to_detections(k, ids[i], scores[i], boxes[i], sizes[k], shape)
            for i, k in enumerate(sorted(sizes))]
    ours = ev.to_coco_results(dets, COCO_IDS[:5], 0.05, True)
    assert len(ours) > 50 and ours == metric._results  # pylint: disable=protected-access
