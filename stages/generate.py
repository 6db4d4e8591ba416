"""Generate a synthetic detection dataset and pack it like the real COCO / VOC downloads.

Images are textured, noisy backgrounds with 1..max_objects filled shapes (one shape per class)
of random colour and size, overlapping allowed. The pure functions (``make_samples``,
``write_voc``, ``write_coco``, ``pack_zip``, ``pack_tar``) are what tests of other stages use to
build tiny datasets; the stage shell writes the five archives of the real download layout:

    python -m stages.generate --out demo/data/generated      # reads params `generate`

Everything is integer arithmetic on a seeded numpy Generator, OpenCV's integer rasteriser and
libjpeg's integer DCT, and archives carry fixed mtimes/owners in sorted order, so the archives
are byte-identical on every run and their checksums can be pinned in params.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Sequence
from xml.etree import ElementTree as ET

import numpy as np
from pydantic import Field, model_validator

from stages.common import atomic_path, file_digest, main_guard
from stages.config import Section, load_section
from stages.outputs import check_outputs

log = logging.getLogger(__name__)

# Shapes a class can be drawn as. A class named like a shape is drawn as that shape; any other
# name takes SHAPES[index % len(SHAPES)], and from the second round on the shape is hollow.
SHAPES = ("rectangle", "ellipse", "triangle", "cross", "diamond", "star")
MAX_CLASSES = 2 * len(SHAPES)
MAX_OVERLAP = 0.5  # a new box may cover at most this fraction of an existing box (and vice versa)
ARCHIVE_MTIME = 946684800  # 2000-01-01T00:00:00Z: fixed, so archives are byte-deterministic

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


# ---------------------------------------------------------------------------------------------
# Writing datasets (pure apart from the files under the given root)

def encode_jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    """JPEG bytes of an RGB image (OpenCV's libjpeg-turbo, integer DCT: deterministic)."""
    import cv2

    ok, buf = cv2.imencode(".jpg", image[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


def voc_xml(sample: Sample, year: str, classes: Sequence[str]) -> bytes:
    """A VOC annotation XML: size, and per object name/difficult=0/1-based integer bndbox."""
    h, w = sample.image.shape[:2]
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = f"VOC{year}"
    ET.SubElement(root, "filename").text = f"{sample.name}.jpg"
    source = ET.SubElement(root, "source")
    ET.SubElement(source, "database").text = "ssd-repro synthetic shapes"
    size = ET.SubElement(root, "size")
    for key, value in (("width", w), ("height", h), ("depth", 3)):
        ET.SubElement(size, key).text = str(value)
    ET.SubElement(root, "segmented").text = "0"
    for box, label in zip(sample.boxes, sample.labels):
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = classes[int(label)]
        ET.SubElement(obj, "pose").text = "Unspecified"
        ET.SubElement(obj, "truncated").text = "0"
        ET.SubElement(obj, "difficult").text = "0"
        bnd = ET.SubElement(obj, "bndbox")
        for key, value in zip(("xmin", "ymin", "xmax", "ymax"), box):
            ET.SubElement(bnd, key).text = str(int(value) + 1)  # VOC pixels are 1-based
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8") + b"\n"


def write_voc(devkit_root: str | Path, year: str | int, splits: dict[str, list[Sample]],
              classes: Sequence[str], quality: int = 90) -> Path:
    """Write ``<devkit_root>/VOC<year>/{JPEGImages,Annotations,ImageSets/Main}``; returns it.

    Besides ``<split>.txt`` it writes the per-class ``<class>_<split>.txt`` lists of the real
    devkit (``name  1`` if the class is present, ``name -1`` if not).
    """
    base = Path(devkit_root) / f"VOC{year}"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    for split, samples in splits.items():
        for s in samples:
            (base / "JPEGImages" / f"{s.name}.jpg").write_bytes(encode_jpeg(s.image, quality))
            (base / "Annotations" / f"{s.name}.xml").write_bytes(voc_xml(s, str(year), classes))
        main = base / "ImageSets" / "Main"
        (main / f"{split}.txt").write_text("".join(f"{s.name}\n" for s in samples))
        for index, cls in enumerate(classes):
            lines = (f"{s.name} {' 1' if index in s.labels else '-1'}\n" for s in samples)
            (main / f"{cls}_{split}.txt").write_text("".join(lines))
    return base


def image_id(sample: Sample, position: int) -> int:
    """COCO image id: the numeric name when it is one, else the 1-based position."""
    return int(sample.name) if sample.name.isdigit() else position + 1


def coco_dict(split: str, samples: Sequence[Sample], classes: Sequence[str]) -> dict:
    """The instances json of the real COCO layout (xywh boxes, category ids from 1)."""
    images, annotations = [], []
    for position, s in enumerate(samples):
        h, w = s.image.shape[:2]
        iid = image_id(s, position)
        file_name = f"{iid:012d}.jpg"
        images.append({"id": iid, "file_name": file_name, "width": w, "height": h,
                       "coco_url": f"http://images.cocodataset.org/{split}/{file_name}",
                       "license": 1})
        for box, label in zip(s.boxes, s.labels):
            x0, y0, x1, y1 = (int(v) for v in box)
            bw, bh = x1 - x0 + 1, y1 - y0 + 1  # inclusive pixel box -> COCO width/height
            annotations.append({"id": len(annotations) + 1, "image_id": iid,
                                "category_id": int(label) + 1, "bbox": [x0, y0, bw, bh],
                                "area": float(bw * bh), "iscrowd": 0, "segmentation": []})
    return {
        "info": {"description": "ssd-repro synthetic shapes", "version": "1.0", "year": 2017},
        "licenses": [{"id": 1, "name": "CC0",
                      "url": "https://creativecommons.org/publicdomain/zero/1.0/"}],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": c, "supercategory": "shape"}
                       for i, c in enumerate(classes)],
    }


def write_coco(root: str | Path, split: str, samples: Sequence[Sample], classes: Sequence[str],
               quality: int = 90) -> Path:
    """Write ``<root>/<split>/*.jpg`` and ``<root>/annotations/instances_<split>.json``."""
    root = Path(root)
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    data = coco_dict(split, samples, classes)
    for s, entry in zip(samples, data["images"]):
        (root / split / entry["file_name"]).write_bytes(encode_jpeg(s.image, quality))
    path = root / "annotations" / f"instances_{split}.json"
    path.write_text(json.dumps(data, sort_keys=True) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# Deterministic archives

def _members(src: Path) -> list[Path]:
    """Every file and directory under ``src`` (itself included), sorted: the archive order."""
    return [src, *sorted(src.rglob("*"))]


def pack_zip(src: str | Path, dest: str | Path) -> None:
    """Zip the tree ``src`` (stored under its own name) with fixed dates and permissions."""
    src, dest = Path(src), Path(dest)
    with zipfile.ZipFile(dest, "w") as zf:
        for path in _members(src):
            arcname = path.relative_to(src.parent).as_posix()
            is_dir = path.is_dir()
            info = zipfile.ZipInfo(arcname + "/" if is_dir else arcname, (1980, 1, 1, 0, 0, 0))
            info.external_attr = ((0o40755 if is_dir else 0o100644) << 16) | (0x10 if is_dir else 0)
            info.create_system = 3  # unix, so the mode above is honoured
            if is_dir:
                zf.writestr(info, b"")
            else:
                info.compress_type = zipfile.ZIP_STORED  # JPEGs don't deflate; JSON is small
                zf.writestr(info, path.read_bytes())


def pack_tar(src: str | Path, dest: str | Path) -> None:
    """Tar the tree ``src`` (stored under its own name) with fixed mtime/owner/permissions."""
    src, dest = Path(src), Path(dest)

    def normalise(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.mtime = ARCHIVE_MTIME
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mode = 0o755 if info.isdir() else 0o644
        return info

    with tarfile.open(dest, "w", format=tarfile.GNU_FORMAT) as tf:
        for path in _members(src):
            tf.add(path, arcname=path.relative_to(src.parent).as_posix(), recursive=False,
                   filter=normalise)


# ---------------------------------------------------------------------------------------------
# Stage

ARCHIVES = ("val2017.zip", "annotations_trainval2017.zip", "VOCtrainval_06-Nov-2007.tar",
            "VOCtest_06-Nov-2007.tar", "VOCtrainval_11-May-2012.tar")


class GenerateParams(Section):
    """params.yaml `generate`."""

    classes: list[str] = Field(min_length=1, max_length=MAX_CLASSES)
    image_size: int = Field(ge=32, le=1024)
    num_train: int = Field(ge=2)
    num_test: int = Field(ge=1)
    max_objects: int = Field(ge=1, le=20)
    # YAML gives a list: this one field is not strict about list vs tuple.
    object_scale: Annotated[tuple[float, float], Field(strict=False)] = (0.15, 0.5)
    noise: int = Field(default=24, ge=0, le=128)
    seed: int = Field(ge=0)
    jpeg_quality: int = Field(ge=1, le=100)

    @model_validator(mode="after")
    def _check(self) -> "GenerateParams":
        lo, hi = self.object_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"object_scale must satisfy 0 < min <= max <= 1 (got {lo}, {hi})")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes must be unique (got {self.classes})")
        return self


def build_archives(p: GenerateParams, out: Path) -> dict[str, dict[str, str]]:
    """Generate the dataset and write the five archives into ``out``.

    Returns name -> {"md5": ..., "sha1": ...}: the checksums the download stage verifies.

    Train images are split in half between VOC2007 trainval and VOC2012 trainval (like 07+12);
    the test images are both VOC2007 test and COCO val2017, so each branch evaluates the same
    held-out images.
    """
    kw = dict(classes=p.classes, image_size=p.image_size, max_objects=p.max_objects,
              seed=p.seed, object_scale=p.object_scale, noise=p.noise)
    train = make_samples(p.num_train, first_index=0, **kw)
    test = make_samples(p.num_test, first_index=p.num_train, **kw)
    half = len(train) // 2
    voc07, voc12 = train[:half], train[half:]
    log.info("generated %d train + %d test images of %d px", len(train), len(test), p.image_size)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        tmp = Path(tmp)
        coco, devkits = tmp / "coco", {name: tmp / name / "VOCdevkit" for name in ARCHIVES[2:]}
        write_coco(coco, "val2017", test, p.classes, p.jpeg_quality)
        sub07, sub12 = len(voc07) // 2, len(voc12) // 2
        write_voc(devkits["VOCtrainval_06-Nov-2007.tar"], 2007,
                  {"trainval": voc07, "train": voc07[:sub07], "val": voc07[sub07:]},
                  p.classes, p.jpeg_quality)
        write_voc(devkits["VOCtest_06-Nov-2007.tar"], 2007, {"test": test},
                  p.classes, p.jpeg_quality)
        write_voc(devkits["VOCtrainval_11-May-2012.tar"], 2012,
                  {"trainval": voc12, "train": voc12[:sub12], "val": voc12[sub12:]},
                  p.classes, p.jpeg_quality)
        pack_zip(coco / "val2017", out / "val2017.zip")
        pack_zip(coco / "annotations", out / "annotations_trainval2017.zip")
        for name, devkit in devkits.items():
            pack_tar(devkit, out / name)
    return {name: {algo: file_digest(out / name, algo) for algo in ("md5", "sha1")}
            for name in ARCHIVES}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path,
                        help="directory to write the five archives into")
    args = parser.parse_args(argv)
    params = load_section("generate", GenerateParams)
    check_outputs(dirs={"--out": args.out})
    with atomic_path(args.out, kind="dir") as tmp:
        digests = build_archives(params, tmp)
    for name, digest in digests.items():
        log.info("%s md5 %s sha1 %s", name, digest["md5"], digest["sha1"])
    return 0


if __name__ == "__main__":
    main_guard(main)
