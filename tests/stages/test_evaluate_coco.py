"""The evaluate_coco stage: metrics, speed and eval dir, reproducible; refusals first."""
import csv
import json
from pathlib import Path

import numpy as np

from stages import evaluate_coco as ev
from stages.common import file_digest
from tests.stages.coco_helpers import COCO_IDS, run_in, shared_workspace, write_params

EVAL = {"batch_size": 4, "threads": 2, "samples": 2, "max_images": 0, "score_thresh": 0.01,
        "xywh_plus_one": True, "draw_thresh": 0.03}
METRIC_KEYS = {"map", "map50", "map75", "map_small", "map_medium", "map_large", "ar1", "ar10",
               "ar100", "ar_small", "ar_medium", "ar_large", "images"}


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
    phases = {"setup_s", "detect_s", "score_s", "write_s", "total_s"}
    assert set(speed) == {"images_per_s", "latency_p50_ms", "latency_p90_ms", "batch_size",
                          "threads", "images"} | phases
    assert speed["images_per_s"] > 0 and (speed["batch_size"], speed["threads"]) == (4, 2)
    assert all(speed[k] >= 0 for k in phases)
    assert speed["total_s"] >= speed["setup_s"] + speed["detect_s"] + speed["score_s"]

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
    assert provenance["scorer"]["name"] == "pycocotools" == provenance["params"]["scorer"]
    # hashed by an idle-priority thread during setup: the files' own digests
    assert provenance["model"]["params_md5"] == file_digest(f"{ws.fp32}-0000.params")
    assert provenance["annotations_md5"] == file_digest(ws.annotations)
    tables = [(eval_dir / f).read_bytes() for f in ("per_class.csv", "pr.csv", "detections.json")]

    # rerun with the faster scorer: byte-identical accuracy metrics, tables and detections, and
    # the provenance says which scorer ran
    code, _ = run_evaluate(tmp_path, ws, scorer="faster-coco-eval")
    assert code == 0
    assert paths["metrics"].read_bytes() == first
    assert [(eval_dir / f).read_bytes() for f in ("per_class.csv", "pr.csv",
                                                  "detections.json")] == tables
    provenance = json.loads((eval_dir / "provenance.json").read_text())
    assert provenance["scorer"]["name"] == "faster-coco-eval"
    assert provenance["scorer"]["version"] == "1.8.0"

    # rerun with another batch size (other batch shapes, a partial last batch): the same
    # detections, up to the last bits of the network's floats (oneDNN may pick another kernel
    # for another batch shape on some CPUs: seen here, a score 7e-9 apart at batch 4 vs 1)
    code, _ = run_evaluate(tmp_path, ws, batch_size=3)
    assert code == 0
    again = json.loads((eval_dir / "detections.json").read_text())
    assert [(d["image_id"], d["category_id"]) for d in again] == \
        [(d["image_id"], d["category_id"]) for d in dets]
    np.testing.assert_allclose([d["score"] for d in again], [d["score"] for d in dets],
                               rtol=1e-5)
    np.testing.assert_allclose([d["bbox"] for d in again], [d["bbox"] for d in dets],
                               rtol=0, atol=1e-3)
    metrics_again = json.loads(paths["metrics"].read_text())
    assert metrics_again.keys() == metrics.keys()
    np.testing.assert_allclose([metrics_again[k] for k in metrics],
                               [metrics[k] for k in metrics], rtol=0, atol=1e-3)


def test_wrong_precision_and_bad_params_fail_before_work(tmp_path, tmp_path_factory, capfd):
    ws = shared_workspace(tmp_path_factory)
    code, paths = run_evaluate(tmp_path, ws, precision="int8")
    assert code == 1 and "is a fp32 model, not int8" in capfd.readouterr().err
    code, paths = run_evaluate(tmp_path, ws, batch_size=0)
    assert code == 2 and "evaluate.coco.batch_size" in capfd.readouterr().err
    code, paths = run_evaluate(tmp_path, ws, scorer="cocoapi")
    err = capfd.readouterr().err
    assert code == 2 and "evaluate.coco.scorer" in err and "'cocoapi'" in err
    assert "pycocotools" in err and "faster-coco-eval" in err
    assert not (tmp_path / "metrics").exists() and not (tmp_path / "eval").exists()


def test_an_eval_dir_it_does_not_own_is_refused_before_work(tmp_path, tmp_path_factory, capfd):
    ws = shared_workspace(tmp_path_factory)
    write_params(tmp_path, evaluate={"coco": EVAL})
    images_before = sorted(p.name for p in Path(ws.images).iterdir())
    for eval_dir, needle in ((".", "--eval-dir ."), (ws.images, "--images")):
        code = run_in(tmp_path, ev.main, [
            "coco", "fp32", "--model", ws.fp32, "--images", ws.images, "--annotations",
            ws.annotations, "--metrics", tmp_path / "m.json", "--speed", tmp_path / "s.json",
            "--eval-dir", eval_dir])
        assert code == 2 and needle in capfd.readouterr().err
    assert sorted(p.name for p in Path(ws.images).iterdir()) == images_before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]
