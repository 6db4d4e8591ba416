"""The accuracy/speed frontier as a DVC experiment sweep on the demo, end to end with real DVC:
two queued experiments (a bad INT8 calibration, plain and tuned) run by `dvc queue start`, the
frontier written by `python -m stages.frontier` and rendered by `dvc plots show`.

It also is the demo test of accuracy-aware INT8: entropy calibration on one image (seed 3)
makes plain INT8 clearly worse than FP32, and tuning, without labels, brings it back within the
floor, listing the layers it kept in FP32.
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

from tests.demo_run import clone_run, dvc, run

BAD = ["-S", "quantize.coco.calib_mode=entropy", "-S", "quantize.coco.calib_images=1",
       "-S", "quantize.coco.batch_size=1", "-S", "quantize.coco.seed=3"]
FLOOR = 0.5  # demo/params.yaml: coco_int8.map >= coco_fp32.map - 0.5


def rows(path: Path) -> list[dict]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def experiments(demo: Path) -> dict[str, dict]:
    """name -> exp-show data of every experiment of the baseline."""
    shown = json.loads(dvc("exp", "show", "--json", cwd=demo).stdout)
    return {rev["name"]: rev["data"] for row in shown for group in (row.get("experiments") or [])
            for rev in group["revs"] if rev.get("data")}


def metric(data: dict, name: str, key: str) -> float:
    return next(v["data"][key] for path, v in data["metrics"].items()
                if path.endswith(f"metrics/{name}.json"))


def test_sweep_frontier_and_tuning_on_the_demo(demo_run, tmp_path):
    root = clone_run(demo_run, tmp_path / "repo")
    demo = root / "demo"
    queued = dvc("exp", "run", "--queue", *BAD,
                 "-S", "quantize.coco.tune.enabled=false,true", cwd=demo)
    assert queued.returncode == 0 and queued.stdout.count("Queued experiment") == 2
    assert dvc("queue", "start", "-j", "1", cwd=demo).returncode == 0
    frontier = run([sys.executable, "-m", "stages.frontier", "coco", "--out", "frontier",
                    "--wait", "1200"], demo)
    assert frontier.returncode == 0

    exps = experiments(demo)
    assert len(exps) == 2, exps.keys()
    by_tuning = {d["params"]["params.yaml"]["data"]["quantize"]["coco"]["tune"]["enabled"]: d
                 for d in exps.values()}
    fp32 = metric(by_tuning[False], "coco_fp32", "map")
    plain, tuned = (metric(by_tuning[t], "coco_int8", "map") for t in (False, True))
    assert plain < fp32 - FLOOR - 1.0  # clearly worse: below the floor by more than a point
    assert tuned >= fp32 - FLOOR  # brought back within the floor
    for data in exps.values():  # BF16 is in every experiment, unchanged, within 0.1 of FP32
        assert metric(data, "coco_bf16", "map") >= fp32 - 0.1
        assert metric(data, "speed_coco_int8", "images_per_s") > 0

    # the frontier: every experiment's INT8 point, FP32 and BF16 once, Pareto-best marked
    out = demo / "frontier"
    int8 = rows(out / "int8.csv")
    assert sorted(r["label"] for r in int8) == ["entropy/1", "entropy/1/tuned", "naive/64"]
    assert len(rows(out / "fp32.csv")) == 1 and len(rows(out / "bf16.csv")) == 1
    points = [r for f in ("fp32", "int8", "bf16") for r in rows(out / f"{f}.csv")]
    best = rows(out / "pareto.csv")
    assert best and all(r["pareto"] == "1" for r in best)
    for p in points:  # marked exactly when nothing beats it on both axes
        beaten = any(float(q["map"]) >= float(p["map"])
                     and float(q["images_per_s"]) >= float(p["images_per_s"])
                     and (q["map"], q["images_per_s"]) != (p["map"], p["images_per_s"])
                     for q in points)
        assert (p["pareto"] == "1") == (not beaten)

    # dvc renders the declared frontier plot, and exp show puts mAP beside images/s
    plots = json.loads(dvc("plots", "show", "--json", cwd=demo).stdout)
    assert "frontier" in plots["data"]
    assert not [e for e in plots.get("errors") or [] if e["name"] == "frontier"]
    table = dvc("exp", "show", "--csv", "--drop", ".*", "--keep",
                r"Experiment|.*coco_int8\.json:map$|.*speed_coco_int8\.json:images_per_s$",
                cwd=demo).stdout.splitlines()[0]
    assert "metrics/coco_int8.json:map" in table
    assert "metrics/speed_coco_int8.json:images_per_s" in table

    # the layers tuning kept in FP32, listed in the tuned experiment's INT8 meta (applying
    # the experiment also restores its committed files, the frontier CSVs among them: last)
    name = next(n for n, d in exps.items() if d is by_tuning[True])
    assert dvc("exp", "apply", name, cwd=demo).returncode == 0
    tuning = json.loads((demo / "model" / "coco" / "int8-meta.json").read_text())["tuning"]
    print("kept in FP32:", tuning["kept_fp32"])
    assert tuning["agreement_before"] < tuning["threshold"] <= tuning["agreement_after"]
    assert 1 <= len(tuning["kept_fp32"]) <= tuning["max_layers"]
    sensitivity = rows(demo / "eval" / "coco_int8" / "sensitivity.csv")
    assert len(sensitivity) == 15
    assert {r["layer"] for r in sensitivity if r["kept_fp32"] == "1"} == set(tuning["kept_fp32"])
