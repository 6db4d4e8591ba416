"""Which project modules a module imports, transitively, read from the source (AST).

Every ``import stages.x``, ``from stages.x import ...``, ``from stages import x``, relative
import and ``importlib.import_module("stages.x")`` counts, at module level or inside functions
and conditional blocks, plus the ``__init__.py`` of each package on the way.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # .../stages


class DepsError(RuntimeError):
    """The pipeline or the source cannot be read as this tool expects."""


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
