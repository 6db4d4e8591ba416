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
import ast
import logging
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import yaml

log = logging.getLogger(__name__)

PACKAGE = "stages"
PACKAGE_DIR = Path(__file__).resolve().parents[1]  # .../stages
ROOT = PACKAGE_DIR.parent
PIPELINES = ("dvc.yaml", "demo/dvc.yaml")
# Stage modules that no pipeline cmd names but users run as stages.
EXTRA_STAGE_MODULES = ("stages.gate",)
# Data stages allowed to list only their own module: their outputs are verified against md5 and
# sha1 checksums pinned in params (data.<dataset>.archives), so a helper changing cannot make
# them wrong unnoticed, and listing shared helpers would refetch or re-extract gigabytes.
EXEMPT = {"download": "archives verified against the md5/sha1 pinned in params",
          "unpack": "input archives verified by download; expected paths checked"}
CMD_MODULE = re.compile(r"(?:^|\s)python3?\s+-m\s+(\S+)")
TEMPLATE = re.compile(r"\$\{\s*([\w.]+)\s*\}")


class DepsError(RuntimeError):
    """The pipeline or the source cannot be read as this tool expects."""


# ---------------------------------------------------------------------------------------------
# Imports

def module_file(module: str, package_dir: Path = PACKAGE_DIR) -> Path | None:
    """The file of project module ``module`` (``stages.x`` or ``stages.x.y``), None if none."""
    parts = module.split(".")
    if parts[0] != package_dir.name:
        return None
    base = package_dir.joinpath(*parts[1:])
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def module_name(path: Path, package_dir: Path = PACKAGE_DIR) -> str:
    """``stages.x`` for ``<package_dir>/x.py`` (``stages.tools`` for ``tools/__init__.py``)."""
    parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_names(source: str, module: str, is_package: bool) -> tuple[set[str], set[str]]:
    """Dotted names the imports in ``source`` load, anywhere in the file (function bodies and
    conditional blocks included), relative imports resolved against ``module``.

    Returns (modules, maybe): ``modules`` must be modules; ``maybe`` are the names of a
    ``from X import name``, which are modules or attributes of X.
    """
    modules: set[str] = set()
    maybe: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            modules.add(base)
            maybe.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
        elif (isinstance(node, ast.Call) and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name)
                       and node.func.id in ("import_module", "__import__")))):
            modules.add(node.args[0].value)
    return modules, maybe


def project_imports(path: Path, package_dir: Path = PACKAGE_DIR) -> set[Path]:
    """Files of the project modules ``path`` imports (and of the packages they sit in)."""
    modules, maybe = imported_names(path.read_text(), module_name(path, package_dir),
                                    path.name == "__init__.py")
    found: set[Path] = set()
    for name in modules | maybe:
        parts = name.split(".")
        if parts[0] != package_dir.name:
            continue
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a, a.b and a.b.c
            target = module_file(".".join(parts[:i]), package_dir)
            if target is not None:
                found.add(target)
            elif name in modules:
                raise DepsError(f"{path}: imports {name}, which is not a module of the project")
            else:
                break  # a name defined in a module (from stages.x import name)
    return found


def closure(entry: str, package_dir: Path = PACKAGE_DIR) -> set[Path]:
    """Files of ``entry`` and of every project module it imports, transitively."""
    start = module_file(entry, package_dir)
    if start is None:
        raise DepsError(f"no module {entry} under {package_dir}")
    parts = entry.split(".")
    packages = [module_file(".".join(parts[:i]), package_dir) for i in range(1, len(parts))]
    seen, todo = set(), [start, *packages]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo.extend(project_imports(path, package_dir) - seen)
    return seen


# ---------------------------------------------------------------------------------------------
# Pipelines

@dataclass
class Stage:
    """One stage of a dvc.yaml as DVC resolves it (``group@item`` for foreach stages)."""

    name: str
    group: str  # the key under ``stages:`` (the foreach stage for its items)
    module: str | None  # the ``python -m`` module of its cmd, None if it runs none
    deps: list[str]


def resolve(text: str, context: dict) -> str:
    """``${name}`` templates replaced from ``context`` (dotted names look into mappings)."""
    def value(match: re.Match) -> str:
        current = context
        for part in match.group(1).split("."):
            if not isinstance(current, dict) or part not in current:
                return match.group(0)  # unresolved: left as written
            current = current[part]
        return str(current)

    return TEMPLATE.sub(value, text)


def load_stages(dvc_yaml: Path) -> list[Stage]:
    """The stages of ``dvc_yaml``, foreach stages expanded, cmd and deps templates resolved
    from its ``vars`` mappings and the item."""
    try:
        data = yaml.safe_load(dvc_yaml.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise DepsError(f"cannot read {dvc_yaml}: {exc}") from exc
    context: dict = {}
    for entry in data.get("vars", []):
        if isinstance(entry, dict):
            context.update(entry)
    stages = []
    for group, body in (data.get("stages") or {}).items():
        if "foreach" in body:
            items = resolve_items(body["foreach"], context)
            for key, item in items:
                local = {**context, "item": item, "key": key}
                stages.append(make_stage(f"{group}@{key}", group, body["do"], local))
        else:
            stages.append(make_stage(group, group, body, context))
    return stages


def resolve_items(foreach, context: dict) -> list[tuple[str, object]]:
    """(key, item) pairs of a foreach: a list (key = item), a mapping, or a ``${var}``."""
    if isinstance(foreach, str):
        name = TEMPLATE.fullmatch(foreach.strip())
        foreach = context.get(name.group(1)) if name else None
    if isinstance(foreach, dict):
        return [(str(k), v) for k, v in foreach.items()]
    if isinstance(foreach, list):
        return [(str(v), v) for v in foreach]
    raise DepsError(f"foreach {foreach!r}: expected a list, a mapping or a ${{var}} naming one")


def make_stage(name: str, group: str, body: dict, context: dict) -> Stage:
    cmd = body.get("cmd", "")
    cmd = resolve(" ".join(cmd) if isinstance(cmd, list) else str(cmd), context)
    match = CMD_MODULE.search(cmd)
    deps = [resolve(str(d if not isinstance(d, dict) else next(iter(d))), context)
            for d in body.get("deps") or []]
    return Stage(name, group, match.group(1) if match else None, deps)


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
