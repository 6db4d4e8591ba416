"""The compare stage's command line (the judging itself: test_targets.py)."""
import json
import subprocess
import sys

from stages.targets import load_compare_params

PARAMS = """\
convert: {coco: {head: seed}}
compare:
  targets:
    - {metric: coco_fp32.map, value: 24.059, tolerance: 0.2, when: {convert.coco.head: seed}}
    - {metric: coco_fp32.map, value: 25.1, tolerance: 0.2, when: {convert.coco.head: gluoncv}}
    - {metric: voc_fp32.map, value: 77.6, tolerance: 0.5}
  floors:
    - {metric: coco_int8.map, reference: coco_fp32.map, ratio: 0.99}
"""


def run_compare(cwd, *args):
    return subprocess.run([sys.executable, "-m", "stages.compare", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_stage_reports_a_miss_and_exits_zero(tmp_path):
    (tmp_path / "params.yaml").write_text(PARAMS)
    (tmp_path / "coco_fp32.json").write_text('{"map": 23.0}')
    (tmp_path / "coco_int8.json").write_text('{"map": 22.9}')
    out = tmp_path / "out" / "compare.json"
    proc = run_compare(tmp_path, "--metrics", "coco_fp32.json", "coco_int8.json",
                       "voc_fp32.json", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["coco_fp32.map.status"] == "fail" and result["coco_fp32.map.target"] == 24.059
    assert result["voc_fp32.map.status"] == "missing" and result["voc_fp32.map.value"] is None
    assert result["coco_int8.map/coco_fp32.map.status"] == "pass"
    assert "cannot read voc_fp32.json" in proc.stderr
    first = out.read_bytes()
    assert run_compare(tmp_path, "--metrics", "coco_fp32.json", "coco_int8.json",
                       "voc_fp32.json", "--out", str(out)).returncode == 0
    assert out.read_bytes() == first  # byte-identical on rerun


def test_stage_rejects_bad_params_with_exit_2(tmp_path):
    (tmp_path / "params.yaml").write_text(PARAMS.replace("tolerance: 0.5", "tolerance: -1")
                                          .replace("ratio: 0.99", "ratoi: 0.99"))
    out = tmp_path / "compare.json"
    proc = run_compare(tmp_path, "--metrics", "x.json", "--out", str(out))
    assert proc.returncode == 2
    assert "compare.targets.2.tolerance: Input should be greater than or equal to 0" in proc.stderr
    assert "compare.floors.0.ratoi: unknown key" in proc.stderr
    assert not out.exists()


def test_load_compare_params_reads_file(tmp_path):
    (tmp_path / "params.yaml").write_text(PARAMS.replace("head: seed}}", "head: gluoncv}}", 1))
    params, targets = load_compare_params(tmp_path / "params.yaml")
    assert [t.value for t in targets] == [25.1, 77.6] and params.gate.allow_missing_base is False
