"""Data-parallel training throughput on this machine: one process vs 1 and 2 parameter-server workers.

    python benchmarks/bench_distributed.py                  # prints a table and a JSON report
    python benchmarks/bench_distributed.py --images 512 --epochs 3 --out bench_distributed.json

Runs the real train stage (``python -m stages.train``) on a generated VOC-style set with the
demo's network (``demo_ssd``, 128 px, global batch 32, flip augmentation, no validation) three
ways, each worker with one OpenMP thread:

- ``single``: ``kvstore: device`` — one process, as without distributed training;
- ``dist1``: ``dist_sync`` with 1 worker (+ scheduler and server on 127.0.0.1): the cost of the
  parameter server alone;
- ``dist2``: ``dist_sync`` with 2 workers, each on half of every global batch.

``images_per_s`` is the stage's own figure (metrics/speed_train_voc.json: images trained over
the seconds of the training loops, all workers' images over worker 0's time), ``wall_s`` the
whole stage (process start-up, data loading, job set-up), ``cpu_s`` the CPU seconds of the
stage and every process of its job (user + system). Scaling efficiency is
``dist2 / (2 x dist1)``: 1.0 means two workers train twice as fast as one. On a 2-core
machine shared with the scheduler, the server and anything else running, expect well below
1.0; the load average is recorded before and after.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

CLASSES = ["rectangle", "ellipse", "triangle", "cross"]


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_devkit(root: Path, images: int) -> Path:
    from stages.generate import make_samples, write_voc

    devkit = root / "VOCdevkit"
    write_voc(devkit, 2007, {"trainval": make_samples(images, CLASSES, 128, 4, seed=0),
                             "test": make_samples(8, CLASSES, 128, 4, seed=0,
                                                  first_index=images)}, CLASSES)
    return devkit


def train_params(epochs: int, kvstore: str, workers: int) -> dict:
    return {
        "network": "demo_ssd", "pretrained_base": "none", "classes": CLASSES,
        "splits": [[2007, "trainval"]], "val_split": [2007, "test"], "data_shape": 128,
        "batch_size": 32, "epochs": epochs, "lr": 0.05, "lr_decay": 1.0, "lr_decay_epochs": [],
        "schedule": "cosine", "warmup_epochs": 1, "momentum": 0.9, "wd": 0.0005,
        "augment": "flip", "devices": ["cpu"], "num_workers": 0, "seed": 0,
        "checkpoint_interval": epochs, "val_interval": 0, "val_max_images": 0, "threads": 1,
        "distributed": {"kvstore": kvstore, "workers": workers, "servers": 1,
                        "hosts": ["localhost"], "scheduler_host": "127.0.0.1",
                        "scheduler_port": free_port(), "progress_timeout_s": 600.0},
    }


def run(workdir: Path, devkit: Path, params: dict) -> dict:
    workdir.mkdir(parents=True)
    (workdir / "params.yaml").write_text(yaml.safe_dump({"train": {"voc": params}}))
    cmd = [sys.executable, "-m", "stages.train", "voc", "--data", str(devkit),
           "--out", "model/trained", "--checkpoints", "model/checkpoints", "--live", "live",
           "--metrics", "metrics/train_voc.json", "--speed", "metrics/speed_train_voc.json"]
    start, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the stage and every job process
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"the train stage failed ({proc.returncode}) in {workdir}")
    speed = json.loads((workdir / "metrics/speed_train_voc.json").read_text())
    metrics = json.loads((workdir / "metrics/train_voc.json").read_text())
    return {"images_per_s": round(speed["images_per_s"], 2), "wall_s": round(wall, 1),
            "cpu_s": round(cpu, 1), "acc": metrics["acc"], "loss": metrics["loss"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512, help="training images (128 px)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", type=Path, help="also write the report here (JSON)")
    args = parser.parse_args()
    report = {"cpu": cpu_model(), "cores": os.cpu_count(), "load_before": os.getloadavg(),
              "images": args.images, "epochs": args.epochs, "global_batch": 32, "runs": {}}
    with tempfile.TemporaryDirectory(prefix="bench-distributed-") as tmp:
        root = Path(tmp)
        devkit = make_devkit(root, args.images)
        for name, kvstore, workers in (("single", "device", 1), ("dist1", "dist_sync", 1),
                                       ("dist2", "dist_sync", 2)):
            report["runs"][name] = run(root / name, devkit,
                                       train_params(args.epochs, kvstore, workers))
            print(f"{name:7s} {report['runs'][name]}", file=sys.stderr, flush=True)
    runs = report["runs"]
    report["load_after"] = os.getloadavg()
    report["scaling_efficiency"] = round(
        runs["dist2"]["images_per_s"] / (2 * runs["dist1"]["images_per_s"]), 3)
    report["speedup_vs_single"] = round(
        runs["dist2"]["images_per_s"] / runs["single"]["images_per_s"], 3)
    print(f"CPU: {report['cpu']} ({report['cores']} cores); load {report['load_before']}")
    print(f"{'run':8s} {'workers':>7s} {'images/s':>9s} {'wall s':>7s} {'cpu s':>7s}")
    for name, workers in (("single", 1), ("dist1", 1), ("dist2", 2)):
        r = runs[name]
        print(f"{name:8s} {workers:7d} {r['images_per_s']:9.2f} {r['wall_s']:7.1f} "
              f"{r['cpu_s']:7.1f}")
    print(f"scaling efficiency dist2 / (2 x dist1): {report['scaling_efficiency']:.3f}; "
          f"dist2 / single: {report['speedup_vs_single']:.3f}")
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
