"""Import closures read from the source: every kind of import, and imports of no module."""
from __future__ import annotations

from pathlib import Path

import pytest

from stages.tools.imports import DepsError, closure


def write_package(root: Path, files: dict[str, str]) -> Path:
    """A package named ``stages`` under ``root`` with the given module sources."""
    for rel, text in {"__init__.py": "CONSTANT = 1\n", **files}.items():
        path = root / "stages" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "stages"


MODULES = {
    "entry.py": "from stages.a import f\nimport stages.b as b\nfrom stages import CONSTANT\n"
                "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .e import X\n\n"
                "def main():\n    from stages import c\n    from . import d\n"
                "    from stages.sub.g import y\n",
    "a.py": "from stages.common import x\n\ndef f():\n    return x\n",
    "common.py": "x = 1\n",
    "b.py": "", "c.py": "", "d.py": "", "e.py": "X = 1\n", "unused.py": "",
    "sub/__init__.py": "", "sub/g.py": "from ..common import x as y\n",
    "other.py": "import importlib\n\ndef load():\n    return importlib.import_module('stages.b')\n",
}


def test_the_closure_follows_every_kind_of_import(tmp_path):
    pkg = write_package(tmp_path, MODULES)
    got = {p.relative_to(pkg).as_posix() for p in closure("stages.entry", pkg)}
    assert got == {"__init__.py", "entry.py", "a.py", "common.py", "b.py", "c.py", "d.py",
                   "e.py", "sub/__init__.py", "sub/g.py"}  # not unused.py, not other.py
    assert {p.name for p in closure("stages.other", pkg)} == {"__init__.py", "other.py", "b.py"}


def test_an_import_of_no_project_module_is_an_error(tmp_path):
    pkg = write_package(tmp_path, {"entry.py": "def f():\n    import stages.gone\n"})
    with pytest.raises(DepsError, match="imports stages.gone, which is not a module"):
        closure("stages.entry", pkg)
    with pytest.raises(DepsError, match="no module stages.nothing"):
        closure("stages.nothing", pkg)
