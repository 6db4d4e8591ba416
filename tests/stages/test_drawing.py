"""Sample drawings: boxes and labels on a copy of the image, saved as PNG atomically."""
from __future__ import annotations

import numpy as np

from stages.drawing import colour, draw_detections, write_png


def test_boxes_are_drawn_on_a_copy_in_their_class_colour():
    image = np.zeros((60, 80, 3), np.uint8)
    out = draw_detections(image, np.array([[10, 20, 50, 40]], np.float32), [1], [0.87],
                          ["a", "b"])
    assert image.sum() == 0  # the input is left alone
    assert tuple(out[40, 30]) == colour(1)  # the bottom edge, in class 1's colour
    assert tuple(out[30, 30]) == (0, 0, 0)  # inside the box: untouched
    assert colour(0) != colour(1) and colour(3) == colour(3)


def test_an_unknown_class_index_is_labelled_by_its_number():
    out = draw_detections(np.zeros((40, 40, 3), np.uint8), np.array([[5, 15, 30, 35]]), [7],
                          [0.5], ["a"])
    assert out.any()


def test_png_is_written_atomically_and_reads_back(tmp_path):
    import cv2

    image = np.random.RandomState(0).randint(0, 255, (20, 30, 3)).astype(np.uint8)
    write_png(tmp_path / "s" / "x.png", image)
    assert [p.name for p in (tmp_path / "s").iterdir()] == ["x.png"]
    back = cv2.imread(str(tmp_path / "s" / "x.png"))[:, :, ::-1]
    assert np.array_equal(back, image)
