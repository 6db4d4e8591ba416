"""Train an SSD on Pascal VOC with GluonCV's recipe; checkpoint, resume, log curves with dvclive.

    python -m stages.train voc --data data/voc/VOCdevkit --out model/voc/trained \
        --checkpoints model/voc/checkpoints --live dvclive/train_voc \
        --metrics metrics/train_voc.json --speed metrics/speed_train_voc.json

Reads params ``train.<branch>``. The recipe is GluonCV's ``train_ssd.py``: SGD with momentum,
``SSDMultiBoxLoss`` (hard negative mining 3:1), targets from ``SSDTargetGenerator``, either
GluonCV's full SSD augmentation (``augment: gluoncv``) or a batched horizontal flip only
(``augment: flip``, for small CPU runs where the per-image augmentation dominates wall time).

Determinism and resume: every random choice is drawn from a generator seeded by
(seed, epoch[, image or batch]) — the shuffle order, the augmentation of each image, the flips
of each batch — so an epoch does not depend on the RNG history before it. A checkpoint (weights,
optimizer state, per-epoch history) is written every ``checkpoint_interval`` epochs; a rerun
with the same params and data resumes from the latest one and ends with the same weights and
metrics as an uninterrupted run. Checkpoints of other params/data are ignored (and replaced).

Outputs: ``--out``: ``net.params`` + ``net.json`` (network, classes, data_shape, provenance);
``--metrics``: ``acc`` (anchor accuracy averaged over all training anchors, see
``summarize``), ``loss`` (last epoch), ``epochs``; ``--speed``: ``images_per_s`` (kept apart
so identical reruns give byte-identical accuracy files); ``--live``: dvclive curves
(rebuilt from the checkpoint history on resume, so they too match an uninterrupted run).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import random
import shutil
import time
from pathlib import Path
from typing import Annotated, Callable, Literal, Optional, Sequence

import numpy as np
from pydantic import Field, model_validator

from stages.common import (StageError, atomic_path, library_versions, main_guard, round_floats,
                           seed_everything, write_json)
from stages.config import Section, load_branch
from stages.voc import Split

log = logging.getLogger(__name__)

Device = Literal["cpu"] | Annotated[int, Field(ge=0)]

NEGATIVE_MINING_RATIO = 3.0  # GluonCV's SSDMultiBoxLoss default, used by its recipe
MEAN = (0.485, 0.456, 0.406)  # ImageNet normalisation of GluonCV's SSD transforms
STD = (0.229, 0.224, 0.225)
NMS_THRESH, NMS_TOPK = 0.45, 400  # GluonCV's train_ssd.py validation settings
# Params that do not change the training trajectory: a checkpoint stays valid across them.
NOT_IN_FINGERPRINT = ("num_workers", "checkpoint_interval", "val_interval", "val_split",
                      "val_max_images")


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


# ---------------------------------------------------------------------------------------------
# Pure helpers: seeds, order, learning rate, accuracy, summaries

def derive_seed(*parts: int) -> int:
    """A 32-bit seed from integers (e.g. seed, epoch, image): independent streams per tuple."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Shuffled positions 0..n-1 for ``epoch``, in full batches.

    The last batch is filled up with the first positions of the same order (every image is seen
    at least once per epoch and every batch has the same shape); depends only on its arguments.
    """
    order = np.random.RandomState(derive_seed(seed, epoch)).permutation(n)
    n_batches = -(-n // batch_size)
    return np.resize(order, n_batches * batch_size).reshape(n_batches, batch_size).tolist()


def learning_rate(p: TrainParams, iteration: int, iters_per_epoch: int) -> float:
    """Learning rate at a (0-based) global iteration: linear warmup, then step or cosine."""
    warmup = p.warmup_epochs * iters_per_epoch
    if iteration < warmup:
        return p.lr * (iteration + 1) / warmup
    if p.schedule == "cosine":
        progress = (iteration - warmup) / max(1, p.epochs * iters_per_epoch - warmup)
        return p.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    epoch = iteration // iters_per_epoch
    return p.lr * p.lr_decay ** sum(epoch >= s for s in p.lr_decay_epochs)


def anchor_accuracy(cls_pred, cls_target, negative_mining_ratio: float = NEGATIVE_MINING_RATIO,
                    min_hard_negatives: int = 0) -> tuple[int, int]:
    """(correct, counted) over the anchors that enter ``SSDMultiBoxLoss``'s class loss.

    Those are the positive anchors plus the hard negatives it mines: per image, the
    ``ratio * positives`` background anchors with the highest cross-entropy. The mask is built
    with exactly the loss's operations (same ranking, same ties); an anchor counts as correct
    when the arg-max over all classes (background included) equals its target.
    """
    from mxnet import nd

    pos = cls_target > 0
    cls_loss = -nd.pick(nd.log_softmax(cls_pred, axis=-1), cls_target, axis=-1, keepdims=False)
    rank = (cls_loss * (pos - 1)).argsort(axis=1).argsort(axis=1)
    hard_negative = rank < nd.maximum(min_hard_negatives, pos.sum(axis=1)
                                      * negative_mining_ratio).expand_dims(-1)
    mask = (pos + hard_negative) > 0
    correct = (nd.argmax(cls_pred, axis=-1) == cls_target) * mask
    return int(correct.sum().asscalar()), int(mask.sum().asscalar())


def summarize(history: Sequence[dict]) -> dict:
    """Training metrics from the per-epoch history.

    ``acc``: correct / counted anchors summed over every batch of every epoch (a micro-average
    over all anchors that entered the loss during training — the training-time accuracy the
    seed's 0.783513 is); ``loss``: the last epoch's mean batch loss; ``images_per_s``: images
    trained / seconds spent in the training loops (validation and checkpointing excluded).
    """
    counted = sum(h["counted"] for h in history)
    seconds = sum(h["seconds"] for h in history)
    return {
        "acc": sum(h["correct"] for h in history) / counted if counted else 0.0,
        "loss": history[-1]["loss"],
        "epochs": history[-1]["epoch"],
        "images_per_s": sum(h["images"] for h in history) / seconds if seconds else 0.0,
    }


def fingerprint(p: TrainParams, classes: Sequence[str], ids: Sequence[str]) -> str:
    """Digest of everything that shapes the training trajectory (params, classes, image list).

    ``epochs`` only matters for the cosine schedule (a step schedule run can be extended).
    """
    knobs = p.model_dump(exclude=set(NOT_IN_FINGERPRINT))
    if p.schedule != "cosine":
        knobs.pop("epochs")
    blob = json.dumps({"params": knobs, "classes": list(classes), "images": list(ids)},
                      sort_keys=True, default=list)
    return hashlib.sha256(blob.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Data

class EpochSampler:
    """Batch sampler yielding (epoch, image index) keys; the batches are set per epoch."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[int, int]]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class SeededTransform:
    """Dataset view: item (epoch, i) is ``fn(*base[i])`` with Python's and numpy's global RNGs
    seeded from (seed, epoch, i) — GluonCV's transforms draw from those globals — so an image's
    augmentation is the same whichever DataLoader worker makes it, and on resume.
    ``seed=None``: no seeding (deterministic transforms)."""

    def __init__(self, base, fn: Callable, seed: Optional[int]) -> None:
        self.base, self.fn, self.seed = base, fn, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        epoch, index = key
        if self.seed is not None:
            s = derive_seed(self.seed, epoch, index)
            random.seed(s)
            np.random.seed(s)
        img, label = self.base[index]
        return self.fn(img, label)


def resize_item(size: int) -> Callable:
    """Deterministic part of the flip path: resize to size x size, boxes scaled alike."""
    from gluoncv.data.transforms import bbox as tbbox
    from gluoncv.data.transforms import image as timage

    def fn(img, label):
        h, w = img.shape[:2]
        img = timage.imresize(img, size, size, interp=9)
        label = tbbox.resize(np.asarray(label, np.float32).reshape(-1, 6), (w, h), (size, size))
        return img.asnumpy(), label.astype(np.float32)

    return fn


def flip_batch(images: np.ndarray, labels: np.ndarray, rng: np.random.RandomState):
    """Flip half the images of a (B, S, S, 3) batch left-right, with their padded labels."""
    flips = rng.random_sample(len(images)) < 0.5
    images, labels = images.copy(), labels.copy()
    images[flips] = images[flips, :, ::-1]
    width = images.shape[2]
    move = flips[:, None] & (labels[..., 4] >= 0)
    x0 = labels[..., 0].copy()
    labels[..., 0] = np.where(move, width - labels[..., 2], labels[..., 0])
    labels[..., 2] = np.where(move, width - x0, labels[..., 2])
    return images, labels


def normalize(images: np.ndarray) -> np.ndarray:
    """uint8 (B, H, W, 3) RGB -> float32 (B, 3, H, W), GluonCV's ImageNet normalisation."""
    x = images.astype(np.float32) / 255.0
    x = (x - np.array(MEAN, np.float32)) / np.array(STD, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


class TrainData:
    """Batches (data, cls_targets, box_targets) for an epoch, on the CPU, deterministic."""

    def __init__(self, dataset, indices: Sequence[int], p: TrainParams, anchors) -> None:
        from gluoncv.data.batchify import Pad, Stack, Tuple
        from gluoncv.data.transforms.presets.ssd import SSDDefaultTrainTransform
        from gluoncv.model_zoo.ssd.target import SSDTargetGenerator
        from mxnet import gluon

        self.indices, self.p, self.anchors = list(indices), p, anchors
        if p.augment == "gluoncv":  # targets are made per image inside the transform
            fn = SSDDefaultTrainTransform(p.data_shape, p.data_shape, anchors)
            batchify = Tuple(Stack(), Stack(), Stack())
        else:  # resize per image; flip + targets per batch (see epoch())
            fn = resize_item(p.data_shape)
            batchify = Tuple(Stack(), Pad(pad_val=-1))
            # Same matching as GluonCV's train transform (no sampling: the loss mines negatives).
            self.targets = SSDTargetGenerator(iou_thresh=0.5, stds=(0.1, 0.1, 0.2, 0.2),
                                              negative_mining_ratio=-1)
        self.sampler = EpochSampler()
        self.loader = gluon.data.DataLoader(SeededTransform(dataset, fn, p.seed),
                                            batch_sampler=self.sampler, batchify_fn=batchify,
                                            num_workers=p.num_workers)

    def epoch(self, epoch: int):
        """Yield the epoch's batches as (data, cls_targets, box_targets) NDArrays on cpu()."""
        import mxnet as mx

        order = epoch_batches(len(self.indices), self.p.batch_size, self.p.seed, epoch)
        self.sampler.batches = [[(epoch, self.indices[i]) for i in batch] for batch in order]
        for b, batch in enumerate(self.loader):
            if self.p.augment == "gluoncv":
                yield tuple(x.as_in_context(mx.cpu()) for x in batch)
                continue
            rng = np.random.RandomState(derive_seed(self.p.seed, epoch, b))
            images, labels = flip_batch(batch[0].asnumpy(), batch[1].asnumpy(), rng)
            gt = mx.nd.array(labels)
            cls_t, box_t, _ = self.targets(self.anchors, None, gt[:, :, :4], gt[:, :, 4:5])
            yield mx.nd.array(normalize(images)), cls_t, box_t

    def __len__(self) -> int:
        return -(-len(self.indices) // self.p.batch_size)


# ---------------------------------------------------------------------------------------------
# Network, training and validation

def contexts(devices: Sequence[str | int]):
    """MXNet contexts for the ``devices`` param; a GPU that is not there is a StageError."""
    import mxnet as mx

    if devices == ["cpu"]:
        return [mx.cpu()]
    available = mx.context.num_gpus()
    missing = [d for d in devices if d >= available]
    if missing:
        raise StageError(f"GPU(s) {missing} requested but {available} GPU(s) visible to MXNet; "
                         "set devices: [cpu] for a CPU run")
    return [mx.gpu(d) for d in devices]


def build_detector(network: str, classes: Sequence[str], pretrained_base: str, seed: int):
    """The registered SSD with ``classes``: base from GluonCV's zoo / a local file / random.

    Everything not loaded is initialised from ``seed`` (on the CPU, so devices don't matter).
    """
    import warnings

    import mxnet as mx

    from stages.models import build_network

    mx.random.seed(seed)
    try:
        net = build_network(network, classes=list(classes),
                            pretrained_base=pretrained_base == "zoo")
    except StageError:
        raise
    except Exception as exc:  # gluoncv's download of the base weights, offline
        if pretrained_base == "zoo":
            raise StageError(f"cannot get the ImageNet-pretrained base of {network} from "
                             f"GluonCV's model zoo ({type(exc).__name__}: {exc}); set "
                             "pretrained_base to a local .params file or 'none'") from None
        raise
    if pretrained_base not in ("zoo", "none"):
        load_base(net, Path(pretrained_base))
    with warnings.catch_warnings():  # re-initialising the loaded base warns; it is skipped
        warnings.simplefilter("ignore")
        net.initialize()
    return net


def load_base(net, path: Path) -> None:
    """Load base-network weights from a local ``.params`` file into ``net.features``."""
    import mxnet as mx

    if not path.is_file():
        raise StageError(f"pretrained_base {str(path)!r} is neither 'zoo', 'none' nor a file")
    try:
        saved = mx.nd.load(str(path))
    except mx.base.MXNetError as exc:
        raise StageError(f"pretrained_base {path}: not an MXNet .params file ({exc})") from None
    own = set(net.features._collect_params_with_prefix())  # pylint: disable=protected-access
    if not own & set(saved):
        raise StageError(f"pretrained_base {path}: none of its {len(saved)} arrays matches a "
                         f"parameter of the network's base (e.g. {sorted(own)[:3]})")
    net.features.load_parameters(str(path), allow_missing=True, ignore_extra=True)
    log.info("loaded %d base arrays from %s", len(own & set(saved)), path)


def check_input_size(net, data_shape: int) -> None:
    """Refuse a data_shape other than the size the net's anchors are laid out for.

    (GluonCV would train at any size, but the exported detector assumes the base size and the
    convert stage refuses the model: fail now, not after training.)
    """
    base = getattr(net.anchor_generators[0], "_im_size", (data_shape, data_shape))
    if tuple(base) != (data_shape, data_shape):
        raise StageError(f"data_shape {data_shape} differs from the network's base size "
                         f"{base[0]}: set data_shape: {base[0]}")


def train_anchors(net, data_shape: int, ctx):
    """The net's anchors for a data_shape input, (1, N, 4) center format, on the CPU."""
    import mxnet as mx
    from mxnet import autograd

    with autograd.train_mode():
        _, _, anchors = net(mx.nd.zeros((1, 3, data_shape, data_shape), ctx=ctx))
    return anchors.as_in_context(mx.cpu())


def train_epoch(net, trainer, loss_fn, batches, ctx: list, epoch: int, n_batches: int,
                lr_at: Callable[[int], float]) -> dict:
    """One epoch of SSD training; returns loss parts, anchor accuracy counts, timing.

    A non-finite loss raises StageError naming the epoch and batch (before the update).
    """
    from mxnet import autograd, gluon
    from tqdm import tqdm

    totals = {"loss": 0.0, "cls_loss": 0.0, "box_loss": 0.0, "correct": 0, "counted": 0}
    images, lr, start = 0, 0.0, time.perf_counter()
    net.hybridize(static_alloc=True, static_shape=True)  # fresh graph in training mode
    for b, (data, cls_t, box_t) in enumerate(tqdm(batches, total=n_batches, leave=False,
                                                  desc=f"epoch {epoch + 1}", disable=None)):
        lr = lr_at(epoch * n_batches + b)
        trainer.set_learning_rate(lr)
        xs, cts, bts = (gluon.utils.split_and_load(a, ctx, even_split=False)
                        for a in (data, cls_t, box_t))
        with autograd.record():
            preds = [net(x) for x in xs]
            cls_preds, box_preds = [p[0] for p in preds], [p[1] for p in preds]
            sum_loss, cls_loss, box_loss = loss_fn(cls_preds, box_preds, cts, bts)
            autograd.backward(sum_loss)
        parts = [sum(float(x.sum().asscalar()) for x in part)
                 for part in (sum_loss, cls_loss, box_loss)]
        if not all(math.isfinite(v) for v in parts):
            raise StageError(f"non-finite training loss (sum {parts[0]}, class {parts[1]}, "
                             f"box {parts[2]}) at epoch {epoch + 1}, batch {b + 1}/{n_batches} "
                             f"(lr {lr:g}); lower lr or add warmup_epochs")
        trainer.step(1)  # the loss is already normalised by the number of positive anchors
        for key, value in zip(("loss", "cls_loss", "box_loss"), parts):
            totals[key] += value
        if any(float((ct > 0).sum().asscalar()) for ct in cts):  # else the loss used no anchor
            for cp, ct in zip(cls_preds, cts):
                correct, counted = anchor_accuracy(cp, ct)
                totals["correct"] += correct
                totals["counted"] += counted
        images += data.shape[0]
    seconds = time.perf_counter() - start
    record = {k: totals[k] / n_batches if "loss" in k else totals[k] for k in totals}
    record.update(epoch=epoch + 1, images=images, seconds=seconds, lr=lr,
                  images_per_s=images / seconds if seconds else 0.0,
                  anchor_acc=totals["correct"] / totals["counted"] if totals["counted"] else 0.0)
    return record


def predict(net, dataset, indices: Sequence[int], data_shape: int, batch_size: int, ctx: list,
            num_workers: int = 0):
    """Run ``net`` on ``dataset[indices]`` (GluonCV's SSD validation preprocessing).

    Returns per image (boxes, class ids, scores) and the (k, 6) labels, both in the
    data_shape x data_shape frame, as GluonCV's train_ssd.py validates (the evaluate stage
    scores in the original frame: same boxes up to VOC's +1 pixel convention).
    """
    import mxnet as mx
    from gluoncv.data.batchify import Pad, Stack, Tuple
    from gluoncv.data.transforms.presets.ssd import SSDDefaultValTransform
    from mxnet import gluon

    view = SeededTransform(dataset, SSDDefaultValTransform(data_shape, data_shape), None)
    keys = [(0, i) for i in indices]
    batches = [keys[i:i + batch_size] for i in range(0, len(keys), batch_size)]
    loader = gluon.data.DataLoader(view, batch_sampler=batches, num_workers=num_workers,
                                   batchify_fn=Tuple(Stack(), Pad(pad_val=-1)))
    net.set_nms(nms_thresh=NMS_THRESH, nms_topk=NMS_TOPK)
    net.hybridize(static_alloc=True, static_shape=True)  # fresh graph in inference mode
    detections, ground_truth = [], []
    for data, label in loader:
        xs = gluon.utils.split_and_load(data.as_in_context(mx.cpu()), ctx, even_split=False)
        for x in xs:
            ids, scores, boxes = (a.asnumpy() for a in net(x))
            for i in range(len(ids)):
                keep = ids[i, :, 0] >= 0
                detections.append((np.clip(boxes[i][keep], 0, data_shape),
                                   ids[i, keep, 0], scores[i, keep, 0]))
        ground_truth.extend(lab[lab[:, 4] >= 0] for lab in label.asnumpy())
    return detections, ground_truth


def validate(net, dataset, p: TrainParams, classes: Sequence[str], ctx: list) -> float:
    """VOC07 mAP (percent) of ``net`` on the first ``val_max_images`` images (0 = all)."""
    from stages.voc import score_voc07

    n = len(dataset) if not p.val_max_images else min(p.val_max_images, len(dataset))
    detections, gt = predict(net, dataset, range(n), p.data_shape, p.batch_size, ctx,
                             p.num_workers)
    return score_voc07(detections, gt, classes)["map"]


# ---------------------------------------------------------------------------------------------
# Checkpoints

def checkpoint_paths(directory: Path, epoch: int) -> dict[str, Path]:
    """The three files of the checkpoint after ``epoch`` epochs."""
    stem = directory / f"epoch-{epoch:04d}"
    return {k: stem.with_suffix(f".{k}") for k in ("params", "states", "json")}


def save_checkpoint(directory: Path, net, trainer, history: list[dict], digest: str) -> None:
    """Write weights, optimizer state, then the json that makes the checkpoint count.

    Older checkpoints (and stale ones of other params) are removed once it is complete.
    """
    epoch = history[-1]["epoch"]
    paths = checkpoint_paths(directory, epoch)
    with atomic_path(paths["params"]) as tmp:
        net.save_parameters(str(tmp))
    with atomic_path(paths["states"]) as tmp:
        trainer.save_states(str(tmp))
    write_json(paths["json"], {"epoch": epoch, "fingerprint": digest, "history": history})
    keep = set(paths.values())
    for old in directory.glob("epoch-*"):
        if old not in keep:
            old.unlink()


def find_checkpoint(directory: Path, digest: str, epochs: int) -> Optional[dict]:
    """The latest complete checkpoint made with ``digest`` and at most ``epochs`` epochs."""
    for leftover in directory.glob(".epoch-*.tmp"):  # a killed run's partial file
        leftover.unlink()
    for meta_path in sorted(directory.glob("epoch-*.json"), reverse=True):
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            continue
        paths = checkpoint_paths(directory, int(meta.get("epoch", -1)))
        if (meta.get("fingerprint") == digest and meta["epoch"] <= epochs
                and paths["params"].is_file() and paths["states"].is_file()):
            return {**meta, "paths": paths}
        log.warning("ignoring checkpoint %s: made with other params/data (or more epochs)",
                    meta_path)
    return None


# ---------------------------------------------------------------------------------------------
# The loop

def fit(net, train_set, train_indices: Sequence[int], val_set, p: TrainParams,
        classes: Sequence[str], ctx: list, checkpoints: Path, digest: str,
        on_epoch: Callable[[dict], None]) -> list[dict]:
    """Train ``net`` for ``p.epochs`` epochs (resuming from ``checkpoints``); returns history.

    ``on_epoch`` receives every epoch's record, replayed ones from a checkpoint first.
    """
    from gluoncv.loss import SSDMultiBoxLoss
    from mxnet import gluon

    checkpoints.mkdir(parents=True, exist_ok=True)
    net.collect_params().reset_ctx(ctx)
    anchors = train_anchors(net, p.data_shape, ctx[0])
    trainer = gluon.Trainer(net.collect_params(), "sgd",
                            {"learning_rate": p.lr, "wd": p.wd, "momentum": p.momentum})
    history: list[dict] = []
    found = find_checkpoint(checkpoints, digest, p.epochs)
    if found:
        net.load_parameters(str(found["paths"]["params"]), ctx=ctx)
        trainer.load_states(str(found["paths"]["states"]))
        history = found["history"]
        log.info("resuming from checkpoint after epoch %d/%d", found["epoch"], p.epochs)
    for record in history:
        on_epoch(record)
    data = TrainData(train_set, train_indices, p, anchors)
    loss_fn = SSDMultiBoxLoss(negative_mining_ratio=NEGATIVE_MINING_RATIO)
    for epoch in range(len(history), p.epochs):
        record = train_epoch(net, trainer, loss_fn, data.epoch(epoch), ctx, epoch, len(data),
                             lambda it: learning_rate(p, it, len(data)))
        last = epoch + 1 == p.epochs
        if val_set is not None and p.val_interval and ((epoch + 1) % p.val_interval == 0 or last):
            record["map"] = validate(net, val_set, p, classes, ctx)
        history.append(record)
        log.info("epoch %d/%d: loss %.4f (class %.4f, box %.4f), anchor acc %.4f, %.1f img/s, "
                 "lr %.3g%s", epoch + 1, p.epochs, record["loss"], record["cls_loss"],
                 record["box_loss"], record["anchor_acc"], record["images_per_s"], record["lr"],
                 f", VOC07 mAP {record['map']:.2f}" if "map" in record else "")
        on_epoch(record)
        if (epoch + 1) % p.checkpoint_interval == 0 or last:
            save_checkpoint(checkpoints, net, trainer, history, digest)
    return history


def live_logger(live) -> Callable[[dict], None]:
    """Log one epoch record to a dvclive ``Live`` (step = epoch number)."""

    def log_epoch(record: dict) -> None:
        live.step = record["epoch"]
        for key in ("loss", "cls_loss", "box_loss", "anchor_acc", "images_per_s", "lr"):
            live.log_metric(f"train/{key}", record[key])
        if "map" in record:
            live.log_metric("val/map", record["map"])
        live.next_step()

    return log_epoch


def open_live(directory: Path):
    """A dvclive ``Live`` that only writes its directory.

    No report, no dvc.yaml of its own (ours declares the files), no experiment saving; inside
    ``dvc repro``/``dvc exp run`` dvclive detects the pipeline and leaves the repo to DVC.
    """
    from dvclive import Live

    return Live(dir=str(directory), resume=False, report=None, save_dvc_exp=False, dvcyaml=None)


# ---------------------------------------------------------------------------------------------
# Stage shell

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
    from stages.inference import configure_threads

    configure_threads(p.threads)  # before MXNet is imported: OpenMP reads it once

    from stages.voc import VOC_CLASSES, image_ids, labels, load_voc

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
    digest = fingerprint(p, classes, ids)

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
