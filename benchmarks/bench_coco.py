"""Throughput of the COCO detector, FP32 vs INT8: model only and end to end, batch 1/8/64.

    python benchmarks/bench_coco.py                              # seed head, batches 1 8 64
    python benchmarks/bench_coco.py --heads seed gluoncv gluoncv-stock --out bench.json

What it measures, all in one run on this machine (each configuration in a fresh child process
with --threads OpenMP threads, so its peak memory is its own):

- model: images/s of the symbolic detector (body + detection head) on a batch in memory;
- e2e: images/s of the evaluate stage's loop (``stages.inference.detect_batches``: JPEG decode
  and GluonCV SSD val preprocessing in a prefetch thread, forward, rescaling) plus the
  conversion to COCO results, over 640x480 JPEG files drawn by ``stages.synthetic``;
- e2e-serial (at --parts-batch): the same with loading in the caller's thread (no overlap);
- parts (at --parts-batch): the body alone (the graph cut before the head) vs the whole model,
  i.e. what the FP32 decode + NMS costs after the body, and the one-thread cost of loading and
  preprocessing an image;
- the INT8/FP32 ratio of each, and peak resident memory (VmHWM: ``getrusage``'s ru_maxrss would
  carry the parent's peak over fork+exec).

Heads: ``seed`` (MultiBoxDetection), ``gluoncv`` (GluonCV's per-class NMS with the top-k
prefilter, the default) and ``gluoncv-stock`` (GluonCV's own graph, for the before/after).

Weights: SSD300-VGG16-COCO with random weights shaped like a trained detector's
(``stages.models.init_like_trained``). Plain random initialisation gives every (anchor, class)
pair a probability near 1/81 > 0.01, so all 8732 x 80 candidates pass the score threshold and
NMS sorts ~700k boxes per image -- far slower than real. Here each class predictor is rescaled
so its logits have standard deviation 1.5 and its background channels get a +9 bias: most
anchors are confidently background and only a tail of (anchor, class) pairs pass 0.01; their
number per image (above 0.01 and 0.05) is printed, to compare with a trained model's.

Caveat: speed depends on the weights only through the number of candidates the head sees, so
the ratios carry over to trained weights, but absolute numbers depend on the CPU (this one has
AVX-512 VNNI, which INT8 convolutions use) and on whatever else runs on it: the load average is
printed at the start and the end.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

NETWORK = "ssd_300_vgg16_atrous_coco"
SIZE = 300


# ---------------------------------------------------------------------------------------------
# Preparation (parent process)

def make_images(folder: Path, n: int) -> list[Path]:
    """``n`` 640x480 JPEGs of generated scenes (COCO-sized, so decoding costs what it does)."""
    import cv2

    from stages.synthetic import encode_jpeg, make_samples

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in make_samples(n, ["ellipse", "rectangle", "star", "cross"], 320, 6, seed=3):
        path = folder / f"{s.name}.jpg"
        path.write_bytes(encode_jpeg(cv2.resize(s.image, (640, 480))))
        paths.append(path)
    return paths


def candidate_counts(ssd, paths: list[Path]) -> tuple[float, float]:
    """Mean (anchor, class) pairs per image with probability > 0.01 and > 0.05."""
    import mxnet as mx

    from stages.inference import ImageItem, load_batch
    from stages.models import GLUONCV_MEAN, GLUONCV_STD

    batch = load_batch([ImageItem(p.name, p) for p in paths], SIZE, GLUONCV_MEAN, GLUONCV_STD)
    x = mx.nd.array(batch.data)
    feats = ssd.features(x)
    logits = mx.nd.concat(*[mx.nd.flatten(mx.nd.transpose(cp(f), (0, 2, 3, 1)))
                            for f, cp in zip(feats, ssd.class_predictors)], dim=1)
    probs = mx.nd.softmax(logits.reshape((0, -1, ssd.num_classes + 1)), axis=-1).asnumpy()
    fg = probs[:, :, 1:]
    return float((fg > 0.01).sum() / len(paths)), float((fg > 0.05).sum() / len(paths))


def prepare_models(folder: Path, heads: list[str], calib: list[Path]) -> dict:
    """Export FP32 models with each head and quantize them; return {(head, precision): prefix}."""
    from stages.export import check_input, export_block
    from stages.heads import HeadSpec, make_detector
    from stages.inference import ImageItem, load_batch, load_symbol_block
    from stages.models import GLUONCV_MEAN, GLUONCV_STD, build_network, init_like_trained
    from stages.quantization import quantize
    from stages.quantize import QuantizeParams

    folder.mkdir(parents=True, exist_ok=True)
    prefixes = {}
    calib_data = load_batch([ImageItem(p.name, p) for p in calib], SIZE, GLUONCV_MEAN,
                            GLUONCV_STD).data
    qp = QuantizeParams(calib_mode="naive", calib_images=len(calib),
                                 batch_size=len(calib))
    for head in heads:
        ssd = build_network(NETWORK)
        init_like_trained(ssd)
        spec = HeadSpec("gluoncv", prefilter_topk=False) if head == "gluoncv-stock" else \
            HeadSpec(head)
        det = make_detector(ssd, spec, SIZE)
        fp32 = folder / f"{head}-fp32"
        export_block(det, fp32, check_input(SIZE))
        # no logger: MXNet's per-layer calibration log is only switched on when one is given
        int8_net = quantize(load_symbol_block(fp32), calib_data, SIZE, qp, None)
        int8 = folder / f"{head}-int8"
        export_block(int8_net, int8, check_input(SIZE))
        meta = {"network": NETWORK, "classes": list(ssd.classes), "data_shape": SIZE,
                "head": head, "mean": list(GLUONCV_MEAN), "std": list(GLUONCV_STD)}
        for precision, prefix in (("fp32", fp32), ("int8", int8)):
            Path(f"{prefix}-meta.json").write_text(json.dumps({**meta, "precision": precision}))
            prefixes[(head, precision)] = prefix
    return prefixes


def run_worker(job: dict, threads: int) -> dict:
    """Run one measurement in a fresh process with ``threads`` OpenMP threads."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MXNET_CPU_WORKER_NTHREADS="1")
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], env=env,
                          capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"worker {job} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# Measurements (child process)

def body_only(net_prefix: str):
    """The detector's graph cut before the head: outputs the two concats of raw predictions."""
    import mxnet as mx

    from stages.inference import load_symbol_block

    full = load_symbol_block(net_prefix)
    sym = mx.sym.load(f"{net_prefix}-symbol.json")
    internals = sym.get_internals()
    names = [n for n in internals.list_outputs() if n.startswith("concat") or "_concat" in n]
    cut = mx.sym.Group([internals[n] for n in names[:2]])
    block = mx.gluon.SymbolBlock(cut, mx.sym.var("data"), params=full.collect_params())
    return block, names[:2]


def best_times(fns: list, iters: int, warmup: bool = True) -> list[float]:
    """Best-of-``iters`` seconds per call of each of ``fns`` (after a warm-up call each), calls
    interleaved: the minimum discounts other processes' load, interleaving shares it out."""
    for fn in fns if warmup else []:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(iters):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def worker(job: dict) -> dict:
    import mxnet as mx

    from stages.coco_eval import to_coco_results
    from stages.inference import ImageItem, detect_batches, load_batch, load_detector

    net, meta = load_detector(job["prefix"])
    batch = job["batch"]
    paths = sorted(Path(job["images"]).glob("*.jpg"))
    result = {k: job[k] for k in ("head", "precision", "batch", "mode")}
    items = [ImageItem(i, p) for i, p in enumerate(paths)]
    x = mx.nd.array(load_batch(items[:batch], SIZE, meta["mean"], meta["std"]).data)
    if job["mode"] == "model":
        sec, = best_times([lambda: [o.asnumpy() for o in net(x)]], job["iters"])
        result["images_per_s"] = batch / sec
    elif job["mode"] in ("e2e", "e2e-serial"):
        items = items[:batch * job["iters"]]
        prefetch = 0 if job["mode"] == "e2e-serial" else 2

        def evaluate_loop():
            dets = []
            for res in detect_batches(net, items, meta, batch, prefetch=prefetch):
                dets.extend(res.detections)
            to_coco_results(dets, list(range(1, 81)), 0.05, True)

        [o.asnumpy() for o in net(x)]  # warm-up: graph and memory
        sec, = best_times([evaluate_loop], job["repeats"], warmup=False)
        result["images_per_s"] = len(items) / sec
    elif job["mode"] == "parts":
        body, _ = body_only(job["prefix"])
        body.hybridize(static_alloc=True, static_shape=True)
        full_s, body_s = best_times([lambda: [o.asnumpy() for o in net(x)],
                                     lambda: [o.asnumpy() for o in body(x)]], job["iters"])
        result.update(model_ms_per_image=1000 * full_s / batch,
                      body_ms_per_image=1000 * body_s / batch,
                      head_ms_per_image=1000 * (full_s - body_s) / batch)
        some = items[:16]
        load_s, = best_times([lambda: load_batch(some, SIZE, meta["mean"], meta["std"])], 2)
        result["load_ms_per_image"] = 1000 * load_s / len(some)
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def peak_rss_mb() -> float:
    """This process's peak resident memory. ``getrusage`` keeps the ru_maxrss of the parent
    across fork+exec (the parent holds several models), so the kernel's per-process high-water
    mark VmHWM is read first; getrusage is the fallback off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------------------------

def report(rows: list[dict], heads: list[str], batches: list[int]) -> str:
    lines = ["| head | mode | batch | FP32 img/s | INT8 img/s | INT8/FP32 | peak MB fp32/int8 |",
             "|---|---|---|---|---|---|---|"]
    find = {(r["head"], r["mode"], r["batch"], r["precision"]): r for r in rows}
    for head in heads:
        for mode in ("model", "e2e", "e2e-serial"):
            for b in batches:
                f, q = find.get((head, mode, b, "fp32")), find.get((head, mode, b, "int8"))
                if not (f and q):
                    continue
                lines.append(f"| {head} | {mode} | {b} | {f['images_per_s']:.2f} | "
                             f"{q['images_per_s']:.2f} | "
                             f"{q['images_per_s'] / f['images_per_s']:.2f}x | "
                             f"{f['peak_rss_mb']:.0f}/{q['peak_rss_mb']:.0f} |")
    for r in rows:
        if r["mode"] == "parts":
            lines.append(f"parts {r['head']} {r['precision']} batch {r['batch']}: "
                         f"model {r['model_ms_per_image']:.1f} ms/img = body "
                         f"{r['body_ms_per_image']:.1f} + head {r['head_ms_per_image']:.1f}; "
                         f"load+preprocess {r['load_ms_per_image']:.1f} ms/img (1 thread)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--heads", nargs="+", default=["seed"],
                        choices=["seed", "gluoncv", "gluoncv-stock"],
                        help="gluoncv-stock: GluonCV's own head graph (no top-k prefilter)")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 64])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--iters", type=int, default=3,
                        help="timed batches per measurement (best taken; e2e: batches per pass)")
    parser.add_argument("--repeats", type=int, default=2, help="e2e passes (best taken)")
    parser.add_argument("--parts-batch", type=int, default=8,
                        help="batch of the body/head split and of the e2e run without prefetch")
    parser.add_argument("--out", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    print(f"load average at start {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_coco_") as tmp:
        tmp = Path(tmp)
        started = time.time()
        paths = make_images(tmp / "images",
                            max(max(args.batches + [args.parts_batch]) * args.iters, 16))
        from stages.models import build_network, init_like_trained

        ssd = build_network(NETWORK)
        init_like_trained(ssd)
        above01, above05 = candidate_counts(ssd, paths[:8])
        print(f"candidates per image: {above01:.0f} above 0.01, {above05:.0f} above 0.05 "
              f"(of {8732 * 80} anchor-class pairs)", flush=True)
        prefixes = prepare_models(tmp / "models", args.heads, paths[:8])
        rows = []
        for (head, precision), prefix in prefixes.items():
            for mode in ("model", "e2e"):
                for b in args.batches:
                    job = {"prefix": str(prefix), "images": str(tmp / "images"), "head": head,
                           "precision": precision, "batch": b, "mode": mode,
                           "iters": args.iters if b > 1 else 4 * args.iters,
                           "repeats": args.repeats}
                    rows.append(run_worker(job, args.threads))
                    print(json.dumps(rows[-1]), flush=True)
            for mode in ("e2e-serial", "parts"):  # prefetch off; body vs head
                rows.append(run_worker({"prefix": str(prefix), "images": str(tmp / "images"),
                                        "head": head, "precision": precision, "mode": mode,
                                        "batch": args.parts_batch, "iters": args.iters,
                                        "repeats": args.repeats},
                                       args.threads))
                print(json.dumps(rows[-1]), flush=True)
    print(f"\n{args.threads} threads; load average at the end {os.getloadavg()[0]:.2f} "
          f"(other processes skew absolute numbers); total {time.time() - started:.0f} s\n")
    print(report(rows, args.heads, sorted(set(args.batches + [args.parts_batch]))))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
