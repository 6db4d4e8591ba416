"""The verdict chart's records (stages/report_data.py) from real compare checks."""
import json

import pytest

from stages.targets import Floor, Target, compare
from stages.report_data import headroom, threshold_rule, verdict_rows, write_verdict_rows

TARGETS = {
    "voc": Target(metric="voc_fp32.map", value=85.0, tolerance=0.0),
    "latency": Target(metric="speed.latency", value=10.0, tolerance=2.0, direction="lower"),
    "coco": Target(metric="coco_fp32.map", value=25.1, tolerance=0.2, direction="both"),
    "acc": Target(metric="train_voc.acc", value=0.8, tolerance=0.0),
}
FLOORS = {"int8": Floor(metric="voc_int8.map", reference="voc_fp32.map", ratio=1.0, margin=0.5)}
METRICS = {"voc_fp32": {"map": 86.6}, "voc_int8": {"map": 85.9}, "speed": {"latency": 13.0},
           "coco_fp32": {"map": 25.0}, "train_voc": "cannot read metrics/train_voc.json"}


def records():
    rows = compare(METRICS, TARGETS, FLOORS)
    return {r["check"]: r for r in verdict_rows(rows, {t.metric: t.direction
                                                        for t in TARGETS.values()})}


def test_one_record_per_check_with_headroom_by_direction():
    recs = records()
    assert list(recs) == ["voc_fp32.map", "speed.latency", "coco_fp32.map", "train_voc.acc",
                          "voc_int8.map/voc_fp32.map"]
    higher = recs["voc_fp32.map"]
    assert (higher["status"], higher["headroom"], higher["rule"]) == ("pass", 1.6, "≥ 85")
    assert higher["headroom_pct"] == pytest.approx(100 * 1.6 / 85)
    lower = recs["speed.latency"]  # 13 > 10 + 2: fails by 1
    assert (lower["status"], lower["headroom"], lower["rule"]) == ("fail", -1.0, "≤ 12")
    both = recs["coco_fp32.map"]  # 25.0 within 25.1 ± 0.2: 0.1 to spare
    assert both["status"] == "pass" and both["headroom"] == pytest.approx(0.1)
    assert both["threshold"] is None and both["rule"] == "25.1 ± 0.2"
    floor = recs["voc_int8.map/voc_fp32.map"]  # 85.9 >= 86.6 - 0.5 fails by 0.2
    assert floor["kind"] == "floor" and floor["label"] == "voc_int8.map vs voc_fp32.map (floor)"
    assert floor["status"] == "fail" and floor["headroom"] == pytest.approx(-0.2)
    assert floor["threshold"] == pytest.approx(86.1)


def test_a_check_that_cannot_be_judged_has_no_numbers_but_says_why():
    missing = records()["train_voc.acc"]
    assert missing["status"] == "missing"
    assert missing["value"] is None and missing["headroom"] is None
    assert missing["headroom_pct"] is None
    assert missing["note"] == "cannot read metrics/train_voc.json"


def test_helpers_on_unknowns_and_a_zero_target():
    assert headroom(None, 1.0, "higher") is None and headroom(1.0, None, "lower") is None
    assert threshold_rule(None, 0.5, "higher") == (None, "")
    rows = compare({"a": {"x": 0.0}}, {"x": Target(metric="a.x", value=0.0, tolerance=0.1)})
    (rec,) = verdict_rows(rows, {})
    assert rec["headroom"] == 0.1 and rec["headroom_pct"] is None  # no percent of zero
    with pytest.raises(ValueError, match="unknown direction 'up'"):
        verdict_rows(rows, {"a.x": "up"})


def test_written_file_is_stable_json(tmp_path):
    rows = compare(METRICS, TARGETS, FLOORS)
    path = tmp_path / "rows.json"
    write_verdict_rows(path, rows, TARGETS.values())
    first = path.read_bytes()
    data = json.loads(first)
    assert isinstance(data, list) and len(data) == 5
    assert set(data[0]) == {"check", "kind", "metric", "label", "value", "target", "delta",
                            "tolerance", "status", "threshold", "rule", "headroom",
                            "headroom_pct", "note"}
    write_verdict_rows(path, rows, TARGETS.values())
    assert path.read_bytes() == first


def test_an_informational_check_has_its_delta_but_no_boundary():
    """The training accuracy: shown with its delta, drawn grey, never counted (no headroom)."""
    acc = {"acc": Target(metric="train_voc.acc", value=0.7835, tolerance=0.02,
                         informational=True)}
    (rec,) = verdict_rows(compare({"train_voc": {"acc": 0.83}}, acc), {})
    assert (rec["status"], rec["delta"], rec["rule"]) == ("info", 0.0465, "informational")
    assert rec["headroom"] is None and rec["threshold"] is None and rec["headroom_pct"] is None
