"""The one inference path: load a symbolic detector, preprocess images, detect in batches.

Used by both evaluate stages and by the train stage's validation: ``detect_batches`` and
``detect_all`` work with any callable ``net`` mapping a (B, 3, S, S) float32 NDArray batch to
``(ids, scores, bboxes)`` — an exported detector (``load_detector``) or a Gluon SSD in inference
mode — and ``meta`` giving ``data_shape``, ``mean`` and ``std``.

MXNet is imported inside the functions, never at module level: ``configure_threads`` must run
before MXNet starts OpenMP, since OMP_NUM_THREADS is only read then.

Typical use::

    configure_threads(params.threads)
    meta = read_meta(prefix)
    images = [ImageItem(key, path), ...]
    with start_loading(images, meta, batch_size) as loader:  # decoding starts now ...
        net, meta = load_detector(prefix)                    # ... while MXNet loads the model
        for result in detect_batches(net, images, meta, batch_size, loader=loader):
            result.seconds                     # forward + copy-out time of this batch
            for det in result.detections:      # one per image, in input order
                det.key, det.ids, det.scores, det.boxes  # valid rows, boxes in original pixels
                det.network_boxes, det.image_size        # the same boxes in network-input pixels

``detect_batches(net, images, meta, batch_size)`` without a loader starts one itself.

Preprocessing is GluonCV's SSD validation transform (``SSDDefaultValTransform``): RGB image
resized to data_shape x data_shape (OpenCV, interpolation picked like ``imresize(interp=9)``:
area when shrinking both sides, cubic when enlarging both, else bilinear), scaled to 0..1,
normalised with the model's mean/std, CHW (``stages.images``: bit for bit that formula, in a few
OpenCV passes). Batches are loaded by low-priority threads while the network computes, and by the
caller when it has to wait for one (``stages.images.BatchLoader``).

Boxes are clipped to the network input, [0, data_shape], before they are rescaled to the image,
as GluonCV's ``eval_ssd.py`` and ``train_ssd.py`` (and the seed's fork) clip them
(``bboxes.clip(0, data_shape)``): GluonCV's stock head decodes without clipping, so a box
reaching past the image border would otherwise be scored with a lower IoU.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from stages.common import StageError
# the loading API, also imported from here by callers
from stages.images import (Batch, BatchLoader, ImageItem, Preprocessor, chunks,  # noqa: F401
                           read_bgr, resize_interpolation)

log = logging.getLogger(__name__)


def configure_threads(threads: int) -> int:
    """Use ``threads`` OpenMP threads (0 = all cores) for MXNet, one for OpenCV; returns n.

    Effective for the whole run only if called before MXNet is imported (OpenMP reads
    OMP_NUM_THREADS once); later it falls back to ``MXSetNumOMPThreads`` and says so.
    """
    n = threads or os.cpu_count() or 1
    os.environ["OMP_NUM_THREADS"] = str(n)
    # one engine worker: ops run one after the other, each using all n OpenMP threads
    os.environ.setdefault("MXNET_CPU_WORKER_NTHREADS", "1")
    # OpenCV's own thread pool would compete with those OpenMP threads: image work runs in the
    # loader threads of stages.images instead, one image per thread
    import cv2

    cv2.setNumThreads(1)
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
# Images (the loading itself lives in stages/images.py)

def read_image(path: str | Path) -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB."""
    return np.ascontiguousarray(read_bgr(path)[:, :, ::-1])


def preprocess(image: np.ndarray, data_shape: int, mean: Sequence[float],
               std: Sequence[float]) -> np.ndarray:
    """GluonCV SSD validation transform of an RGB uint8 image → (3, S, S) float32."""
    out = np.empty((3, data_shape, data_shape), np.float32)
    Preprocessor(data_shape, mean, std)(image, out, bgr=False)
    return out


def load_batch(items: Sequence[ImageItem], data_shape: int, mean, std) -> Batch:
    """Read and preprocess ``items`` into one Batch (in the caller's thread)."""
    return next(iter(BatchLoader(items, Preprocessor(data_shape, mean, std), max(len(items), 1),
                                 workers=0)))


# What a loader started before the model may decode ahead while the caller sets up: 128 MiB of
# preprocessed images (124 at 300 x 300), no more than two batches of 64 take anyway.
HEAD_START_BYTES = 128 << 20


def start_loading(items: Sequence[ImageItem], meta: dict, batch_size: int, prefetch: int = 2,
                  workers: int = 1) -> BatchLoader:
    """Start loading ``items`` for ``detect_batches(..., loader=...)`` now, before the model is
    loaded: its threads decode the first ``HEAD_START_BYTES`` of images on the core the caller's
    setup (importing MXNet, loading the model) leaves idle. Use it as a context manager, so a
    setup that fails stops the threads."""
    return BatchLoader(items, Preprocessor(int(meta["data_shape"]), meta["mean"], meta["std"]),
                       batch_size, workers=workers, ahead=prefetch,
                       head_start_bytes=HEAD_START_BYTES)


def iter_batches(items: Sequence[ImageItem], data_shape: int, mean, std, batch_size: int,
                 prefetch: int = 2, workers: int = 1) -> Iterator[Batch]:
    """Batches of ``items`` in order; ``workers`` low-priority threads load images up to
    ``prefetch`` batches ahead while the caller computes (``stages.images.BatchLoader``).
    ``prefetch=0``: the threads only help load the batch the caller is waiting for;
    ``workers=0``: everything is loaded in the caller's thread."""
    return iter(BatchLoader(items, Preprocessor(data_shape, mean, std), batch_size,
                            workers=workers, ahead=prefetch))


# ---------------------------------------------------------------------------------------------
# Detection

@dataclass
class Detections:
    """Valid detections of one image: class indices, scores, xyxy boxes in original pixels.

    ``network_boxes`` are the same boxes in the (data_shape x data_shape) network-input frame
    (clipped to it; ``boxes`` is them rescaled), ``image_size`` the image's (height, width) as
    decoded: the frame GluonCV's VOC evaluation scores in (``stages.voc``).
    """

    key: object
    ids: np.ndarray  # (k,) int64
    scores: np.ndarray  # (k,) float32
    boxes: np.ndarray  # (k, 4) float64
    network_boxes: np.ndarray | None = None  # (k, 4) float32, in [0, data_shape]
    image_size: tuple[int, int] | None = None  # (height, width)


@dataclass
class BatchResult:
    """Detections of one batch and its compute latency (forward + copy-out) in seconds."""

    detections: list[Detections]
    seconds: float


def run_network(net, data: np.ndarray, inputs: dict | None = None):
    """Forward one batch; returns (ids, scores, bboxes) as numpy arrays.

    ``inputs`` (a dict the caller keeps between calls) holds one input NDArray per batch shape,
    refilled in place instead of allocating one per batch.
    """
    import mxnet as mx

    if inputs is None:
        x = mx.nd.array(data, ctx=mx.cpu())
    else:
        x = inputs.get(data.shape)
        if x is None:
            x = inputs[data.shape] = mx.nd.empty(data.shape, ctx=mx.cpu())
        x[:] = data  # a synchronous copy: ``data`` may be reused once this returns
    ids, scores, bboxes = net(x)
    return ids.asnumpy(), scores.asnumpy(), bboxes.asnumpy()


def to_detections(key, ids: np.ndarray, scores: np.ndarray, boxes: np.ndarray,
                  size: tuple[int, int], data_shape: int) -> Detections:
    """One image's raw rows → valid rows, boxes clipped to the network input [0, data_shape]
    (as GluonCV's evaluation clips them) and rescaled to the original (height, width)."""
    keep = ids.reshape(-1) >= 0
    h, w = size
    # the rescale in float64, as GluonCV's COCODetectionMetric does it (x * (width / shape)),
    # so the boxes scored are GluonCV's to the last bit
    scale = np.array([w / data_shape, h / data_shape] * 2, np.float64)
    clipped = np.clip(boxes.reshape(-1, 4)[keep].astype(np.float32), 0, np.float32(data_shape))
    return Detections(key, ids.reshape(-1)[keep].astype(np.int64),
                      scores.reshape(-1)[keep].astype(np.float32),
                      clipped.astype(np.float64) * scale, clipped, (int(h), int(w)))


def detect_batches(net, items: Sequence[ImageItem], meta: dict, batch_size: int,
                   prefetch: int = 2, workers: int = 1,
                   loader: BatchLoader | None = None) -> Iterator[BatchResult]:
    """Detect on ``items`` batch by batch; yields one BatchResult per batch, in order.

    ``net`` is any block mapping a (B, 3, S, S) batch to (ids, scores, bboxes): a loaded
    symbolic detector or a Gluon network. Images are loaded by ``workers`` low-priority threads
    up to ``prefetch`` batches ahead, and by this thread when it would otherwise wait
    (``iter_batches``); or by ``loader``, one ``start_loading`` started on the same ``items``
    and ``batch_size`` earlier.
    """
    size = int(meta["data_shape"])
    inputs: dict = {}
    if loader is not None and not loader.covers(items, batch_size):
        raise ValueError("loader was started on other items or another batch size")
    batches = loader if loader is not None else iter_batches(
        items, size, meta["mean"], meta["std"], batch_size, prefetch, workers)
    for batch in batches:
        start = time.perf_counter()
        ids, scores, boxes = run_network(net, batch.data, inputs)
        seconds = time.perf_counter() - start
        dets = [to_detections(k, ids[i], scores[i], boxes[i], batch.sizes[i], size)
                for i, k in enumerate(batch.keys)]
        yield BatchResult(dets, seconds)


def detect_all(net, items: Sequence[ImageItem], meta: dict, batch_size: int,
               desc: str = "detect", loader: BatchLoader | None = None
               ) -> tuple[list[Detections], list[float], float]:
    """Detect on every item with a progress bar → (detections in item order, per-batch compute
    seconds, wall seconds end to end); ``loader`` as in ``detect_batches``."""
    from tqdm import tqdm

    detections: list[Detections] = []
    seconds: list[float] = []
    start = time.perf_counter()
    with tqdm(total=len(items), desc=desc, unit="img", disable=None) as bar:
        for result in detect_batches(net, items, meta, batch_size, loader=loader):
            detections.extend(result.detections)
            seconds.append(result.seconds)
            bar.update(len(result.detections))
    return detections, seconds, time.perf_counter() - start


def subgraph_backend() -> str:
    """The oneDNN subgraph backend MXNet runs graphs with (for provenance records)."""
    return os.environ.get("MXNET_SUBGRAPH_BACKEND", "MKLDNN (default)")
