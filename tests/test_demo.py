"""The offline demo, end to end, as a user runs it: a fresh copy of this checkout, git + DVC,
``dvc repro`` in demo/, the gate, then a changed param that shows up in ``dvc metrics diff``.

This is the project's end-to-end test: every stage runs for real (generate, download from local
paths with checksums, unpack, train, convert with both heads, quantize, evaluate COCO and VOC in
FP32 and INT8, compare). It takes a few minutes on 2 cores.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

CLASSES = ["rectangle", "ellipse", "triangle", "cross"]


def copy_checkout(src: Path, dest: Path) -> None:
    """Copy what git tracks or would track (not ignored) from ``src``, then git init + commit.

    That is a fresh clone plus the working tree: no venv, no DVC cache, no pipeline outputs.
    """
    listing = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                              "--exclude-standard"], cwd=src, check=True,
                             capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, listing):
        if (src / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / rel, dest / rel)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "copy"]):
        subprocess.run(cmd, cwd=dest, check=True)


def run(cmd: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``cmd`` with this interpreter's bin dir first on PATH (the stages call `python`)."""
    env = dict(os.environ, PATH=os.pathsep.join([str(Path(sys.executable).parent),
                                                 os.environ.get("PATH", "")]))
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n")  # shown by pytest on failure
    return proc


def dvc(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "dvc", *args], cwd)


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def test_demo_end_to_end_gate_and_metrics_diff(tmp_path, repo_root):
    copy_checkout(repo_root, tmp_path)
    demo = tmp_path / "demo"

    repro = dvc("repro", cwd=demo)
    assert repro.returncode == 0, "dvc repro of the demo failed"
    metrics = demo / "metrics"
    voc = {p: load(metrics / f"voc_{p}.json") for p in ("fp32", "int8")}
    coco = {p: load(metrics / f"coco_{p}.json") for p in ("fp32", "int8")}
    train = load(metrics / "train_voc.json")
    assert voc["fp32"]["images"] == 200 and coco["fp32"]["images"] == 200
    for p in ("fp32", "int8"):
        assert 80.0 <= voc[p]["map"] <= 100.0, voc
        assert 40.0 <= coco[p]["map"] < coco[p]["map50"] <= 100.0, coco
        speed = load(metrics / f"speed_voc_{p}.json")
        assert speed["images"] == 200 and speed["images_per_s"] > 0
    assert abs(voc["int8"]["map"] - voc["fp32"]["map"]) <= 1.0
    assert 0.5 < train["acc"] <= 1.0 and train["epochs"] > 0
    with open(demo / "eval" / "voc_fp32" / "per_class.csv") as fh:
        assert [row["class"] for row in csv.DictReader(fh)] == CLASSES
    assert len(list((demo / "eval" / "coco_int8" / "samples").glob("*.png"))) > 0
    assert (demo / "dvclive" / "train_voc" / "plots" / "metrics" / "train" / "loss.tsv").is_file()
    heads = {b: load(demo / "model" / b / "fp32-meta.json")["head"] for b in ("coco", "voc")}
    assert heads == {"coco": "seed", "voc": "gluoncv"}

    gate = run([sys.executable, "-m", "stages.gate"], demo)
    assert gate.returncode == 0 and "PASS" in gate.stdout

    # A changed quantization param: only the COCO INT8 branch reruns, and the diff shows it.
    for cmd in (["git", "add", "-A"], ["git", "commit", "-qm", "demo results"]):
        subprocess.run(cmd, cwd=tmp_path, check=True)
    exp = dvc("exp", "run", "-S", "quantize.coco.calib_images=32", cwd=demo)
    assert exp.returncode == 0
    assert "Running stage 'quantize_coco'" in exp.stdout
    assert "Running stage 'train'" not in exp.stdout
    diff = dvc("metrics", "diff", "--json", "--targets", "metrics/coco_int8.json",
               "metrics/voc_fp32.json", cwd=demo)
    assert diff.returncode == 0
    changes = json.loads(diff.stdout)
    change = changes["metrics/coco_int8.json"]["map"]
    assert change["old"] == coco["int8"]["map"] and change["new"] != change["old"]
    assert "metrics/voc_fp32.json" not in changes  # untouched branch: no change reported

    # The gate is not vacuous: a target the demo cannot meet fails it (exit 1).
    params_file = demo / "params.yaml"
    params = yaml.safe_load(params_file.read_text())
    params["compare"]["targets"]["voc_fp32"]["value"] = 99.0
    params_file.write_text(yaml.safe_dump(params))
    failed = run([sys.executable, "-m", "stages.gate"], demo)
    assert failed.returncode == 1 and "FAIL" in failed.stdout
