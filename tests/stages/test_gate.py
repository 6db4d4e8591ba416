"""The gate against real git + DVC in temporary repositories (no mocks of DVC)."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages import gate

DVC = str(Path(sys.executable).with_name("dvc"))

DVC_YAML = """\
vars:
  - metrics_dir: metrics
stages:
  evaluate:
    cmd: python -c "pass"
    metrics:
      - ${metrics_dir}/coco_fp32.json: {cache: false}
      - ${metrics_dir}/coco_int8.json: {cache: false}
      - ${metrics_dir}/speed_coco_int8.json: {cache: false}
"""

PARAMS = """\
convert: {coco: {head: seed}}
compare:
  targets:
    fp32_seed: {metric: coco_fp32.map, value: 24.059, tolerance: 0.3, regression_tolerance: 0.1,
                when: {convert.coco.head: seed}}
    fp32_stock: {metric: coco_fp32.map, value: 25.1, tolerance: 0.2,
                 when: {convert.coco.head: gluoncv}}
    int8: {metric: coco_int8.map, value: 23.879, tolerance: 0.4, regression_tolerance: 0.1}
  floors:
    int8_floor: {metric: coco_int8.map, reference: coco_fp32.map, ratio: 0.99}
  gate: {allow_missing_base: false, allow_config_change: false}
"""

GOOD = {"coco_fp32": {"map": 24.1, "map50": 41.2}, "coco_int8": {"map": 23.9},
        "speed_coco_int8": {"images_per_s": 4.4}}


def sh(cwd, *cmd):
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{cmd}: {proc.stderr}"
    return proc.stdout


def write_metrics(root: Path, metrics: dict) -> None:
    for name, data in metrics.items():
        path = root / "metrics" / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(data if isinstance(data, str) else json.dumps(data))


def commit(root: Path, message: str) -> None:
    sh(root, "git", "add", "-A")
    sh(root, "git", "commit", "-q", "-m", message)


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """A git + DVC repo whose first commit holds passing metrics."""
    root = tmp_path_factory.mktemp("gate") / "repo"
    root.mkdir()
    sh(root, "git", "init", "-q")
    sh(root, DVC, "init", "-q")
    (root / "dvc.yaml").write_text(DVC_YAML)
    (root / "params.yaml").write_text(PARAMS)
    write_metrics(root, GOOD)
    commit(root, "first metrics")
    return root


@pytest.fixture
def repo(template, tmp_path):
    root = tmp_path / "repo"
    shutil.copytree(template, root, symlinks=True)
    return root


def run_gate(root: Path, monkeypatch, *args: str) -> tuple[int, str]:
    """In-process run (fast); returns the exit code and the report file's text."""
    monkeypatch.chdir(root)
    report = root.parent / "gate.md"
    code = gate.main([*args, "--report", str(report)])
    return code, report.read_text()


def test_passing_metrics_exit_0_with_markdown_report(repo, monkeypatch, capsys):
    code, report = run_gate(repo, monkeypatch)
    assert code == 0
    assert report.startswith("### SSD reproduction gate: PASS (exit 0)")
    assert "| target `fp32_seed` | `coco_fp32.map` | 24.1 | 24.059 | +0.041 | 0.3 | ✅ pass |" \
        in report
    assert ("| floor `int8_floor` | `coco_int8.map` | 23.9 | 24.1 | -0.2 | 0.241 | ✅ pass — "
            ">= 0.99 x coco_fp32.map |") in report
    assert capsys.readouterr().out == report  # the table is the product: on stdout too


@pytest.mark.parametrize("change, code, needle", [
    ({"coco_fp32": {"map": 23.7}}, 1, "❌ **FAIL**"),                  # misses 24.059 - 0.3
    ({"coco_int8": {"map": 23.8}, "coco_fp32": {"map": 24.2}}, 1,
     "❌ **FAIL** — >= 0.99 x coco_fp32.map"),  # 23.8 < 0.99 x 24.2
    ({"coco_int8": None}, 2, "cannot read metrics/coco_int8.json"),  # file missing
    ({"coco_fp32": {"map50": 41.2}}, 2, "key 'map' missing in 'coco_fp32'"),
    ({"coco_fp32": '{"map": NaN}'}, 2, "coco_fp32.map is not finite (nan)"),
    ({"coco_int8": '{"map": Infinity}'}, 2, "not finite (inf)"),
    ({"coco_fp32": '{"map": 24.1'}, 2, "metrics/coco_fp32.json is not valid JSON"),
    ({"coco_fp32": {"map": "24.1"}}, 2, "not a number"),
])
def test_failing_and_unjudgeable_metrics(repo, monkeypatch, change, code, needle):
    for name, data in change.items():
        if data is None:
            (repo / "metrics" / f"{name}.json").unlink()
    write_metrics(repo, {k: v for k, v in change.items() if v is not None})
    got, report = run_gate(repo, monkeypatch)
    assert got == code, report
    assert needle in report


def test_target_follows_the_head_param(repo, monkeypatch):
    """Switching convert.coco.head to gluoncv makes 25.1 the FP32 target: 24.1 now misses."""
    (repo / "params.yaml").write_text(PARAMS.replace("head: seed}}", "head: gluoncv}}", 1))
    code, report = run_gate(repo, monkeypatch)
    assert code == 1 and "| 24.1 | 25.1 | -1 | 0.2 | ❌ **FAIL** |" in report


def test_bad_params_and_no_dvc_yaml_cannot_judge(repo, monkeypatch):
    (repo / "params.yaml").write_text(PARAMS.replace("tolerance: 0.4", "tolerance: .nan"))
    code, report = run_gate(repo, monkeypatch)
    assert code == 2 and "compare.targets.int8.tolerance" in report
    (repo / "params.yaml").write_text(PARAMS.replace("coco_int8.map, value",
                                                     "coco_int9.map, value"))
    code, report = run_gate(repo, monkeypatch)
    assert code == 2 and "no metrics file named 'coco_int9' is declared" in report
    (repo / "params.yaml").write_text(PARAMS)
    (repo / "dvc.yaml").unlink()
    code, report = run_gate(repo, monkeypatch)
    assert code == 2 and "no dvc.yaml" in report


def test_against_catches_a_regression_between_commits(repo, monkeypatch):
    """Two commits whose metrics differ: `dvc metrics diff` shows it, the gate fails on it."""
    # 24.1 -> 23.95 still meets the target (24.059 - 0.3) but drops more than the 0.1 allowed
    write_metrics(repo, {"coco_fp32": {"map": 23.95, "map50": 41.2}})
    commit(repo, "regress fp32")
    diff = json.loads(sh(repo, DVC, "metrics", "diff", "--json", "HEAD~1"))
    assert diff["metrics/coco_fp32.json"]["map"] == pytest.approx(
        {"old": 24.1, "new": 23.95, "diff": -0.15})

    proc = subprocess.run([sys.executable, "-m", "stages.gate", "--against", "HEAD~1",
                           "--report", "gate.md"], cwd=repo, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    report = (repo / "gate.md").read_text()
    assert proc.stdout == report
    assert "| target `fp32_seed` | `coco_fp32.map` | 23.95 | 24.059 | -0.109 | 0.3 | ✅ pass |" \
        in report
    assert "| vs `HEAD~1` | `coco_fp32.map` | 23.95 | 24.1 | -0.15 | 0.1 | ❌ **FAIL** |" in report
    assert "| vs `HEAD~1` | `coco_int8.map` | 23.9 | 23.9 | +0 | 0.1 | ✅ pass |" in report
    (repo / "gate.md").unlink()

    # no regression: against itself, and after a commit that recovers
    assert run_gate(repo, monkeypatch, "--against", "HEAD")[0] == 0
    write_metrics(repo, {"coco_fp32": {"map": 24.1, "map50": 41.2}})
    commit(repo, "recover fp32")
    code, report = run_gate(repo, monkeypatch, "--against", "HEAD~1")
    assert code == 0, report
    assert "| vs `HEAD~1` | `coco_fp32.map` | 24.1 | 23.95 | +0.15 | 0.1 | ✅ pass |" in report


def test_against_fails_closed_without_a_base(repo, monkeypatch):
    code, report = run_gate(repo, monkeypatch, "--against", "no-such-rev")
    assert code == 2 and "unknown Git revision 'no-such-rev'" in report
    # a metric the base revision did not have cannot be judged ...
    write_metrics(repo, {"coco_int8": {"map": 23.9, "map_small": 5.0}})
    (repo / "params.yaml").write_text(PARAMS.replace(
        "  floors:", "    small: {metric: coco_int8.map_small, value: 5.0, tolerance: 1.0}\n"
                     "  floors:"))
    code, report = run_gate(repo, monkeypatch, "--against", "HEAD")
    assert code == 2 and "no value at HEAD" in report
    # ... unless the params accept new metrics
    params = (repo / "params.yaml").read_text()
    (repo / "params.yaml").write_text(params.replace("allow_missing_base: false",
                                                     "allow_missing_base: true"))
    code, report = run_gate(repo, monkeypatch, "--against", "HEAD")
    assert code == 0 and "new metric" in report


def test_a_sub_pipeline_gates_its_own_metrics(repo, monkeypatch):
    """As the demo: a DVC project of its own in a subdirectory (`dvc init --subdir`) is gated on
    its own dvc.yaml and params, never on the root's files of the same names."""
    demo = repo / "demo"
    demo.mkdir()
    sh(demo, DVC, "init", "--subdir", "-q")
    (demo / "dvc.yaml").write_text(DVC_YAML)
    (demo / "params.yaml").write_text(
        "compare:\n  targets:\n    ap: {metric: coco_fp32.map, value: 85.0, tolerance: 0.5}\n")
    write_metrics(demo, {"coco_fp32": {"map": 86.0}})
    code, report = run_gate(demo, monkeypatch)
    assert code == 0 and "| target `ap` | `coco_fp32.map` | 86 | 85 | +1 | 0.5 | ✅ pass |" \
        in report
    assert "coco_int8" not in report  # root targets/metrics are not mixed in
    commit(repo, "add demo")
    write_metrics(demo, {"coco_fp32": {"map": 85.2}})
    code, report = run_gate(demo, monkeypatch, "--against", "HEAD")
    assert code == 1 and "| 85.2 | 86 | -0.8 | 0.5 | ❌ **FAIL** |" in report
    # and the root project does not see the sub-project's metrics either
    code, report = run_gate(repo, monkeypatch)
    assert code == 0, report


def test_a_nested_pipeline_without_its_own_project_cannot_judge(repo, monkeypatch):
    """A second dvc.yaml inside the same DVC project declares metrics of the same names: which
    file a target means is a guess, so the gate refuses (exit 2) and says how to fix it."""
    nested = repo / "nested"
    nested.mkdir()
    (nested / "dvc.yaml").write_text(DVC_YAML)
    (nested / "params.yaml").write_text(PARAMS)
    write_metrics(nested, GOOD)
    for where in (repo, nested):
        code, report = run_gate(where, monkeypatch)
        assert code == 2, report
        assert "more than one metrics file of this DVC project is named" in report
        assert "dvc init --subdir" in report


def test_declared_metrics_come_from_dvc_not_from_the_disk(repo, monkeypatch):
    """Undeclared files are not metrics, and a declared but missing file still counts as
    declared (so the check that needs it says it cannot read it)."""
    monkeypatch.chdir(repo)
    write_metrics(repo, {"stray": {"map": 1.0}})
    (repo / "metrics" / "coco_int8.json").unlink()
    declared = gate.declared_metrics()
    assert declared == {"coco_fp32": "metrics/coco_fp32.json",
                        "coco_int8": "metrics/coco_int8.json",
                        "speed_coco_int8": "metrics/speed_coco_int8.json"}


def test_user_ci_workflow_runs_the_gate(repo_root):
    path = repo_root / ".github" / "workflows" / "ssd-repro.yml"
    flow = yaml.safe_load(path.read_text())
    assert "pull_request" in flow[True]  # YAML 1.1 reads the key `on` as True
    steps = [s for job in flow["jobs"].values() for s in job["steps"]]
    runs = "\n".join(s.get("run", "") for s in steps)
    checkout = next(s for s in steps if s.get("uses", "").startswith("actions/checkout"))
    assert checkout["with"]["fetch-depth"] == 0
    python = next(s for s in steps if s.get("uses", "").startswith("actions/setup-python"))
    assert str(python["with"]["python-version"]) == "3.11"
    for command in ("pip install -r requirements.txt", "dvc pull", "dvc repro",
                    "python -m stages.gate --against", "--report"):
        assert command in runs, command
    assert any("github-script" in s.get("uses", "") or "gh pr comment" in s.get("run", "")
               for s in steps)


# --- fails closed on every ambiguity (issue: trust) ----------------------------------------

def gate_cli(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stages.gate", *args], cwd=root,
                          capture_output=True, text=True, timeout=120)


def tree_state(root: Path) -> list[tuple[str, bytes | None]]:
    return sorted((str(p.relative_to(root)), p.read_bytes() if p.is_file() else None)
                  for p in root.rglob("*"))


@pytest.mark.parametrize("report", [".", "metrics", "..", "params.yaml", "dvc.yaml",
                                    "metrics/coco_fp32.json", "notes.md"])
def test_report_that_is_not_a_gate_report_is_refused_and_kept(repo, report):
    """`--report <dir>` used to delete the directory (with `.`, the checkout and its .git);
    `--report params.yaml` overwrote the params. Now: exit 2, CANNOT JUDGE, nothing touched."""
    (repo / "notes.md").write_text("my notes\n")
    before = tree_state(repo.parent)
    proc = gate_cli(repo, "--report", report)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout.startswith("### SSD reproduction gate: CANNOT JUDGE (exit 2)")
    assert f"--report {report}" in proc.stdout and "Traceback" not in proc.stderr
    assert tree_state(repo.parent) == before


def test_an_earlier_report_is_replaced(repo, monkeypatch):
    (repo.parent / "gate.md").write_text("### SSD reproduction gate: FAIL (exit 1)\nold\n")
    code, report = run_gate(repo, monkeypatch)
    assert code == 0 and report.startswith("### SSD reproduction gate: PASS (exit 0)")


@pytest.mark.parametrize("report", ["/proc/gate-report.md", "a-file/gate.md"])
def test_unwritable_report_is_exit_2_and_the_printed_verdict_agrees(repo, report):
    """The metrics pass, but the report cannot be written: the gate must not print PASS and
    exit otherwise (it used to print PASS, then crash with a traceback, exit 1)."""
    (repo / "a-file").write_text("a file, not a directory")
    proc = gate_cli(repo, "--report", report)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout.startswith("### SSD reproduction gate: CANNOT JUDGE (exit 2)")
    assert "PASS" not in proc.stdout and "Traceback" not in proc.stderr
    assert f"cannot write --report {report}" in proc.stdout


@pytest.mark.parametrize("rev", ["", "  "])
def test_empty_against_cannot_judge(repo, monkeypatch, rev):
    code, report = run_gate(repo, monkeypatch, "--against", rev)
    assert code == 2 and "--against is empty" in report


@pytest.mark.parametrize("content, needle", [
    ('{"map": 24.1', "is not valid JSON"),
    ("[24.1]", "does not hold a JSON object"),
    ('{"map": NaN}', "not finite"),
    ('{"map": "24.1"}', "not a number"),
    ('"24.1"', "does not hold a JSON object"),
])
def test_allow_missing_base_does_not_excuse_a_broken_base_file(repo, monkeypatch, content,
                                                               needle):
    """A base revision whose metrics file exists but cannot be judged is exit 2, even with
    allow_missing_base (which covers only a file or key the base does not have)."""
    write_metrics(repo, {"coco_fp32": content})
    (repo / "params.yaml").write_text(PARAMS.replace("allow_missing_base: false",
                                                     "allow_missing_base: true"))
    commit(repo, "a broken base")
    write_metrics(repo, GOOD)
    code, report = run_gate(repo, monkeypatch, "--against", "HEAD")
    assert code == 2, report
    assert "| vs `HEAD` | `coco_fp32.map` |" in report and needle in report
    assert "new metric" not in report.split("coco_fp32.map` |", 2)[-1].splitlines()[0]


def test_missing_base_file_or_key_is_what_allow_missing_base_accepts(repo, monkeypatch):
    (repo / "metrics" / "coco_int8.json").unlink()
    write_metrics(repo, {"coco_fp32": {"map50": 41.0}})
    commit(repo, "base without coco_int8.json and without coco_fp32.map")
    write_metrics(repo, GOOD)
    (repo / "params.yaml").write_text(PARAMS.replace("allow_missing_base: false",
                                                     "allow_missing_base: true"))
    code, report = run_gate(repo, monkeypatch, "--against", "HEAD")
    assert code == 0, report
    assert report.count("new metric; allow_missing_base") == 2


@pytest.mark.parametrize("when, needle", [
    ("{convert.coco.head: Seed}", "'Seed' is not a value convert.coco.head can take"),
    ("{convert.coco.heads: seed}", "key 'convert.coco.heads' is not in params.yaml"),
    ("{convert.coco: seed}", "is a dict, not a single value"),
])
def test_when_that_can_never_hold_cannot_judge(repo, monkeypatch, when, needle):
    """A misspelt `when` value silently dropped the target and the gate passed with a COCO FP32
    mAP of 10. Now the target that applies to nothing is exit 2."""
    write_metrics(repo, {"coco_fp32": {"map": 10.0}, "coco_int8": {"map": 9.95}})
    params = PARAMS.replace("when: {convert.coco.head: seed}", f"when: {when}", 1)
    (repo / "params.yaml").write_text(params)
    code, report = run_gate(repo, monkeypatch)
    assert code == 2 and needle in report, report


# --- like with like: a metric is compared with its base only in the same configuration -----

def switch_head(repo: Path, fp32: float, params: str = PARAMS, int8: float = 23.9) -> None:
    (repo / "params.yaml").write_text(params.replace("head: seed}}", "head: gluoncv}}", 1))
    write_metrics(repo, {"coco_fp32": {"map": fp32, "map50": 41.2}, "coco_int8": {"map": int8}})


@pytest.mark.parametrize("fp32", [25.2, 23.0])
def test_a_switched_head_is_a_changed_configuration_never_a_regression_or_a_pass(
        repo, monkeypatch, fp32):
    """The base measured the seed head (24.1), the PR the stock head: the two numbers are not
    comparable. Both are shown; the regression row is neither FAIL nor pass: exit 2."""
    switch_head(repo, fp32)
    code, report = run_gate(repo, monkeypatch, "--against", "HEAD")
    assert code == 2, report
    assert report.startswith("### SSD reproduction gate: CANNOT JUDGE (exit 2)")
    row = next(line for line in report.splitlines() if line.startswith("| vs `HEAD` | `coco_fp32"))
    assert f"| {fp32:g} | 24.1 | {fp32 - 24.1:+.6g} | 0.2 | ⚠️ **CONFIGURATION CHANGED** — " \
           "configuration changed: convert.coco.head: 'seed' at HEAD, 'gluoncv' now; not " \
           "compared (compare.gate.allow_config_change accepts it) |" in row
    # the target of the new configuration still applies, judged as usual
    verdict = "✅ pass" if fp32 >= 24.9 else "❌ **FAIL**"
    assert f"| target `fp32_stock` | `coco_fp32.map` | {fp32:g} | 25.1 |" in report
    assert verdict in report.split("target `fp32_stock`")[1].splitlines()[0]
    # INT8 has no `when` on the head in these params: compared as usual
    assert "| vs `HEAD` | `coco_int8.map` | 23.9 | 23.9 | +0 | 0.1 | ✅ pass |" in report


def test_allow_config_change_accepts_a_new_configuration(repo, monkeypatch):
    switch_head(repo, 25.2, PARAMS.replace("allow_config_change: false",
                                           "allow_config_change: true"), int8=25.0)
    code, report = run_gate(repo, monkeypatch, "--against", "HEAD")
    assert code == 0, report
    assert "| 25.2 | 24.1 | +1.1 | 0.2 | ✅ pass — configuration changed: convert.coco.head: " \
           "'seed' at HEAD, 'gluoncv' now (new configuration; allow_config_change) |" in report


def test_configuration_params_are_compared_at_both_revisions(repo, monkeypatch):
    """`configuration` names params that shape a metric without selecting its target (the
    demo's INT8 target has one for the head): changing one makes that metric incomparable."""
    params = PARAMS.replace("int8: {metric: coco_int8.map, value: 23.879, tolerance: 0.4,",
                            "int8: {metric: coco_int8.map, value: 23.879, tolerance: 0.4,\n"
                            "           configuration: [quantize.coco.calib_mode],") \
        + "quantize: {coco: {calib_mode: naive}}\n"
    (repo / "params.yaml").write_text(params)
    commit(repo, "int8 target with a configuration")
    assert run_gate(repo, monkeypatch, "--against", "HEAD")[0] == 0
    (repo / "params.yaml").write_text(params.replace("calib_mode: naive", "calib_mode: entropy"))
    code, report = run_gate(repo, monkeypatch, "--against", "HEAD")
    assert code == 2 and "quantize.coco.calib_mode: 'naive' at HEAD, 'entropy' now" in report
    # a param that is no configuration of any target (a calibration size) is compared across
    (repo / "params.yaml").write_text(params.replace("convert: {coco: {head: seed}}",
                                                     "convert: {coco: {head: seed, x: 1}}"))
    assert run_gate(repo, monkeypatch, "--against", "HEAD")[0] == 0


def test_a_base_with_targets_as_a_list_is_still_read_for_its_configuration(repo, monkeypatch):
    """The first PR after targets became a mapping compares against a base whose params.yaml
    has them as a list: its `when` keys still count."""
    old = PARAMS.replace("fp32_seed: {", "- {").replace("fp32_stock: {", "- {") \
        .replace("int8: {", "- {").replace("    int8_floor: {", "    - {")
    assert "fp32_seed" not in old
    (repo / "params.yaml").write_text(old)
    commit(repo, "old list-form params")
    (repo / "params.yaml").write_text(PARAMS)
    assert run_gate(repo, monkeypatch, "--against", "HEAD")[0] == 0
    switch_head(repo, 25.2)
    code, report = run_gate(repo, monkeypatch, "--against", "HEAD")
    assert code == 2 and "convert.coco.head: 'seed' at HEAD, 'gluoncv' now" in report


def test_a_base_params_file_that_is_not_yaml_cannot_judge(repo, monkeypatch):
    (repo / "params.yaml").write_text("compare: [unclosed\n")
    commit(repo, "broken params")
    (repo / "params.yaml").write_text(PARAMS)
    code, report = run_gate(repo, monkeypatch, "--against", "HEAD")
    assert code == 2 and "params.yaml at HEAD is not valid YAML" in report


def test_an_informational_target_never_decides_the_gate(repo, monkeypatch):
    """The training accuracy: diffed against the seed's and the base, shown, never judged."""
    info = PARAMS.replace("  floors:", "    acc: {metric: coco_fp32.map50, value: 78.35, "
                                       "tolerance: 2.0, informational: true}\n  floors:")
    (repo / "params.yaml").write_text(info)
    commit(repo, "informational target")
    write_metrics(repo, {"coco_fp32": {"map": 24.1, "map50": 12.0}})  # far below, and a drop
    code, report = run_gate(repo, monkeypatch, "--against", "HEAD")
    assert code == 0, report
    assert "| target `acc` | `coco_fp32.map50` | 12 | 78.35 | -66.35 | 2 | ℹ️ info — " \
           "informational, not judged |" in report
    assert "| vs `HEAD` | `coco_fp32.map50` | 12 | 41.2 | -29.2 | 2 | ℹ️ info — " \
           "informational, not judged |" in report
    # a missing informational metric is shown, and is not a reason to stop either
    (repo / "metrics" / "coco_fp32.json").write_text('{"map": 24.1}')
    code, report = run_gate(repo, monkeypatch)
    assert code == 0 and "informational, not judged; key 'map50' missing" in report
    # but informational targets alone cannot make a verdict
    only = "compare:\n  targets:\n    acc: {metric: coco_fp32.map, value: 1.0, tolerance: 0.0," \
           " informational: true}\n"
    (repo / "params.yaml").write_text(only)
    code, report = run_gate(repo, monkeypatch)
    assert code == 2 and "no target in params.yaml `compare.targets` that decides" in report
