"""What a user's CI does, run for real on the demo: a DVC remote (a local directory), a fresh
clone that pulls everything and has nothing to run, a PR that changes one param and reruns
exactly the stages downstream of it, the gate against the base branch passing, then a harmful
change failing it. The workflow's own pull, repro and gate steps are what runs (read from
.github/workflows/ssd-repro.yml and run with bash as GitHub runs them), and the workflow is
linted with actionlint."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.demo_run import clone_run, dvc, git

WORKFLOW = Path(".github") / "workflows" / "ssd-repro.yml"
PULL = "Pull cached outputs from the DVC remote, if one is configured"
REPRO = "Reproduce the pipeline"
GATE = "Gate against targets and the base branch"
FAIL = "Fail unless the gate passed (0 pass, 1 miss or regression, 2 cannot judge)"


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
    """The steps the story below runs verbatim are there, with the commands users rely on, in
    the pipeline's directory (the job's default working directory, SSD_REPRO_DIR)."""
    flow = yaml.safe_load((repo_root / WORKFLOW).read_text())
    (job,) = flow["jobs"].values()
    assert job["defaults"]["run"]["working-directory"] == "${{ env.PIPELINE_DIR }}"
    assert flow["env"]["PIPELINE_DIR"] == "${{ vars.SSD_REPRO_DIR || '.' }}"
    steps = workflow_steps(repo_root)
    assert "dvc pull" in steps[PULL]["run"] and steps[REPRO]["run"].strip() == "dvc repro"
    gate = steps[GATE]
    assert 'python -m stages.gate --against "origin/$BASE_REF" --report gate.md' in gate["run"]
    assert gate["env"]["BASE_REF"] == "${{ github.base_ref }}"
    assert "steps.gate.outputs.code != '0'" in steps[FAIL]["if"]
    install = steps["Install the pinned stack"]
    assert install["run"] == "pip install -r requirements.txt"
    assert install["working-directory"] == "."  # requirements.txt is at the root


# --- the story ------------------------------------------------------------------------------

def run_step(step: dict, cwd: Path, tmp: Path, **env: str) -> subprocess.CompletedProcess:
    """A workflow step's ``run`` script, as GitHub runs it (bash -eo pipefail), with this
    environment's tools first on PATH and the step's env (``${{ ... }}`` values given here)."""
    outputs = {"GITHUB_OUTPUT": tmp / "github_output", "GITHUB_STEP_SUMMARY": tmp / "summary"}
    for path in outputs.values():
        path.write_text("")
    full = dict(os.environ, PATH=os.pathsep.join([str(Path(sys.executable).parent),
                                                  os.environ.get("PATH", "")]),
                **{k: str(v) for k, v in outputs.items()}, **env)
    proc = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c",
                           step["run"]], cwd=cwd, env=full, capture_output=True, text=True,
                          timeout=900)
    print(f"--- {step.get('name')}", proc.stdout[-3000:], proc.stderr[-3000:], sep="\n")
    return proc


def stages_run(proc: subprocess.CompletedProcess) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", proc.stdout))


def change_param(params: Path, line: str, new: str) -> None:
    """Replace the first line equal to ``line`` (the COCO branch comes before VOC)."""
    text = params.read_text()
    assert f"\n{line}\n" in text, line
    params.write_text(text.replace(f"\n{line}\n", f"\n{new}\n", 1))


def commit(root: Path, message: str) -> None:
    git("add", "-A", cwd=root)
    git("commit", "-qm", message, cwd=root)


def test_the_ci_story_on_the_demo(demo_run, repo_root, tmp_path):
    steps = workflow_steps(repo_root)
    base = clone_run(demo_run, tmp_path / "base")  # the base branch, with the demo's results
    branch = subprocess.run(["git", "branch", "--show-current"], cwd=base, capture_output=True,
                            text=True, check=True).stdout.strip()
    remote = tmp_path / "dvc-remote"
    assert dvc("remote", "add", "-d", "ci", str(remote), cwd=base / "demo").returncode == 0
    commit(base, "a DVC remote for CI")
    assert dvc("push", cwd=base / "demo").returncode == 0

    # CI's fresh clone: the pull restores every output, and nothing is left to run
    clone = tmp_path / "clone"
    git("clone", "-q", str(base), str(clone), cwd=tmp_path)
    demo = clone / "demo"
    assert not (demo / "model" / "voc" / "trained").exists()
    assert run_step(steps[PULL], demo, tmp_path).returncode == 0
    lock = yaml.safe_load((demo / "dvc.lock").read_text())
    outs = {o["path"] for stage in lock["stages"].values() for o in stage.get("outs", [])}
    assert outs and [o for o in outs if not (demo / o).exists()] == []
    status = dvc("status", cwd=demo)
    assert status.returncode == 0 and "Data and pipelines are up to date" in status.stdout
    assert stages_run(run_step(steps[REPRO], demo, tmp_path)) == set()

    # A PR that changes one param: exactly the stages downstream of it rerun, the gate passes
    git("checkout", "-qb", "pr", cwd=clone)
    change_param(demo / "params.yaml", "    calib_images: 64", "    calib_images: 32")
    repro = run_step(steps[REPRO], demo, tmp_path)
    assert repro.returncode == 0
    assert stages_run(repro) == {"quantize_coco", "evaluate_coco@int8", "compare"}
    commit(clone, "PR: calibrate COCO INT8 on 32 images")
    gate = run_step(steps[GATE], demo, tmp_path, BASE_REF=branch)
    assert gate.returncode == 0
    assert (tmp_path / "github_output").read_text() == "code=0\n"
    report = (demo / "gate.md").read_text()
    assert report.startswith("### SSD reproduction gate: PASS (exit 0)")
    assert f"| vs `origin/{branch}` | `coco_int8.map` |" in report
    assert (tmp_path / "summary").read_text() == report  # the job summary shows it

    # A harmful change: keep one detection per image. INT8 mAP falls far below its base value;
    # the gate fails (exit 1) and names the metric.
    change_param(demo / "params.yaml", "    post_nms: 100", "    post_nms: 1")
    repro = run_step(steps[REPRO], demo, tmp_path)
    assert repro.returncode == 0
    assert stages_run(repro) == {"convert_coco", "quantize_coco", "evaluate_coco@fp32",
                                 "evaluate_coco@int8", "convert_bf16_coco",
                                 "evaluate_coco@bf16", "compare"}
    commit(clone, "PR: one detection per image")
    gate = run_step(steps[GATE], demo, tmp_path, BASE_REF=branch)
    assert (tmp_path / "github_output").read_text() == "code=1\n"
    report = (demo / "gate.md").read_text()
    assert report.startswith("### SSD reproduction gate: FAIL (exit 1)")
    row = next(line for line in report.splitlines()
               if line.startswith(f"| vs `origin/{branch}` | `coco_int8.map` |"))
    assert "❌ **FAIL**" in row
    # and the workflow's last step turns that exit code into a failed job
    assert steps[FAIL]["if"] == "steps.gate.outputs.code != '0'"
