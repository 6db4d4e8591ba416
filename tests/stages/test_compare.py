"""The compare stage's command line (the judging itself: test_targets.py)."""
import json
import subprocess
import sys

from stages.targets import load_compare_params

PARAMS = """\
convert: {coco: {head: seed}}
compare:
  targets:
    seed: {metric: coco_fp32.map, value: 24.059, tolerance: 0.2, when: {convert.coco.head: seed}}
    stock: {metric: coco_fp32.map, value: 25.1, tolerance: 0.2,
            when: {convert.coco.head: gluoncv}}
    voc: {metric: voc_fp32.map, value: 77.6, tolerance: 0.5}
    acc: {metric: train_voc.acc, value: 0.7835, tolerance: 0.02, informational: true}
  floors:
    int8: {metric: coco_int8.map, reference: coco_fp32.map, ratio: 0.99}
"""


def run_compare(cwd, *args):
    return subprocess.run([sys.executable, "-m", "stages.compare", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_stage_reports_a_miss_and_exits_zero(tmp_path):
    (tmp_path / "params.yaml").write_text(PARAMS)
    (tmp_path / "coco_fp32.json").write_text('{"map": 23.0}')
    (tmp_path / "coco_int8.json").write_text('{"map": 22.9}')
    (tmp_path / "train_voc.json").write_text('{"acc": 0.61}')
    out = tmp_path / "out" / "compare.json"
    files = ["coco_fp32.json", "coco_int8.json", "voc_fp32.json", "train_voc.json"]
    rows = tmp_path / "out" / "compare_rows.json"
    proc = run_compare(tmp_path, "--metrics", *files, "--out", str(out), "--rows", str(rows))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["coco_fp32.map.status"] == "fail" and result["coco_fp32.map.target"] == 24.059
    assert result["voc_fp32.map.status"] == "missing" and result["voc_fp32.map.value"] is None
    assert result["coco_int8.map/coco_fp32.map.status"] == "pass"
    # far below the seed's, but informational: shown with its delta, neither pass nor fail
    assert (result["train_voc.acc.status"], result["train_voc.acc.delta"]) == ("info", -0.1735)
    assert "cannot read voc_fp32.json" in proc.stderr
    assert "1 of 3 checks pass (1 informational)" in proc.stderr
    records = {r["check"]: r for r in json.loads(rows.read_text())}  # the verdict chart's data
    assert list(records) == ["coco_fp32.map", "voc_fp32.map", "train_voc.acc",
                             "coco_int8.map/coco_fp32.map"]
    assert records["coco_fp32.map"]["status"] == "fail" and records["coco_fp32.map"]["value"] == 23
    assert records["voc_fp32.map"]["status"] == "missing"
    info = records["train_voc.acc"]  # shown with its delta, no pass/fail boundary
    assert (info["status"], info["delta"], info["rule"], info["headroom"]) == \
        ("info", -0.1735, "informational", None)
    first, first_rows = out.read_bytes(), rows.read_bytes()
    assert run_compare(tmp_path, "--metrics", *files, "--out", str(out),
                       "--rows", str(rows)).returncode == 0
    assert out.read_bytes() == first and rows.read_bytes() == first_rows  # byte-identical


def test_stage_rejects_bad_params_with_exit_2(tmp_path):
    (tmp_path / "params.yaml").write_text(PARAMS.replace("tolerance: 0.5", "tolerance: -1")
                                          .replace("ratio: 0.99", "ratoi: 0.99"))
    out, rows = tmp_path / "compare.json", tmp_path / "compare_rows.json"
    proc = run_compare(tmp_path, "--metrics", "x.json", "--out", str(out), "--rows", str(rows))
    assert proc.returncode == 2
    assert "compare.targets.voc.tolerance: Input should be greater than or equal to 0" \
        in proc.stderr
    assert "compare.floors.int8.ratoi: unknown key" in proc.stderr
    assert not out.exists() and not rows.exists()


def test_load_compare_params_reads_file(tmp_path):
    (tmp_path / "params.yaml").write_text(PARAMS.replace("head: seed}}", "head: gluoncv}}", 1))
    params, targets, data = load_compare_params(tmp_path / "params.yaml")
    assert {n: t.value for n, t in targets.items()} == {"stock": 25.1, "voc": 77.6,
                                                         "acc": 0.7835}
    assert params.gate.allow_missing_base is False and params.gate.allow_config_change is False
    assert data["convert"]["coco"]["head"] == "gluoncv"
