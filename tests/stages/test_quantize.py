"""The quantize stage: a real INT8 model with quantized convolutions, close to FP32."""
import json
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest

from stages import quantize
from stages.export import outputs_to_numpy
from stages.inference import ImageItem, load_batch, load_detector
from stages.models import GLUONCV_MEAN, GLUONCV_STD
from tests.stages.coco_helpers import run_in, shared_workspace, write_params

CALIB = {"calib_mode": "naive", "calib_images": 4, "batch_size": 2, "seed": 0,
         "exclude_layers": ["flatten", "concat"], "quantized_dtype": "auto"}


def run_quantize(folder: Path, ws, **change) -> tuple[int, Path, Path]:
    write_params(folder, quantize={"coco": {**CALIB, **change}})
    out, log = folder / "model" / "int8", folder / "model" / "int8-calibration.log"
    code = run_in(folder, quantize.main, ["coco", "--fp32", ws.fp32, "--out", out,
                                          "--images", ws.images, "--log", log])
    return code, out, log


def iou(a, b):
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union if union > 0 else 0.0


def matched_fraction(ref, got, top=10, min_iou=0.7, max_score_diff=0.02) -> float:
    """Share of each image's top FP32 detections found in INT8 (same class, close box/score)."""
    hits = total = 0
    for img in range(ref[0].shape[0]):
        ids, scores, boxes = ref[0][img, :, 0], ref[1][img, :, 0], ref[2][img]
        qids, qscores, qboxes = got[0][img, :, 0], got[1][img, :, 0], got[2][img]
        for k in [k for k in range(len(ids)) if ids[k] >= 0][:top]:
            total += 1
            hits += any(qids[j] == ids[k] and iou(boxes[k], qboxes[j]) >= min_iou
                        and abs(qscores[j] - scores[k]) <= max_score_diff
                        for j in range(len(qids)))
    return hits / total


def test_int8_model_has_quantized_convs_and_stays_close(tmp_path, tmp_path_factory, capfd):
    ws = shared_workspace(tmp_path_factory)
    code, out, log = run_quantize(tmp_path, ws)
    console = capfd.readouterr().err
    assert code == 0

    meta = json.loads(Path(f"{out}-meta.json").read_text())
    assert meta["precision"] == "int8" and meta["head"] == "seed"
    assert meta["calibration"]["images"] == 4 and meta["calibration"]["mode"] == "naive"
    assert len(meta["calibration"]["image_names"]) == 4
    convs = [q for q in meta["quantized_layers"] if q["op"] == "quantized_conv"]
    assert len(convs) == 35  # 13 VGG + 2 fc6/fc7 + 8 extra layers + 12 predictors
    symbol = json.loads(Path(f"{out}-symbol.json").read_text())
    assert sum(n["op"] == "_sg_mkldnn_conv" and n.get("attrs", {}).get("quantized") == "true"
               for n in symbol["nodes"]) == 35
    assert any("flatten" in name for name in meta["excluded_layers"])

    # MXNet's calibration chatter is in the log file, the console has the summary
    text = log.read_text()
    assert "is quantized" in text and "Collected layer output" in text
    assert "is quantized" not in console and "35 quantized convolutions" in console

    # INT8 detections stay close to FP32 ones on the test images
    fp32, _ = load_detector(ws.fp32)
    int8, _ = load_detector(out)
    items = [ImageItem(p.name, p) for p in sorted(ws.images.glob("*.jpg"))]
    x = mx.nd.array(load_batch(items, 300, GLUONCV_MEAN, GLUONCV_STD).data)
    ref, got = outputs_to_numpy(fp32(x)), outputs_to_numpy(int8(x))
    assert matched_fraction(ref, got) >= 0.75
    assert np.abs(ref[1].max() - got[1].max()) < 0.02


@pytest.mark.parametrize("change, message", [
    ({"calib_images": 0}, "quantize.coco.calib_images: Input should be greater than 0"),
    ({"calib_mode": "kl"}, "quantize.coco.calib_mode: Input should be 'naive', 'entropy' or "
                           "'none'"),
    ({"calib_images": 5}, "must be a multiple of batch_size"),
    ({"exclude_layer": ["x"]}, "quantize.coco.exclude_layer: unknown key"),
])
def test_bad_params_fail_before_work(tmp_path, tmp_path_factory, capfd, change, message):
    ws = shared_workspace(tmp_path_factory)
    code, out, log = run_quantize(tmp_path, ws, **change)
    assert code == 2
    assert message in capfd.readouterr().err
    assert not (tmp_path / "model").exists()


def test_too_few_images_is_a_clear_error(tmp_path, tmp_path_factory, capfd):
    ws = shared_workspace(tmp_path_factory)
    code, out, log = run_quantize(tmp_path, ws, calib_images=8)
    assert code == 1
    assert "calibration needs 8 images, only 6 available" in capfd.readouterr().err
    assert not (tmp_path / "model").exists() or not list((tmp_path / "model").iterdir())


def test_nothing_quantized_fails_and_leaves_nothing(tmp_path, tmp_path_factory, capfd):
    ws = shared_workspace(tmp_path_factory)
    code, out, log = run_quantize(tmp_path, ws, calib_mode="none", exclude_layers=["conv"])
    assert code == 1
    assert "no convolution was quantized" in capfd.readouterr().err
    assert not list((tmp_path / "model").iterdir())


def test_a_log_path_on_an_input_is_refused_before_work(tmp_path, tmp_path_factory, capfd):
    ws = shared_workspace(tmp_path_factory)
    params_file = Path(f"{ws.fp32}-0000.params")
    before = params_file.read_bytes()
    write_params(tmp_path, quantize={"coco": CALIB})
    code = run_in(tmp_path, quantize.main, ["coco", "--fp32", ws.fp32, "--out",
                                            tmp_path / "int8", "--images", ws.images,
                                            "--log", params_file])
    assert code == 2 and "--log" in capfd.readouterr().err
    assert params_file.read_bytes() == before
    assert not list(tmp_path.glob("int8*"))
