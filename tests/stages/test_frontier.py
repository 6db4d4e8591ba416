"""stages/frontier.py: points from `dvc exp show --json`, Pareto-best marking, safe output.
(The sweep itself runs end to end with real DVC in tests/test_sweep.py.)"""
from __future__ import annotations

import csv

import pytest

from stages import frontier
from stages.outputs import MARKER, OutputError


def rev(name, mode, images, tuned, maps, speeds, error=None):
    """One experiment as `dvc exp show --json` 3.x lays it out (paths from the git root)."""
    metrics = {}
    for p, m in maps.items():
        metrics[f"demo/metrics/coco_{p}.json"] = {"data": {"map": m, "images": 200}}
    for p, v in speeds.items():
        metrics[f"demo/metrics/speed_coco_{p}.json"] = {"data": {"images_per_s": v}}
    params = {"demo/params.yaml": {"data": {"quantize": {"coco": {
        "calib_mode": mode, "calib_images": images, "tune": {"enabled": tuned}}}}}}
    data = None if error else {"rev": name, "params": params, "metrics": metrics}
    return {"rev": f"{name:0<40}", "name": name, "data": data,
            "error": {"msg": error, "type": "x"} if error else None}


BASE = dict(maps={"fp32": 58.0, "int8": 58.1, "bf16": 58.0},
            speeds={"fp32": 500.0, "int8": 1000.0, "bf16": 600.0})


def exp_show():
    base = rev("main", "naive", 64, False, **BASE)
    base["experiments"] = [{"revs": [
        rev("bad", "entropy", 1, False, maps={**BASE["maps"], "int8": 54.7},
            speeds={**BASE["speeds"], "int8": 1100.0}),
        rev("fixed", "entropy", 1, True, maps={**BASE["maps"], "int8": 58.2},
            speeds={**BASE["speeds"], "int8": 700.0}),
        rev("broken", "naive", 8, False, maps={}, speeds={}, error="stage failed"),
    ]}]
    return [{"rev": "workspace", "name": None, "data": base["data"], "experiments": None}, base]


def test_points_labels_and_deduplication():
    points = frontier.points_of(frontier.experiment_records(exp_show()), "coco")
    got = [(p.experiment, p.label, p.precision, p.map) for p in points]
    assert got == [("main", "fp32", "fp32", 58.0), ("main", "naive/64", "int8", 58.1),
                   ("main", "bf16", "bf16", 58.0), ("bad", "entropy/1", "int8", 54.7),
                   ("fixed", "entropy/1/tuned", "int8", 58.2)]  # fp32/bf16 once; failed: none


def test_pareto_marks_the_points_nothing_beats():
    points = frontier.points_of(frontier.experiment_records(exp_show()), "coco")
    best = dict(zip([(p.experiment, p.precision) for p in points], frontier.pareto(points)))
    assert best == {("main", "fp32"): False,  # int8 naive/64 is faster and better
                    ("main", "int8"): True, ("main", "bf16"): False,
                    ("bad", "int8"): True,  # fastest, however bad
                    ("fixed", "int8"): True}  # most accurate


def test_equal_points_do_not_dominate_each_other():
    a = frontier.Point("a", "x", "int8", 50.0, 10.0)
    b = frontier.Point("b", "y", "int8", 50.0, 10.0)
    assert frontier.pareto([a, b]) == [True, True]


def test_csvs_per_precision_and_pareto(tmp_path):
    points = frontier.points_of(frontier.experiment_records(exp_show()), "coco")
    out = tmp_path / "frontier"
    frontier.write_csvs(out, points, frontier.pareto(points))
    assert sorted(p.name for p in out.iterdir() if p.name != MARKER) == sorted(frontier.FILES)
    with open(out / "int8.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["label"] for r in rows] == ["naive/64", "entropy/1", "entropy/1/tuned"]
    with open(out / "pareto.csv") as fh:
        assert {r["experiment"] for r in csv.DictReader(fh)} == {"main", "bad", "fixed"}
    frontier.write_csvs(out, points[:1], [True])  # rerun: replaced, not appended
    assert (out / "int8.csv").read_text().count("\n") == 1


@pytest.mark.parametrize("setup", ["foreign file", "a file", "symlink"])
def test_an_out_that_is_not_the_tools_folder_is_refused_untouched(tmp_path, setup):
    out = tmp_path / "out"
    if setup == "foreign file":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    elif setup == "a file":
        out.write_text("mine")
    else:
        (tmp_path / "real").mkdir()
        out.symlink_to(tmp_path / "real")
    with pytest.raises(OutputError, match="refusing to replace"):
        frontier.write_csvs(out, [], [])
    if setup == "foreign file":
        assert (out / "notes.txt").read_text() == "mine"
    elif setup == "a file":
        assert out.read_text() == "mine"


def test_no_points_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(frontier, "dvc", lambda *a: "[]")
    monkeypatch.chdir(tmp_path)
    from stages.common import run_stage
    assert run_stage(frontier.main, ["coco", "--out", "f"]) == 1
    assert not (tmp_path / "f").exists()
    assert run_stage(frontier.main, ["coco", "--out", "."]) == 2  # the folder it runs in
