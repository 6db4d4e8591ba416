"""Training batches for the train stage: deterministic, seeded per (seed, epoch, image/batch).

Every random choice is drawn from a generator seeded by (seed, epoch[, image or batch]) — the
shuffle order (``epoch_batches``), the augmentation of each image (``SeededTransform``), the
flips of each batch (``flip_batch``) — so an epoch does not depend on the RNG history before it,
nor on which DataLoader worker makes which image: a resumed run sees the same batches.

Two paths (params ``augment``): GluonCV's full SSD augmentation with targets made per image
(``gluoncv``), or resize per image then a batched horizontal flip and targets per batch
(``flip``, for small CPU runs where the per-image augmentation dominates wall time).

Data-parallel workers (``shard=(rank, size)``) each take their contiguous part of every global
batch (``shard_batch``): the workers of a job see exactly the global batches one process sees,
each image once per epoch on one worker, a new shuffle every epoch; the flips of a batch are
drawn for the whole global batch and each worker takes its part, so they match too.
"""
from __future__ import annotations

import random
from typing import Callable, Protocol, Sequence

import numpy as np

from stages.models import GLUONCV_MEAN, GLUONCV_STD


class Loading(Protocol):
    """The train params read here (the train stage's validated params have them)."""

    data_shape: int
    batch_size: int
    augment: str  # gluoncv | flip
    seed: int
    num_workers: int


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
    augmentation is the same whichever DataLoader worker makes it, and on resume."""

    def __init__(self, base, fn: Callable, seed: int) -> None:
        self.base, self.fn, self.seed = base, fn, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        epoch, index = key
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


def shard_batch(batch: Sequence, rank: int, size: int) -> list:
    """Worker ``rank``'s contiguous part of a global batch (its length a multiple of ``size``)."""
    part = len(batch) // size
    return list(batch[rank * part:(rank + 1) * part])


def flip_batch(images: np.ndarray, labels: np.ndarray, rng: np.random.RandomState,
               draws: int | None = None, start: int = 0):
    """Flip half the images of a (B, S, S, 3) batch left-right, with their padded labels.

    ``draws`` coin flips are drawn (default: one per image) and images take flips
    ``start..start+B-1``: a worker's part of a global batch gets the flips the whole batch would.
    """
    flips = (rng.random_sample(draws or len(images)) < 0.5)[start:start + len(images)]
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
    x = (x - np.array(GLUONCV_MEAN, np.float32)) / np.array(GLUONCV_STD, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


class TrainData:
    """Batches (data, cls_targets, box_targets) for an epoch, on the CPU, deterministic."""

    def __init__(self, dataset, indices: Sequence[int], p: Loading, anchors,
                 shard: tuple[int, int] = (0, 1)) -> None:
        from gluoncv.data.batchify import Pad, Stack, Tuple
        from gluoncv.data.transforms.presets.ssd import SSDDefaultTrainTransform
        from gluoncv.model_zoo.ssd.target import SSDTargetGenerator
        from mxnet import gluon

        self.indices, self.p, self.anchors = list(indices), p, anchors
        self.rank, self.size = shard
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
        self.sampler.batches = [[(epoch, self.indices[i])
                                 for i in shard_batch(batch, self.rank, self.size)]
                                for batch in order]
        part = self.p.batch_size // self.size
        for b, batch in enumerate(self.loader):
            if self.p.augment == "gluoncv":
                yield tuple(x.as_in_context(mx.cpu()) for x in batch)
                continue
            rng = np.random.RandomState(derive_seed(self.p.seed, epoch, b))
            images, labels = flip_batch(batch[0].asnumpy(), batch[1].asnumpy(), rng,
                                        draws=self.p.batch_size, start=self.rank * part)
            gt = mx.nd.array(labels)
            cls_t, box_t, _ = self.targets(self.anchors, None, gt[:, :, :4], gt[:, :, 4:5])
            yield mx.nd.array(normalize(images)), cls_t, box_t

    def __len__(self) -> int:
        """Global batches per epoch (the same on every worker)."""
        return -(-len(self.indices) // self.p.batch_size)
