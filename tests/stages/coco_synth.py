"""A deterministic COCO ground truth + detection result set of any size, for scorer tests.

    python -m tests.stages.coco_synth   # rewrites the pycocotools reference fixture (~1 min)

``make_result_set(5000)`` is val2017-sized: 5,000 images (some without objects), ~7 objects per
image over 80 categories (1 % crowd, all COCO area ranges), 100 detections per image (some
images none): a jittered copy of each object (80 % right class, box noise from perfect to a
miss) scoring 0.2-1, the rest random boxes scoring 0.05-0.8; scores rounded to 3 decimals so
many tie (the order of ties matters).
numpy's legacy RandomState is used: its streams are fixed across platforms and releases.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
from pathlib import Path

import numpy as np

FIXTURE = Path(__file__).parent / "fixtures" / "coco_scoring_5000.json"
BIG = {"n_images": 5000, "detections": 100, "n_classes": 80, "seed": 0}


def make_result_set(n_images: int, detections: int = 100, n_classes: int = 80,
                    seed: int = 0) -> tuple[dict, list[dict]]:
    """(ground-truth dataset dict, results list) as pycocotools reads them."""
    rng = np.random.RandomState(seed)
    images, annotations, results = [], [], []
    for image_id in range(1, n_images + 1):
        w, h = int(rng.randint(200, 641)), int(rng.randint(200, 641))
        images.append({"id": image_id, "width": w, "height": h,
                       "file_name": f"{image_id:012d}.jpg"})
        k = 0 if rng.rand() < 0.02 else int(rng.randint(1, 15))
        gx, gy = rng.uniform(0, w * 0.9, k), rng.uniform(0, h * 0.9, k)
        gw = np.minimum(np.exp(rng.uniform(np.log(4), np.log(w * 0.8), k)), w - gx)
        gh = np.minimum(np.exp(rng.uniform(np.log(4), np.log(h * 0.8), k)), h - gy)
        gc = rng.randint(1, n_classes + 1, k)
        for j in range(k):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": int(gc[j]), "iscrowd": int(rng.rand() < 0.01),
                                "bbox": [round(float(v), 2) for v in (gx[j], gy[j], gw[j], gh[j])],
                                "area": round(float(gw[j] * gh[j]), 2)})
        n = 0 if rng.rand() < 0.01 else detections
        boxes, classes = [], []
        for j in range(min(k, n)):  # a noisy detection of each object
            noise = rng.normal(0, rng.choice([0.0, 0.05, 0.15, 0.5]), 4) * [gw[j], gh[j], gw[j], gh[j]]
            boxes.append((gx[j] + noise[0], gy[j] + noise[1], gw[j] + noise[2], gh[j] + noise[3]))
            classes.append(int(gc[j]) if rng.rand() < 0.8 else int(rng.randint(1, n_classes + 1)))
        for _ in range(n - len(boxes)):  # the rest: random boxes of random classes
            boxes.append((rng.uniform(0, w * 0.9), rng.uniform(0, h * 0.9),
                          rng.uniform(1, w * 0.6), rng.uniform(1, h * 0.6)))
            classes.append(int(rng.randint(1, n_classes + 1)))
        copies = min(k, n)  # the object copies tend to score higher than the random boxes
        scores = np.round(np.concatenate([rng.uniform(0.2, 1.0, copies),
                                          rng.uniform(0.05, 0.8, len(boxes) - copies)]), 3)
        for (x, y, bw, bh), c, s in zip(boxes, classes, scores):
            results.append({"image_id": image_id, "category_id": c,
                            "bbox": [round(float(x), 3), round(float(y), 3),
                                     round(max(float(bw), 1.0), 3), round(max(float(bh), 1.0), 3)],
                            "score": float(s)})
    categories = [{"id": c, "name": f"class{c}", "supercategory": "thing"}
                  for c in range(1, n_classes + 1)]
    return {"images": images, "annotations": annotations, "categories": categories}, results


def digest(gt: dict, results: list[dict]) -> str:
    """sha256 of the set, to tell a changed generator from a changed scorer."""
    text = json.dumps([gt, results], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def pycocotools_gt(gt: dict):
    """A pycocotools COCO over the dataset dict."""
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = gt
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def write_fixture() -> None:
    """Score the big set with pycocotools and store the stats (repr: every bit) beside it."""
    from importlib import metadata

    from stages.coco_scoring import score_bbox

    gt, results = make_result_set(**BIG)
    sha256 = digest(gt, results)  # before scoring: COCOeval adds "ignore" to the annotations
    scores = score_bbox(pycocotools_gt(gt), results, [i["id"] for i in gt["images"]],
                        "pycocotools")
    FIXTURE.parent.mkdir(exist_ok=True)
    FIXTURE.write_text(json.dumps({
        "made_by": "python -m tests.stages.coco_synth",
        "set": BIG, "sha256": sha256, "results": len(results),
        "pycocotools": metadata.version("pycocotools"), "numpy": np.__version__,
        "stats": [repr(float(v)) for v in scores.stats]}, indent=2) + "\n")


if __name__ == "__main__":
    write_fixture()
