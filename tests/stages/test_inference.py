"""The shared inference path: preprocessing like GluonCV, ordered batches, rescaled detections."""
import os

import mxnet as mx
import numpy as np
import pytest
from gluoncv.data.transforms.presets.ssd import SSDDefaultValTransform

from stages import inference
from stages.common import StageError
from stages.synthetic import encode_jpeg


@pytest.mark.parametrize("shape", [(480, 640), (200, 150), (280, 400)])  # shrink, grow, mixed
def test_preprocess_matches_gluoncv_val_transform(shape):
    rng = np.random.RandomState(0)
    image = (rng.uniform(0, 1, (*shape, 3)) ** 2 * 255).astype(np.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    want, _ = SSDDefaultValTransform(300, 300, mean, std)(mx.nd.array(image, dtype="uint8"),
                                                            np.zeros((0, 5)))
    got = inference.preprocess(image, 300, mean, std)
    assert got.shape == (3, 300, 300) and got.dtype == np.float32
    # MXNet's bundled OpenCV and opencv-python may round a resized pixel differently (1/255)
    diff = np.abs(got - want.asnumpy())
    assert diff.max() <= 1.01 / 255 / 0.224 and diff.mean() < 1e-3


def write_images(folder, sizes):
    items = []
    for i, (h, w) in enumerate(sizes):
        path = folder / f"{i}.jpg"
        path.write_bytes(encode_jpeg(np.full((h, w, 3), 40 * i, np.uint8)))
        items.append(inference.ImageItem(i, path))
    return items


@pytest.mark.parametrize("prefetch", [0, 2])
def test_batches_keep_order_and_original_sizes(tmp_path, prefetch):
    items = write_images(tmp_path, [(40, 60), (50, 30), (20, 20), (64, 48), (30, 90)])
    batches = list(inference.iter_batches(items, 32, (0, 0, 0), (1, 1, 1), 2, prefetch))
    assert [b.keys for b in batches] == [[0, 1], [2, 3], [4]]
    assert batches[0].sizes == [(40, 60), (50, 30)]
    assert batches[1].data.shape == (2, 3, 32, 32)
    assert np.allclose(batches[1].data[0], 80 / 255, atol=1e-6)  # image 2 is grey 80


def test_unreadable_image_fails_in_the_caller(tmp_path):
    items = write_images(tmp_path, [(20, 20)] * 3)
    (tmp_path / "2.jpg").write_bytes(b"not a jpeg")
    batches = inference.iter_batches(items, 16, (0, 0, 0), (1, 1, 1), 2, prefetch=1)
    assert next(batches).keys == [0, 1]
    with pytest.raises(StageError, match="cannot read image .*2.jpg"):
        next(batches)


def test_detections_are_filtered_and_rescaled_to_the_original_image():
    ids = np.array([[2], [-1], [0]], np.float32)
    scores = np.array([[0.9], [-1], [0.2]], np.float32)
    boxes = np.array([[30, 60, 150, 300], [-1, -1, -1, -1], [0, 0, 300, 150]], np.float32)
    det = inference.to_detections("img", ids, scores, boxes, (480, 640), 300)
    assert det.ids.tolist() == [2, 0] and det.scores.tolist() == pytest.approx([0.9, 0.2])
    np.testing.assert_allclose(det.boxes, [[64, 96, 320, 480], [0, 0, 640, 240]], rtol=1e-6)


def test_configure_threads_sets_openmp(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    assert inference.configure_threads(0) == os.cpu_count()
    assert os.environ["OMP_NUM_THREADS"] == str(os.cpu_count())
