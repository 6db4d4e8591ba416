"""Code deps: every stage of both pipelines lists its import closure, no stage module imports
another; the tool that computes, checks and writes them, on hand-made packages and pipelines."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages.tools import deps
from stages.tools.deps import problems, rewrite, stage_modules
from stages.tools.imports import closure, module_file
from tests.stages.tools.test_imports import MODULES, write_package

PIPELINES = [deps.ROOT / p for p in deps.PIPELINES]


# ---------------------------------------------------------------------------------------------
# The project

@pytest.mark.parametrize("pipeline", PIPELINES, ids=deps.PIPELINES)
def test_every_stage_lists_its_import_closure(pipeline):
    found = problems(pipeline)
    assert not found, "code deps out of date (fix: python -m stages.tools.deps --write):\n" + \
        "\n".join(found)


def test_no_stage_module_imports_another():
    modules = stage_modules(PIPELINES)
    assert {"stages.train", "stages.convert", "stages.quantize", "stages.evaluate_coco",
            "stages.evaluate_voc", "stages.generate", "stages.download", "stages.unpack",
            "stages.compare", "stages.gate"} <= modules
    files = {module_file(m): m for m in modules}
    pairs = {(m, files[f]) for m in modules for f in closure(m) & set(files)
             if files[f] != m}
    assert pairs == set(), "stage modules importing stage modules"


def test_the_cli_checks_the_project():
    done = subprocess.run([sys.executable, "-m", "stages.tools.deps", "--check"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "code deps complete" in done.stderr


# ---------------------------------------------------------------------------------------------
# The tool, on a hand-made package and pipelines

PIPELINE = """\
vars:
  - models: model   # a comment that must survive
stages:
  # the first stage
  run:
    foreach: [x, y]
    do:
      cmd: python -m stages.entry ${item} --out ${models}/${item}
      deps:
        - data/${item}
        - stages/entry.py
        - stages/unused.py
      outs:
        - ${models}/${item}
  download:
    cmd: python -m stages.b
    deps:
      - stages/b.py
  tail:
    cmd: >-
      python -m stages.sub.g
      --flag
    deps:
      - input.txt   # not code
      # a comment in the list
      - stages/sub/g.py
    params:
      - tail
"""


def project(tmp_path: Path, text: str = PIPELINE) -> tuple[Path, Path]:
    pkg = write_package(tmp_path, MODULES)
    dvc_yaml = tmp_path / "dvc.yaml"
    dvc_yaml.write_text(text)
    return pkg, dvc_yaml


def test_missing_and_stale_deps_name_the_stage_and_the_module(tmp_path):
    pkg, dvc_yaml = project(tmp_path)
    found = problems(dvc_yaml, pkg)
    assert f"{dvc_yaml}: stage run@x (python -m stages.entry) imports stages.a, missing from " \
           f"its deps: add stages/a.py" in found
    assert f"{dvc_yaml}: stage run@y (python -m stages.entry) does not import stages.unused: " \
           f"remove stages/unused.py from its deps" in found
    assert any("stage tail (python -m stages.sub.g) imports stages.common" in f for f in found)
    assert any("stage tail (python -m stages.sub.g) imports stages.sub," in f for f in found)
    # the exempt data stage only needs its own module (its closure is just __init__ + itself)
    assert not [f for f in found if "stage download" in f]


def test_exempt_stages_must_still_list_their_module_and_nothing_stale(tmp_path):
    text = PIPELINE.replace("      - stages/b.py\n", "      - stages/c.py\n")
    pkg, dvc_yaml = project(tmp_path, text)
    found = [f for f in problems(dvc_yaml, pkg) if "stage download" in f]
    assert found == [
        f"{dvc_yaml}: stage download (python -m stages.b) imports stages.b, missing from its "
        "deps: add stages/b.py",
        f"{dvc_yaml}: stage download (python -m stages.b) does not import stages.c: remove "
        "stages/c.py from its deps"]


def test_write_fixes_the_code_deps_and_keeps_every_other_line(tmp_path):
    pkg, dvc_yaml = project(tmp_path)
    new = rewrite(PIPELINE, dvc_yaml, pkg)
    dvc_yaml.write_text(new)
    assert problems(dvc_yaml, pkg) == []
    assert rewrite(new, dvc_yaml, pkg) == new  # idempotent

    def not_code(text):
        return [line for line in text.splitlines() if "- stages/" not in line]

    assert not_code(new) == not_code(PIPELINE)  # comments, order, folded cmd: all kept
    data = yaml.safe_load(new)
    assert data["stages"]["run"]["do"]["deps"] == [
        "data/${item}", "stages/entry.py", "stages/__init__.py", "stages/a.py", "stages/b.py",
        "stages/c.py", "stages/common.py", "stages/d.py", "stages/e.py", "stages/sub/__init__.py",
        "stages/sub/g.py"]
    assert data["stages"]["download"]["deps"] == ["stages/b.py"]  # exempt: left as written
    assert data["stages"]["tail"]["deps"] == [
        "input.txt", "stages/sub/g.py", "stages/__init__.py", "stages/common.py",
        "stages/sub/__init__.py"]


def test_deps_of_a_pipeline_in_a_subdirectory_are_relative_to_it(tmp_path):
    pkg = write_package(tmp_path, MODULES)
    demo = tmp_path / "demo"
    demo.mkdir()
    dvc_yaml = demo / "dvc.yaml"
    dvc_yaml.write_text("stages:\n  s:\n    cmd: python -m stages.a\n    deps:\n"
                        "      - ../stages/a.py\n")
    assert problems(dvc_yaml, pkg) == [
        f"{dvc_yaml}: stage s (python -m stages.a) imports stages, missing from its deps: add "
        "../stages/__init__.py",
        f"{dvc_yaml}: stage s (python -m stages.a) imports stages.common, missing from its "
        "deps: add ../stages/common.py"]
    dvc_yaml.write_text(rewrite(dvc_yaml.read_text(), dvc_yaml, pkg))
    assert yaml.safe_load(dvc_yaml.read_text())["stages"]["s"]["deps"] == [
        "../stages/a.py", "../stages/__init__.py", "../stages/common.py"]


def test_the_cli_reports_drift_with_exit_1_and_writes_the_fix(tmp_path):
    """The CLI run on a copy of the project (its pipelines, its package first on the path)."""
    shutil.copytree(deps.PACKAGE_DIR, tmp_path / "stages",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "demo").mkdir()
    for rel in deps.PIPELINES:
        shutil.copy(deps.ROOT / rel, tmp_path / rel)
    main = tmp_path / "dvc.yaml"
    main.write_text(main.read_text().replace("      - stages/training.py\n", "", 1))
    script = [sys.executable, "-m", "stages.tools.deps"]
    env = dict(os.environ, PYTHONPATH=str(tmp_path))  # the copy, not the editable install

    check = subprocess.run([*script, "--check"], capture_output=True, text=True, env=env,
                           cwd=tmp_path)
    assert check.returncode == 1
    assert "stage train (python -m stages.train) imports stages.training, missing from its " \
           "deps: add stages/training.py" in check.stderr
    assert f"{tmp_path}/dvc.yaml: stage" in check.stderr  # the copy was checked, not ours
    write = subprocess.run([*script, "--write"], capture_output=True, text=True, env=env,
                           cwd=tmp_path)
    assert write.returncode == 0, write.stderr
    assert main.read_text() == (deps.ROOT / "dvc.yaml").read_text()
    assert (tmp_path / "demo/dvc.yaml").read_text() == (deps.ROOT / "demo/dvc.yaml").read_text()


def test_an_unreadable_pipeline_exits_2(tmp_path, caplog):
    assert deps.main(["--check", str(tmp_path / "absent.yaml")]) == 2
    assert "cannot read" in caplog.text
