"""Running a stage on an interpreter the pinned stack can't use fails at once, saying which work."""
import glob
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT


def newer_python() -> str | None:
    """A working Python 3.12+ on this machine (PATH or pyenv's versions), if there is one."""
    pyenv_root = os.environ.get("PYENV_ROOT", str(Path.home() / ".pyenv"))
    candidates = [shutil.which("python3.12"), shutil.which("python3.13"),
                  *sorted(glob.glob(f"{pyenv_root}/versions/3.1[2-9]*/bin/python3"))]
    for exe in filter(None, candidates):
        if subprocess.run([exe, "-c", "import sys; assert sys.version_info >= (3, 12)"],
                          capture_output=True).returncode == 0:
            return exe
    return None


def test_stage_on_python_312_fails_with_supported_versions():
    exe = newer_python()
    if exe is None:
        pytest.skip("no Python 3.12+ interpreter on this machine to try the stages with")
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run([exe, "-m", "stages.gate"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "needs Python 3.10 or 3.11" in proc.stderr
    assert "Traceback" not in proc.stderr
