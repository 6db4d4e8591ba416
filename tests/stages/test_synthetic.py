"""Synthetic scenes: deterministic samples with tight boxes; JPEG encoding."""
from __future__ import annotations

import numpy as np
import pytest

from stages.synthetic import encode_jpeg, make_samples

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


def test_jpeg_encoding_is_deterministic_and_decodes_close():
    import cv2

    image = make_samples(1, CLASSES, 64, 2, seed=4)[0].image
    data = encode_jpeg(image, quality=90)
    assert data[:2] == b"\xff\xd8" and data == encode_jpeg(image, quality=90)
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]
    assert np.abs(decoded.astype(int) - image).mean() < 16
    assert len(encode_jpeg(image, quality=20)) < len(data)


def test_more_classes_than_shapes_can_draw_are_refused():
    from stages.synthetic import MAX_CLASSES

    with pytest.raises(ValueError):
        make_samples(1, [f"c{i}" for i in range(MAX_CLASSES + 1)], 32, 1, seed=0)
