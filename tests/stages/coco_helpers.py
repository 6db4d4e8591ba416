"""Shared material of the COCO-branch tests: a tiny COCO set, random SSD300 weights, a converted
FP32 model. Built once per test session (module-level cache) since SSD300 is slow on 2 cores."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from stages.common import run_stage

NETWORK = "ssd_300_vgg16_atrous_coco"
# The 80 category ids of COCO 2017 (not contiguous): class index i maps to COCO_IDS[i].
COCO_IDS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25,
            27, 28, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51,
            52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77,
            78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90]


def coco_classes() -> list[str]:
    """GluonCV's 80 COCO class names, in category-id order."""
    from gluoncv.data import COCODetection

    return list(COCODetection.CLASSES)


def write_coco_set(root: Path, n: int = 6, seed: int = 1) -> tuple[Path, Path]:
    """``n`` generated images in COCO layout with the real, non-contiguous category ids; objects
    of 4 classes spread over the id range; the last image has no annotations.
    Returns (images dir, annotations file)."""
    from stages.dataset_files import write_coco
    from stages.synthetic import make_samples

    classes = coco_classes()
    drawn = [classes[i] for i in (0, 11, 40, 79)]  # ids 1, 13, 46, 90
    samples = make_samples(n, drawn, image_size=160, max_objects=3, seed=seed, first_index=1)
    ann = write_coco(root, "val2017", samples, drawn)
    data = json.loads(ann.read_text())
    to_id = {i + 1: COCO_IDS[classes.index(name)] for i, name in enumerate(drawn)}
    data["categories"] = [{"id": cid, "name": name, "supercategory": "thing"}
                          for cid, name in zip(COCO_IDS, classes)]
    last = data["images"][-1]["id"]
    data["annotations"] = [dict(a, category_id=to_id[a["category_id"]])
                           for a in data["annotations"] if a["image_id"] != last]
    ann.write_text(json.dumps(data))
    return root / "val2017", ann


def write_random_weights(path: Path) -> Path:
    """SSD300-COCO with random weights whose scores look trained (models.init_like_trained)."""
    from stages.models import build_network, init_like_trained

    net = build_network(NETWORK)
    init_like_trained(net, seed=0)
    net.save_parameters(str(path))
    return path


def write_params(folder: Path, **sections) -> Path:
    """params.yaml in ``folder`` with the given sections (e.g. convert={"coco": {...}})."""
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(sections, sort_keys=False))
    return path


def convert_params(head: str = "seed", **extra) -> dict:
    """convert.coco for a weights file given as --weights (as the pipeline passes
    fetch_weights' output)."""
    return {"coco": {"network": NETWORK, "weights": "file", "head": head,
                     "data_shape": 300, **extra}}


def run_in(folder: Path, main, argv: list[str]) -> int:
    """Run a stage's main in-process with ``folder`` as the working dir (its params.yaml)."""
    old = Path.cwd()
    os.chdir(folder)
    try:
        return run_stage(main, [str(a) for a in argv])
    finally:
        os.chdir(old)


@dataclass(frozen=True)
class Workspace:
    root: Path
    images: Path
    annotations: Path
    weights: Path
    fp32: Path  # prefix of the converted seed-head model


_CACHE: dict[str, Workspace] = {}


def shared_workspace(tmp_path_factory) -> Workspace:
    """The dataset, random weights and converted FP32 model, made once per session."""
    if "ws" not in _CACHE:
        from stages import convert

        root = tmp_path_factory.mktemp("coco_ws")
        images, annotations = write_coco_set(root / "coco")
        weights = write_random_weights(root / "random.params")
        write_params(root, convert=convert_params())
        fp32 = root / "model" / "fp32"
        assert run_in(root, convert.main, ["coco", "--out", fp32, "--weights", weights]) == 0
        _CACHE["ws"] = Workspace(root, images, annotations, weights, fp32)
    return _CACHE["ws"]
