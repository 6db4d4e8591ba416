"""Generate a synthetic detection dataset and pack it like the real COCO / VOC downloads.

Images are textured, noisy backgrounds with 1..max_objects filled shapes (one shape per class)
of random colour and size, overlapping allowed. The scenes are drawn by
``stages/synthetic.py`` and written and packed by ``stages/dataset_files.py`` (which tests of other
stages use to build tiny datasets); this stage writes the five archives of the real download
layout:

    python -m stages.generate --out demo/data/generated      # reads params `generate`

The five archives are byte-identical on every run, so their checksums can be pinned in params.
``--out`` must be absent, empty or an earlier output of this stage (stages/outputs.py).
"""
from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path
from typing import Annotated

from pydantic import Field, model_validator

from stages.common import atomic_path, file_digest, main_guard
from stages.config import Section, load_section
from stages.dataset_files import pack_tar, pack_zip, write_coco, write_voc
from stages.outputs import check_outputs
from stages.synthetic import MAX_CLASSES, make_samples

log = logging.getLogger(__name__)

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
