"""A small real detector for the precision tests: the demo SSD (15 convolutions, 128 px) with
random weights whose scores look trained, exported with the seed head, plus generated images.
Built once per test session (module-level cache); a few seconds on 2 cores."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CLASSES = ["rectangle", "ellipse", "triangle", "cross"]
SIZE = 128


@dataclass(frozen=True)
class TinyModel:
    root: Path
    fp32: Path  # model prefix (-symbol.json, -0000.params, -meta.json)
    images: Path  # folder of generated *.jpg
    data: np.ndarray  # the images preprocessed, (N, 3, 128, 128) float32


_CACHE: dict[str, TinyModel] = {}


def export_tiny_fp32(folder: Path, seed: int = 0, background: float = 6.0) -> Path:
    """The demo SSD with trained-looking random weights as an FP32 symbolic model + meta."""
    from stages.demo_net import demo_ssd
    from stages.export import check_input, export_block
    from stages.heads import HeadSpec, make_detector
    from stages.models import GLUONCV_MEAN, GLUONCV_STD, init_like_trained

    ssd = demo_ssd(CLASSES)
    init_like_trained(ssd, seed=seed, spread=2.0, background=background, data_shape=SIZE)
    prefix = folder / "fp32"
    folder.mkdir(parents=True, exist_ok=True)
    export_block(make_detector(ssd, HeadSpec("seed"), SIZE), prefix, check_input(SIZE))
    meta = {"network": "demo_ssd", "classes": CLASSES, "data_shape": SIZE, "head": "seed",
            "precision": "fp32", "mean": list(GLUONCV_MEAN), "std": list(GLUONCV_STD)}
    Path(f"{prefix}-meta.json").write_text(json.dumps(meta))
    return prefix


def write_images(folder: Path, n: int, seed: int = 5) -> list[Path]:
    """``n`` generated 128 px scenes as JPEG files."""
    from stages.synthetic import encode_jpeg, make_samples

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in make_samples(n, CLASSES, SIZE, 4, seed=seed):
        path = folder / f"{s.name}.jpg"
        path.write_bytes(encode_jpeg(s.image))
        paths.append(path)
    return paths


def tiny_model(tmp_path_factory) -> TinyModel:
    """The shared tiny detector and 16 images (made once per session)."""
    if "tiny" not in _CACHE:
        from stages.inference import ImageItem, load_batch
        from stages.models import GLUONCV_MEAN, GLUONCV_STD

        root = tmp_path_factory.mktemp("tiny_model")
        fp32 = export_tiny_fp32(root / "model")
        paths = write_images(root / "images", 16)
        data = load_batch([ImageItem(p.name, p) for p in paths], SIZE, GLUONCV_MEAN,
                          GLUONCV_STD).data
        _CACHE["tiny"] = TinyModel(root, fp32, root / "images", data)
    return _CACHE["tiny"]
