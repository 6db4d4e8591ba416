"""The one inference path: load a symbolic detector, preprocess images, detect in batches.

Used by both evaluate stages and by the train stage's validation: ``detect_batches`` and
``detect_all`` work with any callable ``net`` mapping a (B, 3, S, S) float32 NDArray batch to
``(ids, scores, bboxes)`` — an exported detector (``load_detector``) or a Gluon SSD in inference
mode — and ``meta`` giving ``data_shape``, ``mean`` and ``std``.

MXNet is imported inside the functions, never at module level: ``configure_threads`` must run
before MXNet starts OpenMP, since OMP_NUM_THREADS is only read then.

Typical use::

    configure_threads(params.threads)
    net, meta = load_detector(prefix)
    images = [ImageItem(key, path), ...]
    for result in detect_batches(net, images, meta, batch_size):
        result.seconds                     # forward + copy-out time of this batch
        for det in result.detections:      # one per image, in input order
            det.key, det.ids, det.scores, det.boxes   # valid rows only, boxes in original pixels

Preprocessing is GluonCV's SSD validation transform (``SSDDefaultValTransform``): RGB image
resized to data_shape x data_shape (OpenCV, interpolation picked like ``imresize(interp=9)``:
area when shrinking both sides, cubic when enlarging both, else bilinear), scaled to 0..1,
normalised with the model's mean/std, CHW. Batches are loaded by a background thread while the
network computes the previous batch.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from stages.common import StageError

log = logging.getLogger(__name__)


def configure_threads(threads: int) -> int:
    """Use ``threads`` OpenMP threads (0 = all cores) for MXNet; returns the number set.

    Effective for the whole run only if called before MXNet is imported (OpenMP reads
    OMP_NUM_THREADS once); later it falls back to ``MXSetNumOMPThreads`` and says so.
    """
    n = threads or os.cpu_count() or 1
    os.environ["OMP_NUM_THREADS"] = str(n)
    # one engine worker: ops run one after the other, each using all n OpenMP threads
    os.environ.setdefault("MXNET_CPU_WORKER_NTHREADS", "1")
    if "mxnet" in sys.modules:
        import ctypes

        import mxnet as mx

        mx.base.check_call(mx.base._LIB.MXSetNumOMPThreads(ctypes.c_int(n)))
        log.info("MXNet was already imported: thread count set through MXSetNumOMPThreads(%d)", n)
    return n


def model_outputs(prefix: Path) -> dict[str, Path]:
    """The files of a symbolic model at ``prefix``, named for output checks."""
    return {f"--out ({path.name})": path for path in model_files(prefix)}


def model_files(prefix: Path) -> list[Path]:
    """The three files of a symbolic model at ``prefix``."""
    return [Path(f"{prefix}-symbol.json"), Path(f"{prefix}-0000.params"),
            Path(f"{prefix}-meta.json")]


def read_meta(prefix: str | Path) -> dict:
    """``<prefix>-meta.json`` of a symbolic model."""
    path = Path(f"{prefix}-meta.json")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise StageError(f"{path}: cannot read model meta ({exc})") from exc
    missing = [k for k in ("network", "classes", "data_shape", "head", "precision", "mean", "std")
               if k not in meta]
    if missing:
        raise StageError(f"{path}: missing key(s) {', '.join(missing)}")
    return meta


def load_symbol_block(prefix: str | Path, ctx=None):
    """SymbolBlock from ``<prefix>-symbol.json`` + ``<prefix>-0000.params`` (not hybridized)."""
    import mxnet as mx

    symbol, params = Path(f"{prefix}-symbol.json"), Path(f"{prefix}-0000.params")
    for path in (symbol, params):
        if not path.is_file():
            raise StageError(f"model file not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Cannot decide type for the following arguments"
            return mx.gluon.SymbolBlock.imports(str(symbol), ["data"], str(params),
                                                ctx=ctx or mx.cpu())
    except mx.base.MXNetError as exc:
        raise StageError(f"cannot load model {prefix}: {exc}") from exc


def load_detector(prefix: str | Path, ctx=None):
    """Load the symbolic detector at ``prefix`` → (hybridized SymbolBlock, meta dict).

    The block maps a (B, 3, S, S) float32 batch to (ids, scores, bboxes); see stages/heads.py.
    """
    meta = read_meta(prefix)
    backend = os.environ.get("MXNET_SUBGRAPH_BACKEND")
    if backend is not None and backend != "MKLDNN":
        log.warning("MXNET_SUBGRAPH_BACKEND=%s: FP32 graphs run without oneDNN fusion (slower; "
                    "INT8 graphs are fused at quantization)", backend)
    net = load_symbol_block(prefix, ctx)
    net.hybridize(static_alloc=True, static_shape=True)
    return net, meta


# ---------------------------------------------------------------------------------------------
# Images

@dataclass(frozen=True)
class ImageItem:
    """An image to detect on: a key the caller understands (e.g. a COCO image id) and its file."""

    key: object
    path: Path


def read_image(path: str | Path) -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB."""
    import cv2

    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise StageError(f"cannot read image {path}")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def resize_interpolation(src_hw: tuple[int, int], size: int) -> int:
    """OpenCV interpolation GluonCV's ``imresize(..., interp=9)`` picks for this resize."""
    import cv2

    h, w = src_hw
    if size > h and size > w:
        return cv2.INTER_CUBIC
    if size < h and size < w:
        return cv2.INTER_AREA
    return cv2.INTER_LINEAR


def preprocess(image: np.ndarray, data_shape: int, mean: Sequence[float],
               std: Sequence[float]) -> np.ndarray:
    """GluonCV SSD validation transform of an RGB uint8 image → (3, S, S) float32."""
    import cv2

    resized = cv2.resize(image, (data_shape, data_shape),
                         interpolation=resize_interpolation(image.shape[:2], data_shape))
    x = resized.astype(np.float32) / np.float32(255)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


@dataclass
class Batch:
    """Preprocessed images of one batch with their keys and original (height, width)."""

    keys: list
    sizes: list[tuple[int, int]]
    data: np.ndarray  # (B, 3, S, S) float32


def load_batch(items: Sequence[ImageItem], data_shape: int, mean, std) -> Batch:
    """Read and preprocess ``items`` into one Batch."""
    keys, sizes, arrays = [], [], []
    for item in items:
        image = read_image(item.path)
        keys.append(item.key)
        sizes.append(image.shape[:2])
        arrays.append(preprocess(image, data_shape, mean, std))
    return Batch(keys, sizes, np.stack(arrays))


def chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    """Consecutive slices of ``items`` of length ``size`` (the last may be shorter)."""
    for start in range(0, len(items), size):
        yield items[start:start + size]


def iter_batches(items: Sequence[ImageItem], data_shape: int, mean, std, batch_size: int,
                 prefetch: int = 2) -> Iterator[Batch]:
    """Batches of ``items`` in order, loaded ``prefetch`` batches ahead by a background thread.

    OpenCV and numpy release the GIL, so loading overlaps the network's compute. With
    ``prefetch=0`` batches are loaded in the caller's thread.
    """
    groups = list(chunks(items, batch_size))
    if prefetch <= 0:
        for group in groups:
            yield load_batch(group, data_shape, mean, std)
        return
    slots: queue.Queue = queue.Queue(maxsize=prefetch)
    stop = threading.Event()

    def produce() -> None:
        try:
            for group in groups:
                if stop.is_set():
                    return
                slots.put(load_batch(group, data_shape, mean, std))
        except BaseException as exc:  # handed to the consumer, raised there
            slots.put(exc)

    worker = threading.Thread(target=produce, name="batch-loader", daemon=True)
    worker.start()
    try:
        for _ in groups:
            batch = slots.get()
            if isinstance(batch, BaseException):
                raise batch
            yield batch
    finally:
        stop.set()
        while worker.is_alive():  # unblock a producer waiting on a full queue
            try:
                slots.get_nowait()
            except queue.Empty:
                worker.join(timeout=0.05)


# ---------------------------------------------------------------------------------------------
# Detection

@dataclass
class Detections:
    """Valid detections of one image: class indices, scores, xyxy boxes in original pixels."""

    key: object
    ids: np.ndarray  # (k,) int64
    scores: np.ndarray  # (k,) float32
    boxes: np.ndarray  # (k, 4) float32


@dataclass
class BatchResult:
    """Detections of one batch and its compute latency (forward + copy-out) in seconds."""

    detections: list[Detections]
    seconds: float


def run_network(net, data: np.ndarray):
    """Forward one batch; returns (ids, scores, bboxes) as numpy arrays."""
    import mxnet as mx

    ids, scores, bboxes = net(mx.nd.array(data, ctx=mx.cpu()))
    return ids.asnumpy(), scores.asnumpy(), bboxes.asnumpy()


def to_detections(key, ids: np.ndarray, scores: np.ndarray, boxes: np.ndarray,
                  size: tuple[int, int], data_shape: int) -> Detections:
    """One image's raw rows → valid rows with boxes rescaled to the original (height, width)."""
    keep = ids.reshape(-1) >= 0
    h, w = size
    scale = np.array([w, h, w, h], np.float32) / np.float32(data_shape)
    return Detections(key, ids.reshape(-1)[keep].astype(np.int64),
                      scores.reshape(-1)[keep].astype(np.float32),
                      boxes.reshape(-1, 4)[keep].astype(np.float32) * scale)


def detect_batches(net, items: Sequence[ImageItem], meta: dict, batch_size: int,
                   prefetch: int = 2) -> Iterator[BatchResult]:
    """Detect on ``items`` batch by batch, images loaded ``prefetch`` batches ahead by a thread
    (0: in the caller's thread). Yields one BatchResult per batch, in order."""
    size = int(meta["data_shape"])
    for batch in iter_batches(items, size, meta["mean"], meta["std"], batch_size, prefetch):
        start = time.perf_counter()
        ids, scores, boxes = run_network(net, batch.data)
        seconds = time.perf_counter() - start
        dets = [to_detections(k, ids[i], scores[i], boxes[i], batch.sizes[i], size)
                for i, k in enumerate(batch.keys)]
        yield BatchResult(dets, seconds)


def detect_all(net, items: Sequence[ImageItem], meta: dict, batch_size: int,
               desc: str = "detect") -> tuple[list[Detections], list[float], float]:
    """Detect on every item with a progress bar → (detections in item order, per-batch compute
    seconds, wall seconds end to end)."""
    from tqdm import tqdm

    detections: list[Detections] = []
    seconds: list[float] = []
    start = time.perf_counter()
    with tqdm(total=len(items), desc=desc, unit="img", disable=None) as bar:
        for result in detect_batches(net, items, meta, batch_size):
            detections.extend(result.detections)
            seconds.append(result.seconds)
            bar.update(len(result.detections))
    return detections, seconds, time.perf_counter() - start


def subgraph_backend() -> str:
    """The oneDNN subgraph backend MXNet runs graphs with (for provenance records)."""
    return os.environ.get("MXNET_SUBGRAPH_BACKEND", "MKLDNN (default)")
