"""The SSD training engine (GluonCV's ``train_ssd.py`` recipe) and its validation.

SGD with momentum, ``SSDMultiBoxLoss`` (hard negative mining 3:1), linear warmup then a step or
cosine learning-rate schedule (``learning_rate``). ``fit`` trains epoch by epoch from the
batches of ``stages.train_data``, checkpoints through ``stages.checkpoints`` (and resumes from
the latest valid checkpoint), validates every ``val_interval`` epochs and hands every epoch's
record to a callback (the train stage logs it with dvclive). The same loop runs as one worker
of a data-parallel job (``stages.parallel``): see ``fit`` and ``stages.train_metrics``.

Validation is the evaluation's own path: ``stages.voc.detect_voc`` (shared inference: GluonCV's
SSD validation preprocessing, boxes clipped to the network input) on the Gluon SSD in inference
mode, scored by ``stages.voc.score_voc07`` in the network frame (``VAL_FRAME``), as GluonCV's
``train_ssd.py`` validates — the evaluate stage's default frame too, so the last validation mAP
is the FP32 evaluation's (up to the exported head's exact score ties).

MXNet is imported inside the functions: the train stage sets its thread count and determinism
controls (``apply_determinism``) first.
"""
from __future__ import annotations

import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, Protocol, Sequence

from stages.checkpoints import find_checkpoint, restore, save_checkpoint
from stages.common import StageError
from stages.models import GLUONCV_MEAN, GLUONCV_STD
from stages.parallel import Solo
from stages.train_data import Loading, TrainData
from stages.train_metrics import combine
from stages.voc import detect_voc, in_frame, labels, score_voc07

log = logging.getLogger(__name__)

NEGATIVE_MINING_RATIO = 3.0  # GluonCV's SSDMultiBoxLoss default, used by its recipe
NMS_THRESH, NMS_TOPK = 0.45, 400  # GluonCV's train_ssd.py validation settings
VAL_FRAME = "network"  # GluonCV's train_ssd.py scores in the data_shape input (stages.voc)

# MXNet's determinism controls (params train.<branch>.deterministic): only deterministic
# algorithms (cuDNN convolutions included; MXNet errors out where none exists), and cuDNN's
# autotuning (which times candidate algorithms and may pick another one per run) off.
DETERMINISM_ENV = {"MXNET_ENFORCE_DETERMINISM": "1", "MXNET_CUDNN_AUTOTUNE_DEFAULT": "0"}


class Recipe(Loading, Protocol):
    """The train params read here (the train stage's validated params have them)."""

    epochs: int
    lr: float
    lr_decay: float
    lr_decay_epochs: Sequence[int]
    schedule: str  # step | cosine
    warmup_epochs: int
    momentum: float
    wd: float
    checkpoint_interval: int
    val_interval: int  # 0 = no validation
    val_max_images: int  # 0 = the whole validation split


# ---------------------------------------------------------------------------------------------
# Determinism controls

def apply_determinism(deterministic: bool, environ=None) -> dict[str, str | None]:
    """Set MXNet's determinism controls in ``environ`` (default: this process's environment)
    when ``deterministic``; returns the values the controls have there (None = unset, MXNet's
    default), for provenance.

    MXNet reads them from the environment of the process that runs the operators, so call it
    before MXNet is imported (DataLoader workers inherit the environment), or on the environment
    a launched training process is given. Off, nothing is changed.
    """
    env = os.environ if environ is None else environ
    if deterministic:
        if environ is None and "mxnet" in sys.modules:
            log.warning("MXNet was imported before its determinism controls were set; "
                        "those it reads at import may not apply")
        env.update(DETERMINISM_ENV)
    return {key: env.get(key) for key in DETERMINISM_ENV}


# ---------------------------------------------------------------------------------------------
# Pure helpers: learning rate, accuracy

def learning_rate(p: Recipe, iteration: int, iters_per_epoch: int) -> float:
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


# ---------------------------------------------------------------------------------------------
# Devices, one epoch, validation

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


def train_anchors(net, data_shape: int, ctx):
    """The net's anchors for a data_shape input, (1, N, 4) center format, on the CPU."""
    import mxnet as mx
    from mxnet import autograd

    with autograd.train_mode():
        _, _, anchors = net(mx.nd.zeros((1, 3, data_shape, data_shape), ctx=ctx))
    return anchors.as_in_context(mx.cpu())


def train_epoch(net, trainer, loss_fn, batches, ctx: list, epoch: int, n_batches: int,
                lr_at: Callable[[int], float],
                on_batch: Callable[[int], None] | None = None) -> dict:
    """One epoch of SSD training; returns loss parts, anchor accuracy counts, timing.

    A non-finite loss raises StageError naming the epoch and batch (before the update).
    ``on_batch(b)`` is called after each batch's update (a distributed worker's heartbeat).
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
        if on_batch is not None:
            on_batch(b)
    seconds = time.perf_counter() - start
    record = {k: totals[k] / n_batches if "loss" in k else totals[k] for k in totals}
    record.update(epoch=epoch + 1, images=images, seconds=seconds, lr=lr,
                  images_per_s=images / seconds if seconds else 0.0,
                  anchor_acc=totals["correct"] / totals["counted"] if totals["counted"] else 0.0)
    return record


def on_devices(net, ctx: list) -> Callable:
    """``net`` as a callable on a CPU batch: split over ``ctx``, outputs gathered on the CPU."""
    import mxnet as mx
    from mxnet import gluon

    def forward(x):
        parts = [net(part) for part in gluon.utils.split_and_load(x, ctx, even_split=False)]
        if len(parts) == 1:
            return parts[0]
        return tuple(mx.nd.concat(*(out[k].as_in_context(mx.cpu()) for out in parts), dim=0)
                     for k in range(len(parts[0])))

    return forward


def validate(net, dataset, p: Recipe, classes: Sequence[str], ctx: list) -> float:
    """VOC07 mAP (percent) of ``net`` on the first ``val_max_images`` images (0 = all).

    The evaluate stage's path (``detect_voc`` + ``score_voc07``) on the Gluon SSD in inference
    mode with GluonCV's train_ssd.py NMS settings and scoring frame (``VAL_FRAME``),
    preprocessed with the normalisation the network is trained with.
    """
    n = len(dataset) if not p.val_max_images else min(p.val_max_images, len(dataset))
    net.set_nms(nms_thresh=NMS_THRESH, nms_topk=NMS_TOPK)
    net.hybridize(static_alloc=True, static_shape=True)  # fresh graph in inference mode
    meta = {"data_shape": p.data_shape, "mean": GLUONCV_MEAN, "std": GLUONCV_STD}
    detections, _, _ = detect_voc(on_devices(net, ctx), meta, dataset, n, p.batch_size,
                                  desc="validate")
    return score_voc07(*in_frame(detections, labels(dataset)[:n], VAL_FRAME, p.data_shape),
                       classes)["map"]


# ---------------------------------------------------------------------------------------------
# The loop

def fit(net, train_set, train_indices: Sequence[int], val_set, p: Recipe,
        classes: Sequence[str], ctx: list, checkpoints: Path, digest: str,
        on_epoch: Callable[[dict], None], group=None,
        on_batch: Callable[[int, int], None] | None = None) -> list[dict]:
    """Train ``net`` for ``p.epochs`` epochs (resuming from ``checkpoints``); returns history.

    ``on_epoch`` receives every epoch's record, replayed ones from a checkpoint first.
    ``group`` (``stages.parallel``; default: one process) makes this one worker of a
    data-parallel job: it trains on its part of every global batch, gradients and epoch
    records are combined over all workers, and only worker 0 reads and writes checkpoints,
    validates and calls ``on_epoch`` (the others get its starting state through the group).
    ``on_batch(epoch, batch)`` is called after every update.
    """
    from gluoncv.loss import SSDMultiBoxLoss

    group = group if group is not None else Solo()
    lead = group.rank == 0
    net.collect_params().reset_ctx(ctx)
    anchors = train_anchors(net, p.data_shape, ctx[0])
    trainer = group.make_trainer(net.collect_params(), "sgd",
                                 {"learning_rate": p.lr, "wd": p.wd, "momentum": p.momentum})
    found = None
    if lead:
        checkpoints.mkdir(parents=True, exist_ok=True)
        found = find_checkpoint(checkpoints, digest, p.epochs)
    history = restore(group, net, trainer, found, ctx)
    if found:
        log.info("resuming from checkpoint after epoch %d/%d", found["epoch"], p.epochs)
    for record in history if lead else ():
        on_epoch(record)
    data = TrainData(train_set, train_indices, p, anchors, shard=(group.rank, group.size))
    loss_fn = SSDMultiBoxLoss(negative_mining_ratio=NEGATIVE_MINING_RATIO)
    trained = [q for q in net.collect_params().values() if q.grad_req != "null"]
    for epoch in range(len(history), p.epochs):
        beat = (lambda b, e=epoch: on_batch(e, b)) if on_batch else None
        record = combine(group, train_epoch(net, trainer, loss_fn, data.epoch(epoch), ctx,
                                            epoch, len(data),
                                            lambda it: learning_rate(p, it, len(data)), beat))
        group.check_identical([q.data(ctx[0]) for q in trained], "trained weights")
        history.append(record)
        if not lead:
            continue
        last = epoch + 1 == p.epochs
        if val_set is not None and p.val_interval and ((epoch + 1) % p.val_interval == 0 or last):
            record["map"] = validate(net, val_set, p, classes, ctx)
        log.info("epoch %d/%d: loss %.4f (class %.4f, box %.4f), anchor acc %.4f, %.1f img/s, "
                 "lr %.3g%s", epoch + 1, p.epochs, record["loss"], record["cls_loss"],
                 record["box_loss"], record["anchor_acc"], record["images_per_s"], record["lr"],
                 f", VOC07 mAP {record['map']:.2f}" if "map" in record else "")
        on_epoch(record)
        if (epoch + 1) % p.checkpoint_interval == 0 or last:
            save_checkpoint(checkpoints, net, trainer, history, digest)
    return history
