"""Speed of COCO evaluation: the model alone, the evaluate stage, GluonCV's own loop; FP32, INT8, BF16.

    python benchmarks/bench_coco.py                       # seed head, batches 1 8 64, ~25 min
    python benchmarks/bench_coco.py --batches 8 --images 64 --out bench.json

Everything below comes from one run on this machine, each measurement in a fresh child process
with --threads OpenMP threads (so its peak memory is its own), on --images generated COCO-sized
scenes (640x480 JPEGs of ~150 kB like val2017's) with a COCO annotation file of the 80 real
categories. Modes (rows of --out):

- ``model``: the exported detector alone (body + head) on a preprocessed batch in memory, as
  many forward passes as the dataset has batches: the floor the stage is measured against;
- ``stage``: ``stages.evaluate_coco.main`` as ``dvc repro`` runs it, from importing its module
  (and, inside it, MXNet): model and annotation loading, JPEG decoding, preprocessing, forward,
  COCO results, scoring (``--scorer``) and writing every output (metrics, speed,
  detections.json, per-class and PR tables, samples, provenance); its summary stats are kept
  to compare accuracy;
- ``gluoncv``: GluonCV's own evaluation loop re-created (``scripts/detection/ssd/eval_ssd.py``
  with ``--deploy``: ``SymbolBlock.imports`` + ``hybridize(static_alloc, static_shape)``,
  ``COCODetection(skip_empty=False)``, ``DataLoader`` over ``SSDDefaultValTransform`` with
  ``Tuple(Stack(), Pad(pad_val=-1))``, ``last_batch='rollover'``, ``num_workers`` 0 and 4 (its
  default), boxes clipped to the input size, ``COCODetectionMetric`` with ``data_shape``), on the
  same exported model, images, batch size and threads, timed from importing MXNet and GluonCV
  as the stage is from importing its module;
- ``e2e``: the stage's detection loop alone (``detect_batches`` + COCO results), no scoring;
- ``parts`` (at --parts-batch): body alone vs the whole model (the head's cost) and the CPU time
  of loading one image, for the breakdown.

``--repeats``: best of that many runs; for stage and GluonCV each run is a fresh process (it
imports and sets up again, as a real run does). ``--images 5000 --distinct 512``: a
val2017-sized set from 512 scenes (the other files are byte copies), where the fixed costs
(imports, model loading, the first forward) weigh what they weigh on val2017.

Ground truth: the images are generated scenes, and random weights detect nothing in them, so
every mAP would be 0 and "identical mAP" meaningless. The annotations are therefore the FP32
model's own detections on each image (those scoring >= 0.1, at least the best 3: pseudo ground
truth): the mAP is far from 0 and any difference in preprocessing, box rescaling or scoring
between two loops shows up in it.

Weights: SSD300-VGG16-COCO with random weights shaped like a trained detector's
(``stages.models.init_like_trained``), so the head sees as many candidates as with trained
weights (printed). Speed depends on the weights only through that number.

Precisions are a list (``PRECISIONS``): a new one needs an entry there (how to make its model
from the FP32 one) and nothing else here. BF16 (``stages.bf16``, MXNet AMP) needs a CPU with BF16
instructions (avx512_bf16 or amx_bf16): without them the run stops before measuring, as the
pipeline's bf16 stages do (``--precisions fp32 int8`` measures without it). The precisions of one
configuration (head, batch, mode) are measured back to back, so their ratios share the moment's
load on a shared machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_coco_modes import peak_rss_mb, run_mode  # noqa: E402  (the child-process side)

NETWORK = "ssd_300_vgg16_atrous_coco"
SIZE = 300
PSEUDO_GT_SCORE = 0.1
PSEUDO_GT_MIN = 3  # per image: at least its best few detections, whatever their score
GLUONCV_WORKERS = (0, 4)
# The 80 category ids of COCO 2017 (not contiguous), in GluonCV's class order.
COCO_IDS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25,
            27, 28, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51,
            52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77,
            78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90]


def make_int8(fp32_prefix: Path, out: Path, calib: np.ndarray) -> None:
    """INT8 model from the FP32 one: naive calibration on ``calib``, as the quantize stage."""
    from stages.export import check_input, export_block
    from stages.inference import load_symbol_block
    from stages.quantization import quantize
    from stages.quantize import QuantizeParams

    qp = QuantizeParams(calib_mode="naive", calib_images=len(calib), batch_size=len(calib))
    # no logger: MXNet's per-layer calibration log is only switched on when one is given
    net = quantize(load_symbol_block(fp32_prefix), calib, SIZE, qp, None)
    export_block(net, out, check_input(SIZE))


def make_bf16(fp32_prefix: Path, out: Path, calib: np.ndarray) -> None:  # noqa: ARG001
    """BF16 model from the FP32 one, as the convert_bf16 stage makes it."""
    from stages.bf16 import export_bf16, to_bf16
    from stages.export import check_input
    from stages.inference import load_symbol_block

    x = check_input(SIZE)
    export_bf16(to_bf16(load_symbol_block(fp32_prefix), x), out, x)


# precision -> how to make its model from the FP32 export (None: the FP32 export itself)
PRECISIONS = {"fp32": None, "int8": make_int8, "bf16": make_bf16}
# the body/head split cuts the graph and loses a BF16 graph's casts: not measured for these
NO_PARTS = ("bf16",)


# ---------------------------------------------------------------------------------------------
# Preparation (parent process)

def make_dataset(root: Path, n: int, distinct: int = 0) -> tuple[Path, list[Path]]:
    """``n`` 640x480 JPEGs of generated scenes, ~150 kB each like val2017's (so decoding costs
    what it does there), in the COCO layout GluonCV's COCODetection reads (coco_url).

    ``distinct`` (0 = n): only that many different scenes; image i is a byte copy of scene
    i mod distinct, so a val2017-sized set does not need 5,000 FP32 passes for its pseudo
    ground truth. Every file is still read and decoded on its own."""
    from stages.synthetic import encode_jpeg, make_samples

    distinct = min(distinct or n, n)
    images = root / "val2017"
    images.mkdir(parents=True, exist_ok=True)
    scenes = [encode_jpeg(s.image[:480]) for s in make_samples(
        distinct, ["ellipse", "rectangle", "star", "cross"], 640, 6, seed=3, noise=32)]
    paths = []
    for i in range(n):
        path = images / f"{i + 1:012d}.jpg"
        path.write_bytes(scenes[i % distinct])
        paths.append(path)
    return images, paths


def write_pseudo_ground_truth(root: Path, paths: list[Path], fp32_prefix: Path,
                              batch: int, distinct: int = 0) -> Path:
    """instances_val2017.json: the 80 COCO categories and, as objects, the FP32 model's own
    detections scoring >= PSEUDO_GT_SCORE, and at least each image's best PSEUDO_GT_MIN (COCO
    xywh, width x2 - x1 + 1 as GluonCV writes). With ``distinct`` scenes (``make_dataset``)
    the model runs on those and each copy gets its scene's objects."""
    from gluoncv.data import COCODetection

    from stages.inference import ImageItem, detect_batches, load_detector

    distinct = min(distinct or len(paths), len(paths))
    net, meta = load_detector(fp32_prefix)
    items = [ImageItem(i, p) for i, p in enumerate(paths[:distinct])]
    coco_ids = COCO_IDS
    objects = []  # per scene: (category id, [x, y, w, h], area)
    for result in detect_batches(net, items, meta, batch):
        for det in result.detections:
            objects.append([])
            for rank, (cls, score, (x1, y1, x2, y2)) in enumerate(
                    zip(det.ids, det.scores, det.boxes.astype(float))):  # by score
                if score >= PSEUDO_GT_SCORE or rank < PSEUDO_GT_MIN:
                    w, h = x2 - x1 + 1, y2 - y1 + 1
                    objects[-1].append((coco_ids[int(cls)], [round(x1, 2), round(y1, 2),
                                                             round(w, 2), round(h, 2)],
                                        round(w * h, 2)))
    images, annotations = [], []
    for i, path in enumerate(paths):
        images.append({"id": i + 1, "file_name": path.name, "width": 640, "height": 480,
                       "coco_url": f"http://images.cocodataset.org/val2017/{path.name}"})
        for category, bbox, area in objects[i % distinct]:
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1,
                                "category_id": category, "iscrowd": 0, "bbox": list(bbox),
                                "area": area})
    categories = [{"id": cid, "name": name, "supercategory": "thing"}
                  for cid, name in zip(coco_ids, COCODetection.CLASSES)]
    path = root / "annotations" / "instances_val2017.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": categories}))
    return path


def prepare_models(folder: Path, heads: list[str], precisions: list[str],
                   calib_paths: list[Path]) -> dict:
    """Export FP32 models with each head and derive the other precisions;
    return {(head, precision): prefix}."""
    from stages.export import check_input, export_block
    from stages.heads import HeadSpec, make_detector
    from stages.inference import ImageItem, load_batch
    from stages.models import GLUONCV_MEAN, GLUONCV_STD, build_network, init_like_trained

    folder.mkdir(parents=True, exist_ok=True)
    calib = load_batch([ImageItem(p.name, p) for p in calib_paths], SIZE, GLUONCV_MEAN,
                       GLUONCV_STD).data
    prefixes = {}
    for head in heads:
        ssd = build_network(NETWORK)
        init_like_trained(ssd)
        spec = HeadSpec("gluoncv", prefilter_topk=False) if head == "gluoncv-stock" else \
            HeadSpec(head)
        fp32 = folder / f"{head}-fp32"
        export_block(make_detector(ssd, spec, SIZE), fp32, check_input(SIZE))
        meta = {"network": NETWORK, "classes": list(ssd.classes), "data_shape": SIZE,
                "head": head, "mean": list(GLUONCV_MEAN), "std": list(GLUONCV_STD)}
        # the FP32 model is always made: the pseudo ground truth and the other precisions
        # come from it, so --precisions int8 alone works
        Path(f"{fp32}-meta.json").write_text(json.dumps({**meta, "precision": "fp32"}))
        for precision in precisions:
            prefix = folder / f"{head}-{precision}"
            if PRECISIONS[precision] is not None:
                PRECISIONS[precision](fp32, prefix, calib)
                Path(f"{prefix}-meta.json").write_text(json.dumps({**meta, "precision": precision}))
            prefixes[(head, precision)] = prefix
    return prefixes


def candidate_counts(paths: list[Path]) -> tuple[float, float]:
    """Mean (anchor, class) pairs per image with probability > 0.01 and > 0.05."""
    import mxnet as mx

    from stages.inference import ImageItem, load_batch
    from stages.models import GLUONCV_MEAN, GLUONCV_STD, build_network, init_like_trained

    ssd = build_network(NETWORK)
    init_like_trained(ssd)
    batch = load_batch([ImageItem(p.name, p) for p in paths], SIZE, GLUONCV_MEAN, GLUONCV_STD)
    feats = ssd.features(mx.nd.array(batch.data))
    logits = mx.nd.concat(*[mx.nd.flatten(mx.nd.transpose(cp(f), (0, 2, 3, 1)))
                            for f, cp in zip(feats, ssd.class_predictors)], dim=1)
    probs = mx.nd.softmax(logits.reshape((0, -1, ssd.num_classes + 1)), axis=-1).asnumpy()
    fg = probs[:, :, 1:]
    return float((fg > 0.01).sum() / len(paths)), float((fg > 0.05).sum() / len(paths))


def run_worker(job: dict, threads: int) -> dict:
    """Run one measurement in a fresh process with ``threads`` OpenMP threads (and the
    ``stages`` package of ``job['src']`` instead of this checkout's, if given)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MXNET_CPU_WORKER_NTHREADS="1")
    if job.get("src"):
        env["PYTHONPATH"] = job["src"]
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], env=env,
                          capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"worker {job} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# modes whose time includes imports and setup: each repeat is a fresh process (a second run
# in the same process would find everything imported)
FRESH_EACH_RUN = ("stage", "stage-before", "gluoncv")


def measure(job: dict, threads: int, repeats: int) -> dict:
    """The best of ``repeats`` runs of ``job``: in one worker process for the modes that
    exclude warm-up (model, e2e, parts), one process per run for ``FRESH_EACH_RUN``."""
    if job["mode"] not in FRESH_EACH_RUN:
        return run_worker({**job, "repeats": repeats}, threads)
    runs = [run_worker({**job, "repeats": 1}, threads) for _ in range(repeats)]
    return min(runs, key=lambda r: r["seconds"])


def export_source(rev: str, dest: Path) -> Path:
    """The ``stages`` package as of git revision ``rev``, extracted under ``dest``."""
    dest.mkdir(parents=True)
    repo = Path(__file__).resolve().parents[1]
    archive = subprocess.run(["git", "archive", rev, "stages"], cwd=repo, check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def machine() -> str:
    """CPU model, the instruction-set flags that matter for these numbers, cores, load."""
    model, flags = platform.processor() or "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16",
              "amx_bf16", "amx_int8")
    return (f"{model}, {os.cpu_count()} cores; flags: "
            f"{' '.join(f for f in wanted if f in flags) or 'none of ' + ' '.join(wanted)}")


# ---------------------------------------------------------------------------------------------
# The table

def ratio(a, b) -> str:
    return f"{a / b:.2f}" if a and b else "-"


def running(stage: dict) -> float:
    """The stage's seconds without importing its module and its setup (reading params and
    annotations, importing MXNet, loading the model): what grows with the dataset. Over
    val2017's 5,000 images these are ~1 %."""
    phases = stage.get("phases", {})
    return stage["seconds"] - phases.get("import", 0.0) - phases.get("setup", 0.0)


def report(rows: list[dict], heads: list[str], precisions: list[str],
           batches: list[int]) -> str:
    """One table with every ratio the goals name, then where the stage's time went."""
    find = {(r["head"], r["precision"], r["batch"], r["mode"], r.get("loader_workers")): r
            for r in rows}

    def get(h, p, b, mode, workers=None):
        return find.get((h, p, b, mode, workers))

    lines = ["| head | precision | batch | model img/s | stage img/s | stage/model time, "
             "whole / without setup (goal <= 1.05) | stage import + setup s | GluonCV loop img/s "
             "(workers 0 / 4) | stage speed-up vs GluonCV's best (goal >= 1.2 INT8 b8, >= 1 "
             "else) | summary stats equal to GluonCV's | stage speed over FP32, whole / without "
             "setup (goal INT8 >= 3.5, BF16 >= 1.3) | stage speed-up vs before (--before) | "
             "peak MB at batch 64: "
             "model / stage / before / GluonCV (w0, w4) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for h in heads:
        for p in precisions:
            mem = [get(h, p, 64, m, w) for m, w in (("model", None), ("stage", None),
                                                    ("stage-before", None),
                                                    ("gluoncv", GLUONCV_WORKERS[0]),
                                                    ("gluoncv", GLUONCV_WORKERS[1]))]
            mem_text = " / ".join(f"{r['peak_rss_mb']:.0f}" if r else "-" for r in mem[:3])
            mem_text += " / " + ", ".join(f"{r['peak_rss_mb']:.0f}" if r else "-"
                                          for r in mem[3:])
            for b in batches:
                model, stage = get(h, p, b, "model"), get(h, p, b, "stage")
                if not (model and stage):
                    continue
                forward = stage["images"] / model["images_per_s"]
                gl = [get(h, p, b, "gluoncv", w) for w in GLUONCV_WORKERS]
                gl_text = " / ".join(f"{g['images_per_s']:.2f}" if g else "-" for g in gl)
                best = max((g for g in gl if g), key=lambda g: g["images_per_s"], default=None)
                equal = "-" if not best else "yes" if best["stats"] == stage["stats"] else \
                    f"no: AP {stage['stats'][0]:.6f} vs {best['stats'][0]:.6f}"
                before = get(h, p, b, "stage-before")
                vs_before = ratio(before["seconds"], stage["seconds"]) if before else "-"
                fp32 = get(h, "fp32", b, "stage")
                q = (f"{ratio(fp32['seconds'], stage['seconds'])} / "
                     f"{ratio(running(fp32), running(stage))}") if fp32 and p != "fp32" else "-"
                lines.append(
                    f"| {h} | {p} | {b} | {model['images_per_s']:.2f} | "
                    f"{stage['images_per_s']:.2f} | {ratio(stage['seconds'], forward)} / "
                    f"{ratio(running(stage), forward)} | "
                    f"{stage['seconds'] - running(stage):.1f} | {gl_text} | "
                    f"{ratio(best['seconds'], stage['seconds']) if best else '-'} | "
                    f"{equal} | {q} | {vs_before} | {mem_text} |")
    lines.append("")
    for r in rows:
        model = get(r["head"], r["precision"], r["batch"], "model")
        if r["mode"] == "stage" and r.get("phases") and model:
            lines.append(f"- stage {r['head']} {r['precision']} b{r['batch']}: "
                         + ", ".join(f"{k} {v:.2f} s" for k, v in r["phases"].items())
                         + f"; the model alone over the same images "
                         f"{r['images'] / model['images_per_s']:.2f} s")
        if r["mode"] == "parts":
            lines.append(f"- parts {r['head']} {r['precision']} b{r['batch']}: model "
                         f"{r['model_ms_per_image']:.1f} ms/img = body "
                         f"{r['body_ms_per_image']:.1f} + head {r['head_ms_per_image']:.1f}; "
                         f"loading one image {r['load_cpu_ms_per_image']:.2f} ms CPU (decode + "
                         f"preprocess)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--heads", nargs="+", default=["seed"],
                        choices=["seed", "gluoncv", "gluoncv-stock"],
                        help="gluoncv-stock: GluonCV's own head graph (no top-k prefilter)")
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS),
                        choices=list(PRECISIONS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 64])
    parser.add_argument("--images", type=int, default=128,
                        help="dataset size (a multiple of every batch size keeps batches whole)")
    parser.add_argument("--distinct", type=int, default=0,
                        help="different scenes among --images (0 = all): the others are byte "
                             "copies, e.g. --images 5000 --distinct 512 for a val2017-sized "
                             "run without 5,000 FP32 passes for the pseudo ground truth")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=2, help="passes per measurement (best)")
    parser.add_argument("--scorer", default="default",
                        help="evaluate.coco.scorer for the stage ('default': the one params.yaml sets)")
    parser.add_argument("--parts-batch", type=int, default=8,
                        help="batch of the body/head split")
    parser.add_argument("--e2e", action="store_true",
                        help="also time the detection loop alone (detect_batches + results)")
    parser.add_argument("--gluoncv", action=argparse.BooleanOptionalAction, default=True,
                        help="also run GluonCV's own loop")
    parser.add_argument("--before", metavar="REV",
                        help="also run the stage as of git revision REV (mode stage-before)")
    parser.add_argument("--out", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        job = json.loads(args.worker)
        result = run_mode(job)
        result["peak_rss_mb"] = peak_rss_mb()
        result["load_end"] = os.getloadavg()[0]
        print(json.dumps(result))
        return

    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    if "bf16" in args.precisions:
        from stages.bf16 import read_cpuinfo, require_bf16
        from stages.common import StageError

        try:
            require_bf16(read_cpuinfo())  # no point timing emulated bfloat16
        except StageError as exc:
            sys.exit(f"{exc}\n(measure without it: --precisions fp32 int8)")
    started = time.time()
    print(f"{machine()}\nload average at start {os.getloadavg()[0]:.2f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_coco_") as tmp:
        root = Path(tmp)
        images, paths = make_dataset(root / "coco", args.images, args.distinct)
        above01, above05 = candidate_counts(paths[:8])
        print(f"candidates per image: {above01:.0f} above 0.01, {above05:.0f} above 0.05 "
              f"(of {8732 * 80} anchor-class pairs)", flush=True)
        prefixes = prepare_models(root / "models", args.heads, args.precisions, paths[:8])
        annotations = write_pseudo_ground_truth(root / "coco", paths,
                                                root / "models" / f"{args.heads[0]}-fp32", 8,
                                                args.distinct)
        print(f"dataset: {len(paths)} images ({args.distinct or len(paths)} distinct), "
              f"{len(json.loads(annotations.read_text())['annotations'])} pseudo ground-truth "
              f"objects; prepared in {time.time() - started:.0f} s", flush=True)
        rows = []
        before = str(export_source(args.before, root / "before")) if args.before else None
        common = {"images_dir": str(images), "annotations": str(annotations),
                  "repeats": args.repeats, "threads": args.threads, "scorer": args.scorer, "work": str(root / "work")}
        for head in args.heads:
            for b in args.batches:
                modes = [("model", None), ("stage", None)] + [("e2e", None)] * args.e2e
                if args.before:
                    modes.append(("stage-before", None))
                if args.gluoncv:
                    modes += [("gluoncv", w) for w in GLUONCV_WORKERS]
                for mode, workers in modes:
                    for precision in args.precisions:  # back to back: the same load
                        job = {**common, "prefix": str(prefixes[(head, precision)]),
                               "head": head, "precision": precision, "batch": b, "mode": mode,
                               "loader_workers": workers,
                               "src": before if mode == "stage-before" else None}
                        rows.append(measure(job, args.threads, args.repeats))
                        print(json.dumps({k: v for k, v in rows[-1].items()
                                          if not k.startswith("stats")}), flush=True)
            for precision in [p for p in args.precisions if p not in NO_PARTS]:
                job = {**common, "prefix": str(prefixes[(head, precision)]), "head": head,
                       "precision": precision, "batch": args.parts_batch, "mode": "parts"}
                rows.append(run_worker(job, args.threads))
                print(json.dumps(rows[-1]), flush=True)
    print(f"\n{machine()}; {args.threads} OpenMP threads; {args.images} images; load average "
          f"at the end {os.getloadavg()[0]:.2f} (other processes skew absolute numbers); "
          f"total {time.time() - started:.0f} s\n")
    print(report(rows, args.heads, args.precisions, sorted(set(args.batches))))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
