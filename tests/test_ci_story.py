"""What a user's CI does, checked: the workflow file is valid (actionlint) and its steps are
the commands this suite runs."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import yaml

WORKFLOW = Path(".github") / "workflows" / "ssd-repro.yml"


def actionlint() -> str:
    """The actionlint binary of the pinned requirements (installed beside this interpreter)."""
    path = Path(sys.executable).with_name("actionlint")
    if not path.is_file():
        found = shutil.which("actionlint")
        assert found, "actionlint is not installed: pip install -r requirements.txt"
        path = Path(found)
    return str(path)


def lint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([actionlint(), "-no-color", str(path)], capture_output=True, text=True,
                          timeout=120)


def workflow_steps(repo_root: Path) -> dict[str, dict]:
    flow = yaml.safe_load((repo_root / WORKFLOW).read_text())
    (job,) = flow["jobs"].values()
    return {step.get("name", step.get("uses", "")): step for step in job["steps"]}


def test_the_workflow_passes_actionlint(repo_root):
    proc = lint(repo_root / WORKFLOW)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_actionlint_finds_what_is_wrong_in_a_workflow(repo_root, tmp_path):
    """Not vacuous: a step output read under a misspelt step id, and a context the job's
    defaults may not use, are both reported."""
    text = (repo_root / WORKFLOW).read_text()
    broken = text.replace("steps.gate.outputs.code", "steps.gaet.outputs.code") \
        .replace("working-directory: ${{ env.PIPELINE_DIR }}",
                 "working-directory: ${{ steps.gate.outputs.code }}")
    assert broken != text
    path = tmp_path / ".github" / "workflows" / "ssd-repro.yml"
    path.parent.mkdir(parents=True)
    path.write_text(broken)
    proc = lint(path)
    assert proc.returncode == 1
    assert 'property "gaet" is not defined' in proc.stdout
    assert 'context "steps" is not allowed here' in proc.stdout


def test_the_workflow_gates_with_the_commands_the_suite_runs(repo_root):
    """The steps test_ci_story runs verbatim are there, with the commands users rely on."""
    steps = workflow_steps(repo_root)
    assert "dvc pull" in steps[PULL]["run"] and steps[REPRO]["run"].strip() == "dvc repro"
    gate = steps[GATE]
    assert 'python -m stages.gate --against "origin/$BASE_REF" --report gate.md' in gate["run"]
    assert gate["env"]["BASE_REF"] == "${{ github.base_ref }}"
    assert "steps.gate.outputs.code != '0'" in steps[FAIL]["if"]
    assert steps["Install the pinned stack"]["run"] == "pip install -r requirements.txt"


PULL = "Pull cached outputs from the DVC remote, if one is configured"
REPRO = "Reproduce the pipeline"
GATE = "Gate against targets and the base branch"
FAIL = "Fail unless the gate passed (0 pass, 1 miss or regression, 2 cannot judge)"

