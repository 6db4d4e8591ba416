"""Targets, floors and judging (stages/targets.py), shared by compare and the gate."""
import math

import pytest
import yaml

from stages.targets import (FAIL, INFO, MISSING, PASS, CompareParams, Floor, Target,
                            active_targets, compare, judge, rows_to_metrics)
from stages.config import ParamsError, parse_section

TARGETS = {"fp32": Target(metric="coco_fp32.map", value=24.059, tolerance=0.2),
           "int8": Target(metric="coco_int8.map", value=23.879, tolerance=0.4),
           "acc": Target(metric="train_voc.acc", value=0.7835, tolerance=0.02)}
FLOORS = {"int8_floor": Floor(metric="coco_int8.map", reference="coco_fp32.map", ratio=0.99)}


def first(targets: dict, n: int) -> dict:
    return dict(list(targets.items())[:n])


def by_name(rows):
    return {r.name: r for r in rows}


def test_compare_reports_value_target_delta_and_status():
    metrics = {"coco_fp32": {"map": 24.1}, "coco_int8": {"map": 23.3},
               "train_voc": {"acc": 0.7635}}  # acc exactly on the tolerance boundary
    rows = by_name(compare(metrics, TARGETS, FLOORS))
    fp32, int8, acc = rows["coco_fp32.map"], rows["coco_int8.map"], rows["train_voc.acc"]
    assert (fp32.status, fp32.target, round(fp32.delta, 6)) == (PASS, 24.059, 0.041)
    assert (int8.status, round(int8.delta, 6)) == (FAIL, -0.579)
    assert acc.status == PASS  # boundary included despite float error in 0.7635 - 0.7835
    floor = rows["coco_int8.map/coco_fp32.map"]
    # 23.3 < 0.99 * 24.1 = 23.859: reported as target = reference, tolerance = 1% of it
    assert (floor.status, floor.target, round(floor.tolerance, 6)) == (FAIL, 24.1, 0.241)
    assert compare({"coco_fp32": {"map": 24.1}, "coco_int8": {"map": 23.9}}, {}, FLOORS)[0] \
        .status == PASS
    # an absolute margin instead (the demo: INT8 within 0.5 point of FP32)
    margin = {"m": Floor(metric="coco_int8.map", reference="coco_fp32.map", margin=0.5)}
    assert [compare({"coco_fp32": {"map": 85.0}, "coco_int8": {"map": v}}, {}, margin)[0].status
            for v in (84.5, 84.4)] == [PASS, FAIL]
    assert [r.key for r in compare({}, TARGETS, FLOORS)] == ["fp32", "int8", "acc", "int8_floor"]


@pytest.mark.parametrize("value", [0.5, 0.7835, 0.99, None])
def test_an_informational_target_is_shown_with_its_delta_and_never_judged(value):
    """The seed's 0.7835 is the same statistic, not a comparable value (issue 10 item 7)."""
    acc = {"acc": Target(metric="train_voc.acc", value=0.7835, tolerance=0.02,
                         informational=True)}
    metrics = {"train_voc": {"acc": value} if value is not None else {}}
    row = compare(metrics, acc)[0]
    assert row.status == INFO and row.note.startswith("informational, not judged")
    assert row.value == value and row.target == 0.7835
    assert row.delta == (None if value is None else pytest.approx(value - 0.7835))
    assert rows_to_metrics([row])["train_voc.acc.status"] == "info"


@pytest.mark.parametrize("metrics, note", [
    ({}, "no metrics file 'coco_fp32'"),
    ({"coco_fp32": "metrics/coco_fp32.json is not valid JSON"}, "not valid JSON"),
    ({"coco_fp32": {"map50": 40.0}}, "key 'map' missing in 'coco_fp32'"),
    ({"coco_fp32": {"map": math.nan}}, "not finite"),
    ({"coco_fp32": {"map": math.inf}}, "not finite"),
    ({"coco_fp32": {"map": "24.1"}}, "not a number"),
    ({"coco_fp32": {"map": True}}, "not a number"),
])
def test_unjudgeable_metrics_are_missing_never_pass(metrics, note):
    row = compare(metrics, first(TARGETS, 1), FLOORS)
    assert row[0].status == MISSING and note in row[0].note and row[0].value is None
    assert row[1].status == MISSING  # the floor needs coco_fp32.map too


@pytest.mark.parametrize("value, direction, status", [
    (10.5, "lower", PASS), (10.6, "lower", FAIL), (9.0, "lower", PASS),
    (9.5, "both", PASS), (10.5, "both", PASS), (9.4, "both", FAIL), (10.6, "both", FAIL),
    (12.0, "higher", PASS), (9.4, "higher", FAIL),
])
def test_judge_directions(value, direction, status):
    assert judge(value, 10.0, 0.5, direction) == status


def test_compare_json_is_flat_with_stable_keys():
    rows = compare({"coco_fp32": {"map": 24.059}}, first(TARGETS, 2))
    out = rows_to_metrics(rows)
    assert out == {
        "coco_fp32.map.value": 24.059, "coco_fp32.map.target": 24.059,
        "coco_fp32.map.delta": 0.0, "coco_fp32.map.tolerance": 0.2,
        "coco_fp32.map.status": "pass",
        "coco_int8.map.value": None, "coco_int8.map.target": 23.879,
        "coco_int8.map.delta": None, "coco_int8.map.tolerance": 0.4,
        "coco_int8.map.status": "missing"}


def test_when_selects_the_target_of_the_active_head(repo_root):
    """The project's own params.yaml: the COCO FP32 target follows convert.coco.head."""
    data = yaml.safe_load((repo_root / "params.yaml").read_text())
    params = parse_section(data, "compare", CompareParams)
    data.setdefault("convert", {}).setdefault("coco", {})
    wanted = {"seed": (24.059, 23.879), "gluoncv": (25.1, None)}
    for head, (fp32, int8) in wanted.items():
        data["convert"]["coco"]["head"] = head
        active = active_targets(params.targets, data)
        targets = {t.metric: t.value for t in active.values()}
        assert targets.get("coco_fp32.map") == fp32 and targets.get("coco_int8.map") == int8
        assert targets["train_voc.acc"] == 0.7835
        assert targets["voc_fp32.map"] == 77.6 and targets["voc_int8.map"] == 77.46
    assert {(f.metric, f.reference, f.ratio) for f in params.floors.values()} == {
        ("coco_int8.map", "coco_fp32.map", 0.99), ("voc_int8.map", "voc_fp32.map", 0.99),
        ("coco_bf16.map", "coco_fp32.map", 0.99), ("voc_bf16.map", "voc_fp32.map", 0.99)}
    # the training accuracy is diffed against the seed's, informational only (issue 10 item 7)
    informational = {t.metric for t in params.targets.values() if t.informational}
    assert informational == {"train_voc.acc"}


@pytest.mark.parametrize("targets, needle", [
    ("[{metric: a.map, value: 1.0, tolerance: 0.1}]", "compare.targets: Value error, must be a "
     "mapping of name -> entry"),
    ("{a.b: {metric: a.map, value: 1.0, tolerance: 0.1}}",
     "compare.targets: name 'a.b': String should match pattern"),
    ("{t: {metric: a.map, value: 1.0, tolerance: 0.1, configuration: [convert..head]}}",
     "compare.targets.t.configuration.0"),
    ("{t: {metric: a.map, value: 1.0, tolerance: 0.1, informational: yes please}}",
     "compare.targets.t.informational: Input should be a valid boolean"),
])
def test_targets_are_a_mapping_of_names(targets, needle):
    """Keyed by a name (no dots: one `dvc exp run -S compare.targets.<name>.value=` key)."""
    data = yaml.safe_load(f"compare: {{targets: {targets}}}")
    with pytest.raises(ParamsError) as err:
        parse_section(data, "compare", CompareParams)
    assert needle in str(err.value)


def test_a_configuration_key_must_name_a_param():
    targets = {"t": Target(metric="a.map", value=1.0, tolerance=0.1,
                           configuration=["convert.coco.heads"])}
    with pytest.raises(ParamsError, match="compare.targets.t.configuration: key "
                                          "'convert.coco.heads' is not in"):
        active_targets(targets, {"convert": {"coco": {"head": "seed"}}})


def test_bad_conditions_are_params_errors():
    both = {"any": Target(metric="a.map", value=1.0, tolerance=0.1),
            "seed": Target(metric="a.map", value=2.0, tolerance=0.1,
                           when={"convert.coco.head": "seed"})}
    with pytest.raises(ParamsError, match="compare.targets.any and compare.targets.seed both "
                                          "apply to 'a.map'"):
        active_targets(both, {"convert": {"coco": {"head": "seed"}}})
    assert [t.value for t in active_targets(both, {"convert": {"coco": {"head": "x"}}})
            .values()] == [1.0]
    with pytest.raises(ParamsError, match="key 'convert.coco.head' is not in"):
        active_targets({"seed": both["seed"]}, {"convert": {}})
    # YAML true is not 1: a condition of another type can never hold, so it is refused
    flag = {"f": Target(metric="a.map", value=1.0, tolerance=0.1, when={"x": 1})}
    with pytest.raises(ParamsError, match="1 is a number but x is a boolean"):
        active_targets(flag, {"x": True})
    assert active_targets(flag, {"x": 2}) == {}  # same type, another value: just inactive


@pytest.mark.parametrize("key, wanted, params, needle", [
    # a choice param: the value must be one of its choices (stages/choices.py)
    ("convert.coco.head", "Seed", {"convert": {"coco": {"head": "seed"}}},
     "'Seed' is not a value convert.coco.head can take, so the target would apply to nothing; "
     "allowed: seed, gluoncv"),
    ("convert.voc.head", True, {"convert": {"voc": {"head": "gluoncv"}}}, "allowed: seed"),
    ("quantize.coco.calib_mode", "entropi", {"quantize": {"coco": {"calib_mode": "naive"}}},
     "allowed: naive, entropy, none"),
    ("train.voc.network", "ssd_300", {"train": {"voc": {"network": "demo_ssd"}}},
     "allowed: demo_ssd, ssd_300_vgg16_atrous_coco, ssd_300_vgg16_atrous_voc"),
    # any other param: the value must have the param's type
    ("evaluate.coco.batch_size", "64", {"evaluate": {"coco": {"batch_size": 64}}},
     "'64' is a string but evaluate.coco.batch_size is a number"),
    # a section is not a value
    ("convert.coco", "seed", {"convert": {"coco": {"head": "seed"}}}, "is a dict, not a single"),
])
def test_when_value_that_can_never_hold_is_a_params_error(key, wanted, params, needle):
    """The gate used to drop a target whose `when` value no params file has (`Seed` for
    `seed`) and pass without it: such a target applies to nothing and is refused."""
    targets = {"t": Target(metric="coco_fp32.map", value=10.0, tolerance=0.1, when={key: wanted})}
    with pytest.raises(ParamsError) as err:
        active_targets(targets, params)
    assert f"compare.targets.t.when.{key}" in str(err.value) and needle in str(err.value)


def test_project_pipeline_wires_every_target(repo_root, monkeypatch):
    """dvc.yaml declares a metrics file for every metric params.yaml targets, the compare stage
    reads them all, and it lists the params its `when` conditions read (so it reruns on them)."""
    from dvc.repo import Repo

    from stages.gate import declared_metrics

    data = yaml.safe_load((repo_root / "params.yaml").read_text())
    params = parse_section(data, "compare", CompareParams)
    names = {t.metric.split(".")[0] for t in params.targets.values()}
    names |= {m.split(".")[0] for f in params.floors.values() for m in (f.metric, f.reference)}
    monkeypatch.chdir(repo_root)
    declared = declared_metrics()
    assert names <= {n for n, p in declared.items() if p}, names - set(declared)
    with Repo(str(repo_root)) as repo:
        stage = next(s for s in repo.index.stages if s.addressing == "compare")
        cmd_files = stage.cmd.split("--metrics", 1)[1].split()
        deps = {d.def_path for d in stage.deps}
    assert {declared[n] for n in names} <= set(cmd_files) <= deps
    when_keys = {k for t in params.targets.values() for k in t.when}
    listed = {p for dep in stage.deps if hasattr(dep, "params") for p in dep.params}
    assert when_keys | {"compare"} <= listed
