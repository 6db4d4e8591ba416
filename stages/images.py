"""Image loading for inference: decode, GluonCV's SSD validation preprocessing, batching.

Preprocessing is GluonCV's ``SSDDefaultValTransform``: the image resized to S x S (OpenCV,
interpolation picked like GluonCV's ``imresize(interp=9)``), scaled to 0..1, normalised with the
model's mean/std, CHW, RGB. It is done here with the fewest passes over memory, bit for bit as
the plain numpy formula ``((rgb.astype(float32) / 255) - mean) / std`` computes it:

- the JPEG is decoded to BGR and resized as BGR (interpolation works on each channel alone, so
  resizing then picking channels equals picking then resizing): no colour conversion pass;
- the normalisation of an 8-bit value has only 256 possible results per channel, so each is
  computed once, with the same float32 operations in the same order, into a lookup table, and
  ``cv2.LUT`` writes each channel straight into its plane of the batch array.

Every step runs in OpenCV with the GIL released, so loader threads run truly in parallel.

Batches are filled by ``BatchLoader``: background threads prefetch images a few batches ahead
at the lowest CPU priority the OS offers (``SCHED_IDLE`` on Linux), so they only use CPU time
the network leaves idle and never preempt MXNet's OpenMP threads (a preempted OpenMP thread
stalls its whole team at the next barrier). When the caller needs a batch that is not complete,
it loads the missing images itself at normal priority, so the loader never waits on a starved
background thread for long (see ``BatchLoader``).

A loader started before the caller's setup (importing MXNet, loading the model: one busy core
for a second or more) gets a head start: its threads may load the first ``head_start_bytes``
of batches at once, on the core that setup leaves idle, so those images cost the network
nothing later.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from stages.common import StageError
from stages.idle import lower_thread_priority


@dataclass(frozen=True)
class ImageItem:
    """An image to detect on: a key the caller understands (e.g. a COCO image id) and its file."""

    key: object
    path: Path


def read_bgr(path: str | Path) -> np.ndarray:
    """An image file as (H, W, 3) uint8 BGR (OpenCV's decoder, libjpeg-turbo for JPEG)."""
    import cv2

    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise StageError(f"cannot read image {path}")
    return image


def resize_interpolation(src_hw: tuple[int, int], size: int) -> int:
    """OpenCV interpolation GluonCV's ``imresize(..., interp=9)`` picks for this resize:
    area when shrinking both sides, cubic when enlarging both, else bilinear."""
    import cv2

    h, w = src_hw
    if size > h and size > w:
        return cv2.INTER_CUBIC
    if size < h and size < w:
        return cv2.INTER_AREA
    return cv2.INTER_LINEAR


class Preprocessor:
    """GluonCV SSD validation transform into a caller-given (3, S, S) float32 array."""

    def __init__(self, data_shape: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.size = int(data_shape)
        values = np.arange(256, dtype=np.float32)
        # the reference formula's float32 operations, in its order, once per possible value
        self.luts = [((values / np.float32(255)) - np.float32(m)) / np.float32(s)
                     for m, s in zip(mean, std)]

    def __call__(self, image: np.ndarray, out: np.ndarray, bgr: bool = True) -> None:
        """Write the transform of ``image`` (uint8 HWC, BGR unless ``bgr=False``) into ``out``
        (a C-contiguous (3, S, S) float32 array, e.g. one image of a batch array), RGB order."""
        import cv2

        s = self.size
        resized = cv2.resize(image, (s, s), interpolation=resize_interpolation(image.shape[:2], s))
        planes = cv2.split(resized)
        for c in range(3):  # output channel c = R, G, B
            cv2.LUT(planes[2 - c] if bgr else planes[c], self.luts[c], dst=out[c])


def chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    """Consecutive slices of ``items`` of length ``size`` (the last may be shorter)."""
    for start in range(0, len(items), size):
        yield items[start:start + size]


@dataclass
class Batch:
    """Preprocessed images of one batch with their keys and original (height, width)."""

    keys: list
    sizes: list[tuple[int, int]]
    data: np.ndarray  # (B, 3, S, S) float32


class BatchLoader:
    """Batches of ``items`` in order, each image loaded once by whichever thread gets to it.

    ``workers`` background threads (lowered priority, see ``lower_thread_priority``) load the
    images of the next ``ahead`` batches. The consumer, when the batch it needs is incomplete,
    loads that batch's unclaimed images itself; an image a background thread claimed but did not
    finish within ``steal_after_s`` (a starved low-priority thread on a busy machine) is loaded
    again by the consumer. Both write the same bytes to the same place, so the duplicate is
    harmless. The first error of an image is raised in the consumer when its batch is due.
    With ``workers=0`` the consumer loads everything itself (no threads).

    ``head_start_bytes``: the background threads may load the first batches holding up to that
    many bytes of preprocessed images whatever the consumer is doing, e.g. while the caller
    still loads its model; further batches only ``ahead`` of the one due. Memory: at most
    ``max(head start, ahead + 1 batches)`` of batches at a time.

    Usable as a context manager that stops the threads on exit (a caller that fails before
    iterating must not leave them running).
    """

    def __init__(self, items: Sequence[ImageItem], preprocess: Preprocessor, batch_size: int,
                 workers: int = 1, ahead: int = 2, idle_priority: bool = True,
                 steal_after_s: float = 0.02, head_start_bytes: int = 0) -> None:
        self.groups = [list(g) for g in chunks(items, batch_size)]
        self.preprocess = preprocess
        self.ahead = max(int(ahead), 0)
        image_bytes = 3 * preprocess.size * preprocess.size * 4  # float32 CHW
        self.head_start = max(head_start_bytes, 0) // (image_bytes * batch_size)  # batches
        self.steal_after_s = steal_after_s
        self.cond = threading.Condition()
        self.queue = [(g, j) for g, group in enumerate(self.groups) for j in range(len(group))]
        self.next_task = 0  # index into self.queue of the next unclaimed image
        self.due = 0  # the batch the consumer waits for or loads next
        self.state: dict[int, dict] = {}  # per batch: data, sizes, done flags, errors
        self.closed = False
        self.idle_priority = idle_priority
        self.threads = [threading.Thread(target=self._work, name=f"image-loader-{i}", daemon=True)
                        for i in range(workers if self.groups else 0)]
        for thread in self.threads:
            thread.start()

    def covers(self, items: Sequence[ImageItem], batch_size: int) -> bool:
        """Whether this loader batches exactly ``items`` by ``batch_size``."""
        return self.groups == [list(g) for g in chunks(items, batch_size)]

    # -- shared state (call with self.cond held) --------------------------------------------

    def _batch(self, g: int) -> dict:
        if g not in self.state:
            n = len(self.groups[g])
            s = self.preprocess.size
            self.state[g] = {"data": np.empty((n, 3, s, s), np.float32), "sizes": [None] * n,
                             "done": [False] * n, "errors": {}, "left": n}
        return self.state[g]

    def _claim(self, limit: int):
        """The next unclaimed image if its batch is < ``limit``, else None."""
        if self.next_task < len(self.queue) and self.queue[self.next_task][0] < limit:
            g, j = self.queue[self.next_task]
            self.next_task += 1
            return g, j, self._batch(g)
        return None

    # -- loading -----------------------------------------------------------------------------

    def _load(self, g: int, j: int, batch: dict) -> None:
        """Load image j of batch g into its slot (outside the lock); record the outcome."""
        item = self.groups[g][j]
        error = size = None
        try:
            image = read_bgr(item.path)
            self.preprocess(image, batch["data"][j])
            size = tuple(image.shape[:2])
        except Exception as exc:  # pylint: disable=broad-except  # raised in the consumer
            error = exc
        with self.cond:
            if batch["done"][j]:
                return  # loaded twice (stolen): the first result stands
            batch["done"][j] = True
            batch["left"] -= 1
            if error is not None:
                batch["errors"][j] = error
            else:
                batch["sizes"][j] = size
            self.cond.notify_all()

    def _work(self) -> None:
        if self.idle_priority:
            lower_thread_priority()
        while True:
            with self.cond:
                task = None
                while not self.closed:
                    task = self._claim(max(self.due + 1 + self.ahead, self.head_start))
                    if task is not None:
                        break
                    if self.next_task >= len(self.queue):
                        return
                    self.cond.wait()
                if task is None:
                    return
            self._load(*task)

    def _complete(self, g: int) -> dict:
        """Wait for batch g, loading its missing images in this (the consumer's) thread."""
        while True:
            with self.cond:
                batch = self._batch(g)
                if batch["left"] == 0:
                    return self.state.pop(g)
                task = self._claim(g + 1)
                if task is None:  # all claimed: wait for the background threads ...
                    if self.cond.wait(self.steal_after_s):
                        continue  # an image finished: look again
                    # ... but not on one that is starved (low priority on a busy machine)
                    pending = [j for j, done in enumerate(batch["done"]) if not done]
                    task = (g, pending[0], batch)
            self._load(*task)

    def __iter__(self) -> Iterator[Batch]:
        try:
            for g, group in enumerate(self.groups):
                with self.cond:
                    self.due = g
                    self.cond.notify_all()
                batch = self._complete(g)
                if batch["errors"]:
                    raise batch["errors"][min(batch["errors"])]
                yield Batch([it.key for it in group], batch["sizes"], batch["data"])
        finally:
            self.close()

    def __enter__(self) -> "BatchLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self, wait_s: float = 1.0) -> None:
        """Stop the background threads: idle ones exit at once; one in the middle of an image
        finishes it first, and is waited for at most ``wait_s`` (a starved low-priority thread
        must not hold up the caller; its late write into a batch already handed out puts the
        same bytes there again)."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        deadline = time.monotonic() + wait_s
        for thread in self.threads:
            thread.join(max(deadline - time.monotonic(), 0))
