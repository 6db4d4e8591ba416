"""Synthetic detection scenes: textured, noisy backgrounds with filled shapes, one per class.

``make_samples`` draws n images of 1..max_objects shapes of random colour and size (overlaps
limited by MAX_OVERLAP), with their boxes and class indices; ``encode_jpeg`` encodes an image.
Everything is integer arithmetic on a seeded numpy Generator, OpenCV's integer rasteriser and
libjpeg's integer DCT, so the same arguments give the same bytes. The generate stage and the
tests build their datasets from these.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

# Shapes a class can be drawn as. A class named like a shape is drawn as that shape; any other
# name takes SHAPES[index % len(SHAPES)], and from the second round on the shape is hollow.
SHAPES = ("rectangle", "ellipse", "triangle", "cross", "diamond", "star")
MAX_CLASSES = 2 * len(SHAPES)
MAX_OVERLAP = 0.5  # a new box may cover at most this fraction of an existing box (and vice versa)

Box = tuple[int, int, int, int]  # x0, y0, x1, y1: inclusive integer pixel coordinates


@dataclass(frozen=True)
class Sample:
    """One generated image: RGB pixels, boxes (x0, y0, x1, y1 inclusive pixels), class indices."""

    name: str
    image: np.ndarray  # (H, W, 3) uint8 RGB
    boxes: np.ndarray  # (k, 4) float32 xyxy, 0-based inclusive pixel coordinates
    labels: np.ndarray  # (k,) int64 indices into the class list


# ---------------------------------------------------------------------------------------------
# Drawing (pure)

def shape_of(classes: Sequence[str], index: int) -> tuple[str, bool]:
    """(shape, hollow) drawn for class ``index`` of ``classes``."""
    name = classes[index]
    if name in SHAPES:
        return name, False
    return SHAPES[index % len(SHAPES)], bool((index // len(SHAPES)) % 2)


def textured_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth random colour blobs (integer bilinear upsampling of a coarse grid) plus stripes."""
    cells = int(rng.integers(2, 6))
    grid = rng.integers(30, 226, size=(cells + 1, cells + 1, 3)).astype(np.int64)
    # Integer bilinear interpolation, separable (along x, then y): exact on every machine.
    pos = np.arange(size, dtype=np.int64) * cells
    i0 = np.minimum(pos // size, cells - 1)
    w = (pos - i0 * size)[:, None]
    rows = grid[:, i0] * (size - w) + grid[:, i0 + 1] * w  # (cells + 1, size, 3)
    image = (rows[i0] * (size - w)[..., None] + rows[i0 + 1] * w[..., None]) // (size * size)
    if rng.integers(0, 2):  # faint stripes: texture the detector must learn to ignore
        period = int(rng.integers(6, 20))
        amplitude = int(rng.integers(8, 30))
        axis = np.arange(size)[:, None] if rng.integers(0, 2) else np.arange(size)[None, :]
        image = image + ((axis // period) % 2 * amplitude)[..., None]
    return image


def shape_mask(shape: str, hollow: bool, box: Box, size: int,
               flip: bool) -> np.ndarray:
    """Boolean (size, size) mask of ``shape`` filling the integer box (x0, y0, x1, y1)."""
    import cv2

    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    mask = np.zeros((size, size), np.uint8)
    if shape == "rectangle":
        pts = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    elif shape == "diamond":
        pts = [(cx, y0), (x1, cy), (cx, y1), (x0, cy)]
    elif shape == "triangle":
        pts = [(cx, y0), (x1, y1), (x0, y1)]
        if flip:
            pts = [(cx, y1), (x1, y0), (x0, y0)]
    elif shape == "cross":
        tx, ty = max(w // 6, 1), max(h // 6, 1)
        pts = [(cx - tx, y0), (cx + tx, y0), (cx + tx, cy - ty), (x1, cy - ty), (x1, cy + ty),
               (cx + tx, cy + ty), (cx + tx, y1), (cx - tx, y1), (cx - tx, cy + ty),
               (x0, cy + ty), (x0, cy - ty), (cx - tx, cy - ty)]
    elif shape == "star":
        pts = []
        for k in range(10):
            r = 1.0 if k % 2 == 0 else 0.45
            a = math.pi * (k / 5.0 - 0.5)
            pts.append((cx + round(r * w / 2 * math.cos(a)), cy + round(r * h / 2 * math.sin(a))))
    elif shape == "ellipse":
        pts = None
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    thickness = max(min(w, h) // 6, 2) if hollow else -1
    if pts is None:
        cv2.ellipse(mask, (cx, cy), (w // 2, h // 2), 0, 0, 360, 1, thickness)
    elif hollow:
        cv2.polylines(mask, [np.array(pts, np.int32)], True, 1, thickness)
    else:
        cv2.fillPoly(mask, [np.array(pts, np.int32)], 1)
    return mask.astype(bool)


def _overlaps_too_much(box: Box, others: list[Box]) -> bool:
    """True if ``box`` covers more than MAX_OVERLAP of any other box or is covered that much."""
    x0, y0, x1, y1 = box
    area = (x1 - x0 + 1) * (y1 - y0 + 1)
    for a0, b0, a1, b1 in others:
        iw = min(x1, a1) - max(x0, a0) + 1
        ih = min(y1, b1) - max(y0, b0) + 1
        if iw > 0 and ih > 0:
            inter = iw * ih
            if inter > MAX_OVERLAP * min(area, (a1 - a0 + 1) * (b1 - b0 + 1)):
                return True
    return False


def random_colour(rng: np.random.Generator, mean: np.ndarray) -> np.ndarray:
    """A colour that differs clearly from the background's ``mean`` (contrast, any hue)."""
    for _ in range(20):
        colour = rng.integers(0, 256, size=3)
        if np.abs(colour - mean).sum() >= 150:
            break
    return colour


def make_sample(rng: np.random.Generator, name: str, classes: Sequence[str], image_size: int,
                max_objects: int, object_scale: tuple[float, float] = (0.15, 0.5),
                noise: int = 24) -> Sample:
    """One image with 1..max_objects shapes, drawn from ``rng``."""
    image = textured_background(rng, image_size)
    mean = image.reshape(-1, 3).sum(axis=0) // (image_size * image_size)
    lo, hi = (max(int(s * image_size), 4) for s in object_scale)
    placed: list[tuple[int, int, int, int]] = []
    boxes, labels = [], []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        label = int(rng.integers(0, len(classes)))
        for _attempt in range(30):  # rejection sampling of a box that does not hide others
            # Aspect ratio within [0.6, 1.67], in integer steps (exact on every machine).
            w = int(rng.integers(lo, hi + 1))
            h = min(max(w * int(rng.integers(60, 168)) // 100, lo), hi)
            x0 = int(rng.integers(0, image_size - w + 1))
            y0 = int(rng.integers(0, image_size - h + 1))
            box = (x0, y0, x0 + w - 1, y0 + h - 1)
            if not _overlaps_too_much(box, placed):
                break
        else:
            continue
        shape, hollow = shape_of(classes, label)
        mask = shape_mask(shape, hollow, box, image_size, flip=bool(rng.integers(0, 2)))
        image[mask] = random_colour(rng, mean)
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        placed.append(box)
        boxes.append((cols[0], rows[0], cols[-1], rows[-1]))
        labels.append(label)
    image = image + rng.integers(-noise, noise + 1, size=image.shape)
    return Sample(name=name, image=np.clip(image, 0, 255).astype(np.uint8),
                  boxes=np.array(boxes, np.float32).reshape(-1, 4),
                  labels=np.array(labels, np.int64))


def make_samples(n: int, classes: Sequence[str], image_size: int, max_objects: int, seed: int,
                 first_index: int = 0, object_scale: tuple[float, float] = (0.15, 0.5),
                 noise: int = 24) -> list[Sample]:
    """``n`` samples named ``f"{first_index + i:06d}"``; image i depends only on (seed, its index).

    So two calls with different ``first_index`` ranges give disjoint, independent images.
    """
    if not 1 <= len(classes) <= MAX_CLASSES:
        raise ValueError(f"need 1..{MAX_CLASSES} classes, got {len(classes)}")
    if max_objects < 1 or image_size < 16:
        raise ValueError(f"need max_objects >= 1 and image_size >= 16 "
                         f"(got {max_objects}, {image_size})")
    samples = []
    for i in range(first_index, first_index + n):
        rng = np.random.default_rng([seed, i])
        samples.append(make_sample(rng, f"{i:06d}", classes, image_size, max_objects,
                                   object_scale, noise))
    return samples


def encode_jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    """JPEG bytes of an RGB image (OpenCV's libjpeg-turbo, integer DCT: deterministic)."""
    import cv2

    ok, buf = cv2.imencode(".jpg", image[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()
