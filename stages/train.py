"""Train an SSD on Pascal VOC with GluonCV's recipe; checkpoint, resume, log curves with dvclive.

    python -m stages.train voc --data data/voc/VOCdevkit --out model/voc/trained \\
        --checkpoints model/voc/checkpoints --live dvclive/train_voc \\
        --metrics metrics/train_voc.json --speed metrics/speed_train_voc.json

Reads params ``train.<branch>``. The recipe is GluonCV's ``train_ssd.py`` (``stages/training.py``):
SGD with momentum, ``SSDMultiBoxLoss`` (hard negative mining 3:1), targets from
``SSDTargetGenerator``, either GluonCV's full SSD augmentation (``augment: gluoncv``) or a batched
horizontal flip only (``augment: flip``, for small CPU runs where the per-image augmentation
dominates wall time) (``stages/train_data.py``). Validation (VOC07 mAP every ``val_interval``
epochs) runs the evaluate stage's inference path.

Determinism and resume: every random choice is drawn from a generator seeded by
(seed, epoch[, image or batch]) — the shuffle order, the augmentation of each image, the flips
of each batch — so an epoch does not depend on the RNG history before it. A checkpoint (weights,
optimizer state, per-epoch history) is written every ``checkpoint_interval`` epochs; a rerun
with the same params and data resumes from the latest one and ends with the same weights and
metrics as an uninterrupted run. Checkpoints of other params/data are ignored (and replaced)
(``stages/checkpoints.py``).

Outputs: ``--out``: ``net.params`` + ``net.json`` (network, classes, data_shape, provenance);
``--metrics``: ``acc`` (anchor accuracy averaged over all training anchors, see
``training.summarize``), ``loss`` (last epoch), ``epochs``; ``--speed``: ``images_per_s`` (kept
apart so identical reruns give byte-identical accuracy files); ``--live``: dvclive curves
(rebuilt from the checkpoint history on resume, so they too match an uninterrupted run).
"""
from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path
from typing import Annotated, Literal, Optional

from pydantic import Field, model_validator

from stages.checkpoints import fingerprint
from stages.common import (StageError, atomic_path, library_versions, main_guard, round_floats,
                           seed_everything, write_json)
from stages.config import Section, load_branch
from stages.inference import configure_threads
from stages.live import live_logger, open_live
from stages.models import build_detector, check_input_size
from stages.training import contexts, fit, summarize
from stages.voc import VOC_CLASSES, Split, image_ids, labels, load_voc

log = logging.getLogger(__name__)

Device = Literal["cpu"] | Annotated[int, Field(ge=0)]


class TrainParams(Section):
    """params.yaml ``train.<branch>``."""

    network: str = Field(min_length=1)
    pretrained_base: str = Field(min_length=1, description="'zoo', 'none' or a .params path")
    classes: Optional[list[Annotated[str, Field(pattern=r"^[a-z0-9_ -]+$")]]] = None
    splits: list[Split] = Field(min_length=1)
    val_split: Split
    data_shape: int = Field(ge=32, le=1024)
    batch_size: int = Field(ge=1)
    epochs: int = Field(ge=1)
    lr: float = Field(gt=0)
    lr_decay: float = Field(gt=0, le=1)
    lr_decay_epochs: list[Annotated[int, Field(ge=1)]] = []
    schedule: Literal["step", "cosine"] = "step"
    warmup_epochs: int = Field(default=0, ge=0)
    momentum: float = Field(ge=0, lt=1)
    wd: float = Field(ge=0)
    augment: Literal["gluoncv", "flip"] = "gluoncv"
    devices: list[Device] = Field(min_length=1)
    num_workers: int = Field(ge=0)
    seed: int = Field(ge=0)
    checkpoint_interval: int = Field(ge=1)
    val_interval: int = Field(ge=0)
    val_max_images: int = Field(default=0, ge=0)
    # OpenMP threads on CPU (0 = all cores). CPU results depend on it (float reductions are
    # split by thread), so a reproducible CPU run pins it.
    threads: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _check(self) -> "TrainParams":
        if self.lr_decay_epochs != sorted(set(self.lr_decay_epochs)):
            raise ValueError(f"lr_decay_epochs must be strictly increasing "
                             f"(got {self.lr_decay_epochs})")
        if "cpu" in self.devices and self.devices != ["cpu"]:
            raise ValueError(f"devices must be ['cpu'] or a list of GPU ids (got {self.devices})")
        if len(set(map(str, self.devices))) != len(self.devices):
            raise ValueError(f"devices must not repeat (got {self.devices})")
        if self.batch_size % len(self.devices):
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of the number "
                             f"of devices ({len(self.devices)})")
        if self.classes is not None and len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes must be unique (got {self.classes})")
        if self.warmup_epochs >= self.epochs and self.schedule == "cosine":
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) must be below epochs "
                             f"({self.epochs}) for the cosine schedule")
        return self


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("branch", help="params branch: reads train.<branch>")
    parser.add_argument("--data", required=True, type=Path, help="VOCdevkit root")
    parser.add_argument("--out", required=True, type=Path, help="trained model directory")
    parser.add_argument("--checkpoints", required=True, type=Path,
                        help="persistent checkpoint directory (resume source)")
    parser.add_argument("--live", required=True, type=Path, help="dvclive directory")
    parser.add_argument("--metrics", required=True, type=Path, help="training metrics json")
    parser.add_argument("--speed", required=True, type=Path, help="training speed json")
    args = parser.parse_args(argv)
    p = load_branch("train", args.branch, TrainParams)
    configure_threads(p.threads)  # before MXNet is imported: OpenMP reads it once
    seed_everything(p.seed)
    classes = tuple(p.classes or VOC_CLASSES)
    ctx = contexts(p.devices)
    train_set = load_voc(args.data, p.splits, classes)
    indices = [i for i, lab in enumerate(labels(train_set)) if len(lab)]
    if not indices:
        raise StageError(f"no image of {p.splits} under {args.data} has an object of {classes}")
    if len(indices) < len(train_set):
        log.warning("skipping %d training images without objects", len(train_set) - len(indices))
    val_set = load_voc(args.data, [p.val_split], classes) if p.val_interval else None
    ids = [image_ids(train_set)[i] for i in indices]
    log.info("training %s on %d images of %s for %d epochs on %s", p.network, len(indices),
             p.splits, p.epochs, ctx)
    net = build_detector(p.network, classes, p.pretrained_base, p.seed)
    check_input_size(net, p.data_shape)
    digest = fingerprint(p.model_dump(), classes, ids)

    live = open_live(args.live)
    try:
        history = fit(net, train_set, indices, val_set, p, classes, ctx, args.checkpoints,
                      digest, live_logger(live))
        live.end()
    except BaseException:
        shutil.rmtree(args.live, ignore_errors=True)  # nothing partial is left behind
        raise

    metrics = summarize(history)
    with atomic_path(args.out) as tmp:
        tmp.mkdir()
        net.save_parameters(str(tmp / "net.params"))
        write_json(tmp / "net.json", {
            "network": p.network, "classes": list(classes), "data_shape": p.data_shape,
            "provenance": {"params": {f"train.{args.branch}": p.model_dump()},
                           "images": len(ids), "fingerprint": digest,
                           # accuracy only: the file must not change between identical reruns
                           "metrics": round_floats({k: metrics[k] for k in ("acc", "loss")}),
                           "libraries": library_versions()},
        })
    speed = {"images_per_s": metrics.pop("images_per_s")}
    write_json(args.metrics, round_floats(metrics))
    write_json(args.speed, round_floats(speed))
    log.info("trained %d epochs: anchor acc %.4f (training average), final loss %.4f, "
             "%.1f img/s; model in %s", metrics["epochs"], metrics["acc"], metrics["loss"],
             speed["images_per_s"], args.out)
    return 0


if __name__ == "__main__":
    main_guard(main)
