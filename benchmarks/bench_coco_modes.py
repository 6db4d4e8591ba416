"""The child-process side of bench_coco.py: one measurement per process (see its docstring)."""
from __future__ import annotations

import json
import math
import resource
import shutil
import time
from pathlib import Path

import yaml

SIZE = 300
# the metrics file's keys of COCOeval's 12 stats (a stable contract; also read from old code)
STAT_KEYS = ("map", "map50", "map75", "map_small", "map_medium", "map_large",
             "ar1", "ar10", "ar100", "ar_small", "ar_medium", "ar_large")


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


def percent_stats(stats) -> list[float]:
    """COCOeval stats as the metrics file writes them: percent, 6 decimals, -1 kept."""
    return [round(float(v) * 100.0, 6) if v >= 0 else -1.0 for v in stats]


def best_of(repeats: int, fn) -> float:
    """Fewest seconds of ``repeats`` calls of ``fn``: the minimum discounts other processes."""
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def image_paths(job: dict) -> list[Path]:
    return sorted(Path(job["images_dir"]).glob("*.jpg"))


def mode_model(job: dict) -> dict:
    """The detector alone: one forward per batch of the dataset, on a batch held in memory."""
    import mxnet as mx

    from stages.inference import ImageItem, load_batch, load_detector

    net, meta = load_detector(job["prefix"])
    paths, b = image_paths(job), job["batch"]
    x = mx.nd.array(load_batch([ImageItem(i, p) for i, p in enumerate(paths[:b])], SIZE,
                               meta["mean"], meta["std"]).data)
    batches = math.ceil(len(paths) / b)

    def forward_all():
        for _ in range(batches):
            for out in net(x):
                out.asnumpy()

    [o.asnumpy() for o in net(x)]  # warm-up: graph and memory
    seconds = best_of(job["repeats"], forward_all)
    return {"images_per_s": batches * b / seconds, "images": batches * b, "seconds": seconds}


def stage_params(job: dict) -> dict:
    coco = {"batch_size": job["batch"], "threads": job["threads"], "samples": 8, "max_images": 0,
            "score_thresh": 0.05, "xywh_plus_one": True, "draw_thresh": 0.3}
    scorer = job.get("scorer", "default")
    if scorer == "default":  # what the project's params.yaml runs (if this code knows the key)
        project = Path(__file__).resolve().parents[1] / "params.yaml"
        scorer = yaml.safe_load(project.read_text())["evaluate"]["coco"].get("scorer")
    if scorer and job["mode"] == "stage":  # an older revision may not know the key
        coco["scorer"] = scorer
    return {"evaluate": {"coco": coco}}


def mode_stage(job: dict) -> dict:
    """``stages.evaluate_coco.main`` in this process, from importing the stage's module to every
    output written: what ``python -m stages.evaluate_coco`` does after the interpreter starts
    (the parent runs each repeat in a fresh process, so every run imports)."""
    import os

    work = Path(job["work"]) / f"{job['mode']}-{job['head']}-{job['precision']}-{job['batch']}"
    work.mkdir(parents=True, exist_ok=True)
    (work / "params.yaml").write_text(yaml.safe_dump(stage_params(job)))
    out = work / "out"
    argv = ["coco", job["precision"], "--model", job["prefix"], "--images", job["images_dir"],
            "--annotations", job["annotations"], "--metrics", str(out / "metrics.json"),
            "--speed", str(out / "speed.json"), "--eval-dir", str(out / "eval")]
    old = os.getcwd()
    os.chdir(work)
    runs = []  # (seconds, speed file) of each pass: the fastest one is reported

    def run():
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        from stages import evaluate_coco  # pylint: disable=import-outside-toplevel
        from stages.common import run_stage  # pylint: disable=import-outside-toplevel

        imported = time.perf_counter() - start
        if run_stage(evaluate_coco.main, argv):
            raise RuntimeError("the evaluate stage failed")
        runs.append((time.perf_counter() - start, json.loads((out / "speed.json").read_text()),
                     imported))

    try:
        for _ in range(job["repeats"]):
            run()
    finally:
        os.chdir(old)
    seconds, speed, imported = min(runs, key=lambda r: r[0])
    from stages import evaluate_coco  # pylint: disable=import-outside-toplevel
    metrics = json.loads((out / "metrics.json").read_text())
    result = {"images_per_s": metrics["images"] / seconds, "images": metrics["images"],
              "seconds": seconds, "stats": [metrics[k] for k in STAT_KEYS],
              "loop_images_per_s": speed["images_per_s"]}
    phases = {k[:-2]: v for k, v in speed.items() if k.endswith("_s") and k != "images_per_s"}
    if phases:
        phases = {"import": imported, **phases}
        result["phases"] = phases
    provenance = json.loads((out / "eval" / "provenance.json").read_text())
    result["scorer"] = provenance.get("params", {}).get("scorer", "pycocotools")
    result["stages_from"] = str(Path(evaluate_coco.__file__).parent)
    return result


def mode_e2e(job: dict) -> dict:
    """The stage's detection loop alone: decode, preprocess, forward, COCO results."""
    import mxnet as mx

    from stages.coco_eval import to_coco_results
    from stages.inference import ImageItem, detect_batches, load_detector

    net, meta = load_detector(job["prefix"])
    items = [ImageItem(i, p) for i, p in enumerate(image_paths(job), start=1)]
    x = mx.nd.zeros((job["batch"], 3, SIZE, SIZE))
    [o.asnumpy() for o in net(x)]  # warm-up: graph and memory

    def loop():
        dets = []
        for res in detect_batches(net, items, meta, job["batch"]):
            dets.extend(res.detections)
        to_coco_results(dets, list(range(1, 81)), 0.05, True)

    seconds = best_of(job["repeats"], loop)
    return {"images_per_s": len(items) / seconds, "images": len(items), "seconds": seconds}


def mode_gluoncv(job: dict) -> dict:
    """GluonCV's evaluation loop (eval_ssd.py --deploy, validate()), re-created faithfully,
    timed like the stage: from importing what it needs (MXNet, GluonCV) to the metric."""
    import warnings

    warnings.simplefilter("ignore")  # np.float in COCODetectionMetric, SymbolBlock types
    root = Path(job["annotations"]).parent.parent
    prefix, b = job["prefix"], job["batch"]
    work = Path(job["work"]) / f"gluoncv-{job['precision']}-{b}-{job['loader_workers']}"
    work.mkdir(parents=True, exist_ok=True)
    result = {}

    def run():
        # pylint: disable=import-outside-toplevel
        import mxnet as mx
        from gluoncv.data import COCODetection
        from gluoncv.data.batchify import Pad, Stack, Tuple
        from gluoncv.data.transforms.presets.ssd import SSDDefaultValTransform
        from gluoncv.utils.metrics.coco_detection import COCODetectionMetric
        from mxnet import gluon

        ctx = [mx.cpu()]
        net = mx.gluon.SymbolBlock.imports(f"{prefix}-symbol.json", ["data"],
                                           f"{prefix}-0000.params")
        net.hybridize(static_alloc=True, static_shape=True)
        dataset = COCODetection(root=str(root), splits="instances_val2017", skip_empty=False)
        metric = COCODetectionMetric(dataset, str(work / "eval"), cleanup=True,
                                     data_shape=(SIZE, SIZE))
        loader = gluon.data.DataLoader(
            dataset.transform(SSDDefaultValTransform(SIZE, SIZE)),
            batchify_fn=Tuple(Stack(), Pad(pad_val=-1)), batch_size=b, shuffle=False,
            last_batch="rollover", num_workers=job["loader_workers"])
        # validate(): net.collect_params().reset_ctx(ctx) is a no-op on CPU
        metric.reset()
        for batch in loader:
            data = gluon.utils.split_and_load(batch[0], ctx_list=ctx, batch_axis=0,
                                              even_split=False)
            label = gluon.utils.split_and_load(batch[1], ctx_list=ctx, batch_axis=0,
                                               even_split=False)
            det_bboxes, det_ids, det_scores, gt_bboxes, gt_ids, gt_difficults = \
                [], [], [], [], [], []
            for x, y in zip(data, label):
                ids, scores, bboxes = net(x)
                det_ids.append(ids)
                det_scores.append(scores)
                det_bboxes.append(bboxes.clip(0, batch[0].shape[2]))
                gt_ids.append(y.slice_axis(axis=-1, begin=4, end=5))
                gt_bboxes.append(y.slice_axis(axis=-1, begin=0, end=4))
                gt_difficults.append(y.slice_axis(axis=-1, begin=5, end=6)
                                     if y.shape[-1] > 5 else None)
            metric.update(det_bboxes, det_ids, det_scores, gt_bboxes, gt_ids, gt_difficults)
        metric.get()
        result["stats"] = percent_stats(metric._coco_eval.stats)  # pylint: disable=protected-access
        result["images"] = len(dataset)

    seconds = best_of(job["repeats"], run)
    return {**result, "images_per_s": result["images"] / seconds, "seconds": seconds,
            "loader_workers": job["loader_workers"]}


def mode_parts(job: dict) -> dict:
    """Body alone vs the whole model, and the CPU time of loading one image."""
    import mxnet as mx

    from stages.images import Preprocessor, read_bgr
    from stages.inference import ImageItem, load_batch, load_detector, load_symbol_block

    net, meta = load_detector(job["prefix"])
    full = load_symbol_block(job["prefix"])
    internals = mx.sym.load(f"{job['prefix']}-symbol.json").get_internals()
    names = [n for n in internals.list_outputs() if n.startswith("concat") or "_concat" in n]
    body = mx.gluon.SymbolBlock(mx.sym.Group([internals[n] for n in names[:2]]),
                                mx.sym.var("data"), params=full.collect_params())
    body.hybridize(static_alloc=True, static_shape=True)
    paths, b = image_paths(job), job["batch"]
    x = mx.nd.array(load_batch([ImageItem(i, p) for i, p in enumerate(paths[:b])], SIZE,
                               meta["mean"], meta["std"]).data)
    for block in (net, body):
        [o.asnumpy() for o in block(x)]
    full_s = best_of(job["repeats"] + 1, lambda: [o.asnumpy() for o in net(x)])
    body_s = best_of(job["repeats"] + 1, lambda: [o.asnumpy() for o in body(x)])
    prep = Preprocessor(SIZE, meta["mean"], meta["std"])
    out = mx.nd.zeros((3, SIZE, SIZE)).asnumpy()
    some = paths[:32]

    def load_all():
        for p in some:
            prep(read_bgr(p), out)

    start = time.process_time()
    load_all()
    load_all()
    load_cpu = (time.process_time() - start) / 2
    return {"model_ms_per_image": 1000 * full_s / b, "body_ms_per_image": 1000 * body_s / b,
            "head_ms_per_image": 1000 * (full_s - body_s) / b,
            "load_cpu_ms_per_image": 1000 * load_cpu / len(some)}


MODES = {"model": mode_model, "stage": mode_stage, "stage-before": mode_stage, "e2e": mode_e2e,
         "gluoncv": mode_gluoncv, "parts": mode_parts}


def run_mode(job: dict) -> dict:
    """Run ``job['mode']``; the row keeps the job's identifying keys."""
    keys = ("head", "precision", "batch", "mode")
    result = {k: job[k] for k in keys}
    if job.get("loader_workers") is not None:
        result["loader_workers"] = job["loader_workers"]
    result.update(MODES[job["mode"]](job))
    return result
