"""The code deps of every stage, computed from the source: check them, or rewrite them.

    python -m stages.tools.deps --check     # exit 1, naming each stage and module, on any drift
    python -m stages.tools.deps --write     # rewrite the code entries of the deps: lists

A stage's code deps are the project modules its entry module (``python -m stages.<name>`` in its
``cmd``) imports, transitively: every ``import stages.x``, ``from stages.x import ...``,
``from stages import x`` and relative import, at module level or inside functions, plus the
``__init__.py`` of each package on the way. ``dvc.yaml`` lists them as paths
(``stages/x.py``; ``../stages/x.py`` from ``demo/``) so that changing any of them reruns the stage.

Data stages whose outputs are pinned by checksums in params (``EXEMPT``) may list fewer: only
their own module is required, and whatever they list must still be in their closure.
``--write`` replaces only the code entries of each ``deps:`` list (entry module first, then the
rest in path order) and leaves every other line of the file as it is.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from pathlib import Path
from typing import Iterable

from stages.tools.imports import PACKAGE_DIR, DepsError, closure, module_file, module_name
from stages.tools.pipelines import Stage, load_stages

log = logging.getLogger(__name__)

ROOT = PACKAGE_DIR.parent
PIPELINES = ("dvc.yaml", "demo/dvc.yaml")
# Stage modules that no pipeline cmd names but users run as stages.
EXTRA_STAGE_MODULES = ("stages.gate", "stages.frontier")
# Data stages allowed to list only their own module: their outputs are verified against md5 and
# sha1 checksums pinned in params (data.<dataset>.archives) or in GluonCV's model store registry
# (fetch_weights), so a helper changing cannot make them wrong unnoticed, and listing shared
# helpers would refetch or re-extract gigabytes.
EXEMPT = {"download": "archives verified against the md5/sha1 pinned in params",
          "unpack": "input archives verified by download; expected paths checked",
          "fetch_weights": "output verified against the sha1 GluonCV's registry pins"}


# ---------------------------------------------------------------------------------------------
# Code deps in a pipeline

def code_dep(dep: str, base: Path, package_dir: Path = PACKAGE_DIR) -> Path | None:
    """The project file a dep names (relative to the dvc.yaml's dir), None if not code."""
    path = Path(os.path.normpath(base / dep))
    if path.suffix == ".py" and package_dir in path.parents:
        return path
    return None


def dep_module(dep: str, base: Path, package_dir: Path = PACKAGE_DIR) -> str:
    """The module a code dep names (``stages.x`` for ``stages/x.py``)."""
    return module_name(Path(os.path.normpath(base / dep)), package_dir)


def as_dep(path: Path, base: Path) -> str:
    """How a dvc.yaml in ``base`` names ``path``: relative, POSIX separators."""
    return Path(os.path.relpath(path, base)).as_posix()


def stage_modules(pipelines: Iterable[Path]) -> set[str]:
    """The modules run as stages: those named in a cmd, plus EXTRA_STAGE_MODULES."""
    names = {s.module for p in pipelines for s in load_stages(p) if s.module}
    return names | set(EXTRA_STAGE_MODULES)


# ---------------------------------------------------------------------------------------------
# Checking and writing

def expected_deps(stage: Stage, base: Path, package_dir: Path = PACKAGE_DIR) -> list[str]:
    """The code deps ``stage`` must list: its entry module first, then the rest in path order."""
    entry = module_file(stage.module, package_dir)
    rest = sorted(closure(stage.module, package_dir) - {entry})
    return [as_dep(p, base) for p in [entry, *rest]]


def problems(dvc_yaml: Path, package_dir: Path = PACKAGE_DIR) -> list[str]:
    """One line per missing or stale code dep of a stage of ``dvc_yaml`` (empty: all good)."""
    base = dvc_yaml.parent.resolve()
    out = []
    for stage in load_stages(dvc_yaml):
        listed = {as_dep(p, base) for d in stage.deps
                  if (p := code_dep(d, base, package_dir)) is not None}
        if stage.module is None or not stage.module.startswith(package_dir.name + "."):
            out.extend(f"{dvc_yaml}: stage {stage.name}: lists {d} but runs no project module"
                       for d in sorted(listed))
            continue
        expected = expected_deps(stage, base, package_dir)
        required = expected[:1] if stage.group in EXEMPT else expected
        out.extend(f"{dvc_yaml}: stage {stage.name} (python -m {stage.module}) imports "
                   f"{dep_module(d, base, package_dir)}, missing from its deps: add {d}"
                   for d in required if d not in listed)
        out.extend(f"{dvc_yaml}: stage {stage.name} (python -m {stage.module}) does not import "
                   f"{dep_module(d, base, package_dir)}: remove {d} from its deps"
                   for d in sorted(listed - set(expected)))
    return out


def rewrite(text: str, dvc_yaml: Path, package_dir: Path = PACKAGE_DIR) -> str:
    """``text`` (a dvc.yaml) with each non-exempt stage's code deps replaced by the expected
    ones; every other line kept byte for byte."""
    base = dvc_yaml.parent.resolve()
    wanted: dict[str, list[str]] = {}
    for stage in load_stages(dvc_yaml):
        if stage.module is None or stage.group in EXEMPT:
            continue
        deps = expected_deps(stage, base, package_dir)
        if wanted.setdefault(stage.group, deps) != deps:
            raise DepsError(f"{dvc_yaml}: the items of {stage.group} run different modules; "
                            "their code deps cannot share one deps list")
    lines = text.splitlines(keepends=True)
    for group, deps in wanted.items():
        lines = replace_code_deps(lines, group, deps, base, package_dir)
    return "".join(lines)


def replace_code_deps(lines: list[str], group: str, deps: list[str], base: Path,
                      package_dir: Path) -> list[str]:
    """``lines`` with the code items of stage ``group``'s ``deps:`` list replaced by ``deps``
    (written where the first code item was, else after the last item)."""
    top = next((i for i, line in enumerate(lines) if line.rstrip() == "stages:"), None)
    start = next((i for i in range(top + 1, len(lines)) if re.fullmatch(
        rf"  {re.escape(group)}:\s*(#.*)?", lines[i].rstrip("\n"))), None) if top is not None \
        else None
    if start is None:
        raise DepsError(f"stage {group}: its line '  {group}:' under 'stages:' not found")
    end = next((i for i in range(start + 1, len(lines))
                if lines[i].strip() and not lines[i].startswith("   ")), len(lines))
    head = next((i for i in range(start + 1, end)
                 if re.fullmatch(r"\s+deps:\s*", lines[i].rstrip("\n"))), None)
    if head is None:
        raise DepsError(f"stage {group}: no 'deps:' list to write its code deps into")
    head_indent = len(lines[head]) - len(lines[head].lstrip())
    stop = head + 1  # the list: its items and comment lines indented below 'deps:'
    while stop < end and (lines[stop].lstrip().startswith(("- ", "#"))
                          and len(lines[stop]) - len(lines[stop].lstrip()) > head_indent):
        stop += 1
    items = [j for j in range(head + 1, stop) if lines[j].lstrip().startswith("- ")]
    if not items:
        raise DepsError(f"stage {group}: its 'deps:' list is not a block list")
    prefix = lines[items[0]][:lines[items[0]].index("- ") + 2]
    code = {j for j in items if code_dep(lines[j].split("- ", 1)[1].strip(), base,
                                         package_dir) is not None}
    at = min(code) if code else items[-1] + 1
    new = [f"{prefix}{d}\n" for d in deps]
    before = [lines[j] for j in range(head + 1, at) if j not in code]
    after = [lines[j] for j in range(at, stop) if j not in code]
    return lines[:head + 1] + before + new + after + lines[stop:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="report drift, exit 1 if any")
    mode.add_argument("--write", action="store_true", help="rewrite the code deps in place")
    parser.add_argument("pipelines", nargs="*", type=Path,
                        help=f"dvc.yaml files (default: {', '.join(PIPELINES)} of the project)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    pipelines = args.pipelines or [ROOT / p for p in PIPELINES]
    try:
        if args.write:
            for path in pipelines:
                text = path.read_text()
                new = rewrite(text, path)
                if new != text:
                    path.write_text(new)
                    log.info("rewrote the code deps of %s", path)
        found = [line for path in pipelines for line in problems(path)]
    except DepsError as exc:
        log.error("%s", exc)
        return 2
    for line in found:
        log.error("%s", line)
    if not found:
        log.info("code deps complete in %s", ", ".join(map(str, pipelines)))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
