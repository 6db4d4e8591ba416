"""Writing generated samples as the real datasets' files, and packing deterministic archives.

``write_voc`` / ``write_coco``: a VOCdevkit year or a COCO split (images, annotations, image
sets) under a root, in the layout and conventions of the real downloads. ``pack_zip`` /
``pack_tar``: archives with fixed mtimes/owners/permissions in sorted order, so the same tree
always gives the same bytes (the demo pins their checksums in params).
"""
from __future__ import annotations

import json
import tarfile
import zipfile
from pathlib import Path
from typing import Sequence
from xml.etree import ElementTree as ET

from stages.synthetic import Sample, encode_jpeg

ARCHIVE_MTIME = 946684800  # 2000-01-01T00:00:00Z: fixed, so archives are byte-deterministic


# ---------------------------------------------------------------------------------------------
# Writing datasets (pure apart from the files under the given root)

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
