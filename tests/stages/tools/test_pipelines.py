"""Pipelines read as DVC resolves them: stage names, cmd modules and deps of both dvc.yaml
files match DVC's own index; foreach lists, mappings and ${var} items, templates."""
from __future__ import annotations

from pathlib import Path

import pytest

from stages.tools import deps
from stages.tools.imports import DepsError
from stages.tools.pipelines import CMD_MODULE, load_stages

PIPELINES = [deps.ROOT / p for p in deps.PIPELINES]


@pytest.mark.parametrize("pipeline", PIPELINES, ids=deps.PIPELINES)
def test_stages_are_read_as_dvc_resolves_them(pipeline):
    """Stage names, cmd modules and deps as DVC's own index resolves the file (templating,
    foreach), so the check sees what `dvc repro` runs."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    root = next(p for p in pipeline.resolve().parents if (p / ".dvc").is_dir())
    with Repo(str(root)) as repo:
        theirs = {s.name: ([d.def_path for d in s.deps if not isinstance(d, ParamsDependency)],
                           CMD_MODULE.search(s.cmd).group(1))
                  for s in repo.index.stages if Path(s.dvcfile.path) == pipeline.resolve()}
    ours = {s.name: (s.deps, s.module) for s in load_stages(pipeline)}
    assert ours == theirs and len(ours) >= 10


def test_foreach_forms_and_templates_are_resolved(tmp_path):
    dvc_yaml = tmp_path / "dvc.yaml"
    dvc_yaml.write_text("""\
vars:
  - out: model
    sets: [a, b]
    cfg: {mod: stages.x}
stages:
  listed:
    foreach: ${sets}
    do:
      cmd: python -m stages.y ${item} --out ${out}/${item}
      deps: ["data/${item}", "${undefined}/z"]
  mapped:
    foreach:
      first: {n: 1}
      second: {n: 2}
    do:
      cmd:
        - python -m ${cfg.mod} ${key}
        - echo ${item.n}
      deps:
        - x/${item.n}:
            hash: md5
  plain:
    cmd: echo no module
""")
    got = [(s.name, s.group, s.module, s.deps) for s in load_stages(dvc_yaml)]
    assert got == [
        ("listed@a", "listed", "stages.y", ["data/a", "${undefined}/z"]),
        ("listed@b", "listed", "stages.y", ["data/b", "${undefined}/z"]),
        ("mapped@first", "mapped", "stages.x", ["x/1"]),
        ("mapped@second", "mapped", "stages.x", ["x/2"]),
        ("plain", "plain", None, [])]


def test_unreadable_pipeline_or_foreach_is_an_error(tmp_path):
    dvc_yaml = tmp_path / "dvc.yaml"
    with pytest.raises(DepsError, match="cannot read"):
        load_stages(dvc_yaml)
    dvc_yaml.write_text("stages:\n  s:\n    foreach: ${nothing}\n    do: {cmd: echo}\n")
    with pytest.raises(DepsError, match="foreach"):
        load_stages(dvc_yaml)
