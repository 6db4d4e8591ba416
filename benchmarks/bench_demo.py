"""The offline demo against its goals: cold run time, accuracy, INT8 gap, rerun, no-op time.

    python benchmarks/bench_demo.py                 # prints a JSON report
    python benchmarks/bench_demo.py --out bench_demo.json --noop-runs 5

In a temporary copy of this checkout (tracked and untracked-but-not-ignored files, i.e. what a
clone plus your working tree holds; a fresh git repo, the project's .dvc config) it runs, from
demo/:

1. ``dvc repro`` cold (empty DVC cache): wall time, and per stage the time from its
   "Running stage" line to the next (goal: total <= 300 s on 2 cores);
2. ``python -m stages.gate`` (goal: exit 0);
3. ``dvc repro`` again with nothing changed, ``--noop-runs`` times (goal: median <= 1.5 s),
   and for scale the same for a one-stage pipeline (DVC's fixed cost on this machine now);
4. ``dvc repro --force`` (every stage again, training from scratch: a completed run leaves no
   checkpoint to resume from; same params and data): the accuracy metrics files must be
   byte-identical to the first run's (goal: all identical).

Accuracy goals checked on the first run: VOC07 mAP >= 85 (FP32 and INT8) and |INT8 - FP32| <= 0.5.
The machine's load average is recorded before and after: on a shared machine the timings are
upper bounds (other processes take CPU), the accuracy checks are not affected.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DVC = (sys.executable, "-m", "dvc")
# The accuracy metrics (deterministic); speed files are excluded on purpose, they vary per run.
ACCURACY_FILES = ("train_voc.json", "voc_fp32.json", "voc_int8.json", "coco_fp32.json",
                  "coco_int8.json", "compare.json")
GOALS = {"cold_s": 300.0, "noop_s": 1.5, "voc_map": 85.0, "int8_gap": 0.5}


def copy_checkout(src: Path, dest: Path) -> None:
    """Copy what git tracks or would track (not ignored) from ``src``, then git init + commit."""
    listing = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                              "--exclude-standard"], cwd=src, check=True,
                             capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, listing):
        if (src / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / rel, dest / rel)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "commit", "-qm", "benchmark copy"]):
        subprocess.run(cmd, cwd=dest, check=True)


def timed_repro(cwd: Path, *args: str) -> tuple[float, dict[str, float], str]:
    """Run ``dvc repro *args``; wall seconds, seconds per stage run, and the combined output."""
    start = time.perf_counter()
    # The stages' commands call `python`: this interpreter's, even if its venv is not active.
    env = dict(os.environ, PATH=os.pathsep.join([str(Path(sys.executable).parent),
                                                 os.environ.get("PATH", "")]))
    proc = subprocess.Popen([*DVC, "repro", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    stages: dict[str, float] = {}
    current, since, lines = None, start, []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("Running stage '"):
            now = time.perf_counter()
            if current:
                stages[current] = round(now - since, 2)
            current, since = line.split("'")[1], now
    code = proc.wait()
    wall = time.perf_counter() - start
    if current:
        stages[current] = round(time.perf_counter() - since, 2)
    if code:
        sys.stderr.write("".join(lines[-40:]))
        raise SystemExit(f"dvc repro {' '.join(args)} failed with exit {code}")
    return round(wall, 2), stages, "".join(lines)


def read_accuracy(metrics: Path) -> dict[str, bytes]:
    """The accuracy metrics files' bytes (speed lives in separate files)."""
    return {name: (metrics / name).read_bytes() for name in ACCURACY_FILES}


def dvc_floor(tmp: Path, runs: int) -> list[float]:
    """No-op ``dvc repro`` times of a one-stage pipeline: DVC's own fixed cost on this machine
    right now (imports, repo and lock loading), the floor under the demo's no-op time."""
    tmp.mkdir()
    for cmd in (["git", "init", "-q"], [*DVC, "init", "-q"]):
        subprocess.run(cmd, cwd=tmp, check=True)
    (tmp / "dvc.yaml").write_text("stages:\n  s:\n    cmd: echo hi > out.txt\n"
                                  "    outs: [out.txt]\n")
    timed_repro(tmp)
    return [timed_repro(tmp)[0] for _ in range(runs)]


def run(noop_runs: int, keep: bool) -> dict:
    env_note = {"load_before": os.getloadavg(), "cpus": os.cpu_count()}
    tmp = Path(tempfile.mkdtemp(prefix="bench_demo_"))
    try:
        copy_checkout(REPO, tmp)
        demo = tmp / "demo"
        cold_s, per_stage, _ = timed_repro(demo)
        first = read_accuracy(demo / "metrics")
        train = json.loads((demo / "metrics" / "train_voc.json").read_text())
        gate = subprocess.run([sys.executable, "-m", "stages.gate"], cwd=demo,
                              capture_output=True, text=True)
        noop = [timed_repro(demo)[0] for _ in range(noop_runs)]
        with tempfile.TemporaryDirectory(prefix="bench_dvc_floor_") as floor_dir:
            floor = dvc_floor(Path(floor_dir) / "repo", noop_runs)
        # a completed run removed its checkpoints: the forced train stage trains from scratch
        rerun_s, _, _ = timed_repro(demo, "--force")
        second = read_accuracy(demo / "metrics")
        voc = {p: json.loads(first[f"voc_{p}.json"])["map"] for p in ("fp32", "int8")}
        coco = {p: json.loads(first[f"coco_{p}.json"]) for p in ("fp32", "int8")}
        report = {
            "cold_repro_s": cold_s,
            "stage_s": per_stage,
            "noop_repro_s": noop,
            "noop_repro_median_s": statistics.median(noop) if noop else None,
            "noop_one_stage_pipeline_s": floor,
            "forced_rerun_s": rerun_s,
            "voc_map": voc,
            "voc_int8_minus_fp32": round(voc["int8"] - voc["fp32"], 4),
            "coco_map": {p: coco[p]["map"] for p in coco},
            "coco_map50": {p: coco[p]["map50"] for p in coco},
            "train": train,
            "rerun_identical": {n: first[n] == second[n] for n in ACCURACY_FILES},
            "gate_exit": gate.returncode,
            "gate_report": gate.stdout,
            **env_note,
            "load_after": os.getloadavg(),
        }
        report["goals"] = {
            "cold_repro_le_300s": cold_s <= GOALS["cold_s"],
            "voc_map_ge_85": min(voc.values()) >= GOALS["voc_map"],
            "int8_within_0.5": abs(report["voc_int8_minus_fp32"]) <= GOALS["int8_gap"],
            "rerun_byte_identical": all(report["rerun_identical"].values()),
            "noop_le_1.5s": bool(noop) and report["noop_repro_median_s"] <= GOALS["noop_s"],
            "gate_passes": gate.returncode == 0,
        }
        if keep:
            report["workdir"] = str(tmp)
        return report
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--noop-runs", type=int, default=3, help="no-op repro timings to take")
    parser.add_argument("--out", type=Path, help="also write the JSON report here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copy")
    args = parser.parse_args(argv)
    report = run(args.noop_runs, args.keep)
    text = json.dumps(report, indent=2) + "\n"
    sys.stdout.write(text)
    if args.out:
        args.out.write_text(text)
    return 0 if all(report["goals"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
