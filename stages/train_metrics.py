"""An epoch's record over the workers of a data-parallel job, and the training metrics.

``stages.training.train_epoch`` returns one worker's record of an epoch (mean batch losses,
anchor accuracy counts, images, seconds); ``combine`` makes it the record of the whole job
(``stages.parallel``'s group sums), and ``summarize`` turns the history of records into the
train stage's metrics.
"""
from __future__ import annotations

from typing import Sequence

LOSS_KEYS = ("loss", "cls_loss", "box_loss")  # an epoch record's mean batch losses
COUNT_KEYS = ("correct", "counted", "images")  # and its counts


def combine(group, record: dict) -> dict:
    """An epoch's record over all workers of ``group`` (the identity for one process).

    Counts (anchors, images) are summed; the loss parts are the mean over workers of each
    worker's loss (normalised by its own positive anchors: the objective the averaged gradient
    descends); speed is all images over worker 0's seconds.
    """
    losses, counts = group.sum([record[k] for k in LOSS_KEYS],
                               [record[k] for k in COUNT_KEYS])
    out = {**record, **{k: v / group.size for k, v in zip(LOSS_KEYS, losses)},
           **dict(zip(COUNT_KEYS, counts))}
    out["anchor_acc"] = out["correct"] / out["counted"] if out["counted"] else 0.0
    out["images_per_s"] = out["images"] / out["seconds"] if out["seconds"] else 0.0
    return out


def summarize(history: Sequence[dict]) -> dict:
    """Training metrics from the per-epoch history.

    ``acc``: correct / counted anchors summed over every batch of every epoch (a micro-average
    over all anchors that entered the loss during training: the same statistic as the seed's
    cls_accuracy 0.783513, not a comparable value, since the seed's averages <= 5 epochs of
    another sample, batch size and anchor set; compare shows it as informational only);
    ``loss``: the last epoch's mean batch loss; ``images_per_s``: images
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
