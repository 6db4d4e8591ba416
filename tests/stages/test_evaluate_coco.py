import csv
import json
from pathlib import Path

import numpy as np
import pytest

from stages import evaluate_coco as ev
from stages.inference import to_detections
from tests.stages.coco_helpers import (COCO_IDS, coco_classes, run_in, shared_workspace,
                                       write_coco_set, write_params)

EVAL = {"batch_size": 4, "threads": 2, "samples": 2, "max_images": 0, "score_thresh": 0.01,
        "xywh_plus_one": True, "draw_thresh": 0.03}
METRIC_KEYS = {"map", "map50", "map75", "map_small", "map_medium", "map_large", "ar1", "ar10",
               "ar100", "ar_small", "ar_medium", "ar_large", "images"}


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
    with pytest.raises(ev.StageError, match="#3: model 'motorbike' vs annotations 'motorcycle'"):
        ev.category_ids_for(classes, coco)
    with pytest.raises(ev.StageError, match="model's 20 classes do not match"):
        ev.category_ids_for(classes[:20], coco)


def run_evaluate(folder: Path, ws, precision="fp32", **change) -> tuple[int, dict]:
    write_params(folder, evaluate={"coco": {**EVAL, **change}})
    paths = {"metrics": folder / "metrics" / f"coco_{precision}.json",
             "speed": folder / "metrics" / f"speed_coco_{precision}.json",
             "eval": folder / "eval" / f"coco_{precision}"}
    code = run_in(folder, ev.main, [
        "coco", precision, "--model", ws.fp32, "--images", ws.images,
        "--annotations", ws.annotations, "--metrics", paths["metrics"], "--speed",
        paths["speed"], "--eval-dir", paths["eval"]])
    return code, paths


def test_stage_writes_metrics_speed_and_eval_dir_reproducibly(tmp_path, tmp_path_factory):
    ws = shared_workspace(tmp_path_factory)
    code, paths = run_evaluate(tmp_path, ws)
    assert code == 0

    first = paths["metrics"].read_bytes()
    metrics = json.loads(first)
    assert set(metrics) == METRIC_KEYS and metrics["images"] == 6
    speed = json.loads(paths["speed"].read_text())
    assert set(speed) == {"images_per_s", "latency_p50_ms", "latency_p90_ms", "batch_size",
                          "threads", "images"}
    assert speed["images_per_s"] > 0 and (speed["batch_size"], speed["threads"]) == (4, 2)

    eval_dir = paths["eval"]
    dets = json.loads((eval_dir / "detections.json").read_text())
    assert dets and set(dets[0]) == {"image_id", "category_id", "bbox", "score"}
    assert {d["category_id"] for d in dets} <= set(COCO_IDS)
    assert min(d["score"] for d in dets) >= EVAL["score_thresh"]
    with open(eval_dir / "pr.csv") as fh:
        pr = list(csv.DictReader(fh))
    assert len(pr) == 101 and set(pr[0]) == {"recall", "precision"}
    with open(eval_dir / "per_class.csv") as fh:
        per_class = list(csv.DictReader(fh))
    assert [r["class"] for r in per_class] == ["person", "stop sign", "wine glass",
                                               "toothbrush"]
    assert len(list((eval_dir / "samples").glob("*.png"))) == 2
    provenance = json.loads((eval_dir / "provenance.json").read_text())
    assert provenance["model"]["head"] == "seed" and "mxnet" in provenance["libraries"]

    # rerun (another batch size, so other batch shapes): byte-identical accuracy metrics
    code, _ = run_evaluate(tmp_path, ws, batch_size=3)
    assert code == 0
    assert paths["metrics"].read_bytes() == first


def test_wrong_precision_and_bad_params_fail_before_work(tmp_path, tmp_path_factory, capfd):
    ws = shared_workspace(tmp_path_factory)
    code, paths = run_evaluate(tmp_path, ws, precision="int8")
    assert code == 1 and "is a fp32 model, not int8" in capfd.readouterr().err
    code, paths = run_evaluate(tmp_path, ws, batch_size=0)
    assert code == 2 and "evaluate.coco.batch_size" in capfd.readouterr().err
    assert not (tmp_path / "metrics").exists() and not (tmp_path / "eval").exists()


def test_boxes_become_coco_xywh_with_gluoncv_plus_one():
    det = to_detections(7, np.array([1, 0], np.float32), np.array([0.5, 0.01], np.float32),
                        np.array([[10, 20, 29, 59], [0, 0, 5, 5]], np.float32), (300, 300), 300)
    assert ev.to_coco_results([det], [5, 9], 0.05, True) == [
        {"image_id": 7, "category_id": 9, "bbox": [10.0, 20.0, 20.0, 40.0], "score": 0.5}]
    assert ev.to_coco_results([det], [5, 9], 0.0, False)[0]["bbox"] == [10.0, 20.0, 19.0, 39.0]
