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
    # the network-frame boxes are kept as they came (the frame GluonCV's VOC metric scores in)
    np.testing.assert_array_equal(det.network_boxes, boxes[[0, 2]])
    assert det.image_size == (480, 640)


def test_boxes_past_the_input_are_clipped_to_it_before_rescaling():
    """As GluonCV's eval_ssd.py: bboxes.clip(0, data_shape), then the scale to the image."""
    boxes = np.array([[-30, -0.5, 320, 150], [10, 20, 300.25, 301]], np.float32)
    det = inference.to_detections("img", np.zeros((2, 1), np.float32),
                                  np.ones((2, 1), np.float32), boxes, (480, 640), 300)
    np.testing.assert_allclose(det.boxes, [[0, 0, 640, 240], [640 / 30, 32, 640, 480]],
                               rtol=1e-6)
    np.testing.assert_array_equal(det.network_boxes, [[0, 0, 300, 150], [10, 20, 300, 300]])


def like_trained_stock_head(size: int = 128):
    """The demo SSD with trained-like scores behind GluonCV's stock head: it decodes without
    clipping, so some of its boxes reach past the input."""
    from stages.heads import HeadSpec, make_detector
    from stages.models import build_network, init_like_trained

    net = build_network("demo_ssd", classes=["a", "b", "c"])
    init_like_trained(net, seed=3, background=4.0, data_shape=size)
    net(mx.nd.zeros((1, 3, size, size)))
    detector = make_detector(net, HeadSpec("gluoncv"), size)
    detector.hybridize()
    return detector


def test_stock_head_detections_stay_inside_each_image(tmp_path):
    rng = np.random.RandomState(0)
    items = []
    for i, (h, w) in enumerate([(96, 160), (200, 120), (128, 128)]):
        path = tmp_path / f"{i}.jpg"
        path.write_bytes(encode_jpeg(rng.randint(0, 255, (h, w, 3)).astype(np.uint8)))
        items.append(inference.ImageItem(i, path))
    meta = {"data_shape": 128, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    net = like_trained_stock_head()
    batch = next(inference.iter_batches(items, 128, meta["mean"], meta["std"], 3, prefetch=0))
    ids, _, raw = inference.run_network(net, batch.data)
    raw = raw[ids[..., 0] >= 0]
    assert ((raw < 0) | (raw > 128)).any(axis=1).sum() > 10  # the head's own output goes past

    detections, _, _ = inference.detect_all(net, items, meta, batch_size=2)
    assert sum(len(d.ids) for d in detections) == len(raw)
    on_border = 0
    for det, (h, w) in zip(detections, [(96, 160), (200, 120), (128, 128)]):
        x0, y0, x1, y1 = det.boxes.T
        assert (det.boxes >= 0).all() and (x1 <= w).all() and (y1 <= h).all()
        on_border += ((x0 == 0) | (y0 == 0) | (x1 == w) | (y1 == h)).sum()
        assert (det.network_boxes >= 0).all() and (det.network_boxes <= 128).all()
        assert det.image_size == (h, w)
    assert on_border > 10  # the boxes that reached past are cut at the border, not dropped


def test_configure_threads_sets_openmp(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    assert inference.configure_threads(0) == os.cpu_count()
    assert os.environ["OMP_NUM_THREADS"] == str(os.cpu_count())


def test_a_loader_started_before_the_model_gives_the_same_detections(tmp_path):
    rng = np.random.RandomState(1)
    items = []
    for i, (h, w) in enumerate([(96, 160), (200, 120), (128, 128), (64, 200), (150, 150)]):
        path = tmp_path / f"{i}.jpg"
        path.write_bytes(encode_jpeg(rng.randint(0, 255, (h, w, 3)).astype(np.uint8)))
        items.append(inference.ImageItem(i, path))
    meta = {"data_shape": 128, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    with inference.start_loading(items, meta, 2) as loader:
        assert loader.head_start >= 3  # every batch of this set may load before the model
        net = like_trained_stock_head()
        got, _, _ = inference.detect_all(net, items, meta, 2, loader=loader)
    want, _, _ = inference.detect_all(net, items, meta, 2)
    assert [d.key for d in got] == [0, 1, 2, 3, 4]
    for a, b in zip(got, want):
        assert a.image_size == b.image_size
        for field in ("ids", "scores", "boxes", "network_boxes"):
            assert np.array_equal(getattr(a, field), getattr(b, field))


@pytest.mark.parametrize("other", ["batch size", "items"])
def test_a_loader_of_other_images_or_batches_is_refused(tmp_path, other):
    items = write_images(tmp_path, [(20, 20)] * 5)
    meta = {"data_shape": 16, "mean": (0, 0, 0), "std": (1, 1, 1)}
    with inference.start_loading(items, meta, 2) as loader:
        batch_size, used = (3, items) if other == "batch size" else (2, items[:4])
        with pytest.raises(ValueError, match="other items or another batch size"):
            next(inference.detect_batches(lambda x: None, used, meta, batch_size,
                                          loader=loader))
