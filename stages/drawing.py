"""Draw detections on images (sample PNGs of the evaluate stages, so people can see results)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from stages.common import atomic_path


def colour(index: int) -> tuple[int, int, int]:
    """A distinct, stable RGB colour per class index (golden-ratio hue steps)."""
    import colorsys

    r, g, b = colorsys.hsv_to_rgb((index * 0.618033988749895) % 1.0, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_detections(image: np.ndarray, boxes: np.ndarray, class_ids: Sequence[int],
                    scores: Sequence[float], class_names: Sequence[str]) -> np.ndarray:
    """A copy of RGB ``image`` with xyxy pixel ``boxes`` drawn and labelled "name score"."""
    import cv2

    out = np.ascontiguousarray(image.copy())
    thickness = max(1, round(max(out.shape[:2]) / 300))
    scale = max(0.35, max(out.shape[:2]) / 1000)
    for box, cid, score in zip(np.asarray(boxes), class_ids, scores):
        x1, y1, x2, y2 = (int(round(float(v))) for v in box)
        col = colour(int(cid))
        cv2.rectangle(out, (x1, y1), (x2, y2), col, thickness)
        name = class_names[int(cid)] if 0 <= int(cid) < len(class_names) else str(int(cid))
        text = f"{name} {float(score):.2f}"
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        top = max(y1 - th - base, 0)
        cv2.rectangle(out, (x1, top), (x1 + tw, top + th + base), col, -1)
        cv2.putText(out, text, (x1, top + th), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1,
                    cv2.LINE_AA)
    return out


def write_png(path: str | Path, image: np.ndarray) -> None:
    """Save an RGB image as PNG, atomically."""
    import cv2

    ok, buf = cv2.imencode(".png", np.ascontiguousarray(image[:, :, ::-1]))
    if not ok:
        raise RuntimeError(f"PNG encoding failed for {path}")
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.tobytes())
