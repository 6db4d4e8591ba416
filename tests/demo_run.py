"""Helpers for tests that run the offline demo for real: a fresh copy of this checkout (what git
tracks or would track, committed in a new repository), commands run with this environment's
tools first on PATH. ``tests/conftest.py`` runs the demo once per session with them."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path


def copy_checkout(src: Path, dest: Path) -> None:
    """Copy what git tracks or would track (not ignored) from ``src``, then git init + commit.

    That is a fresh clone plus the working tree: no venv, no DVC cache, no pipeline outputs.
    """
    listing = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                              "--exclude-standard"], cwd=src, check=True,
                             capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, listing):
        if (src / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / rel, dest / rel)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "copy"]):
        subprocess.run(cmd, cwd=dest, check=True)


def run(cmd: list[str], cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run ``cmd`` with this interpreter's bin dir first on PATH (the stages call `python`)."""
    env = dict(os.environ, PATH=os.pathsep.join([str(Path(sys.executable).parent),
                                                 os.environ.get("PATH", "")]))
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    print(f"$ {' '.join(cmd)}", proc.stdout[-3000:], proc.stderr[-3000:], sep="\n")
    return proc


def dvc(*args: str, cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    """``dvc ARGS`` of this environment, in ``cwd``."""
    return run([sys.executable, "-m", "dvc", *args], cwd, timeout)


def git(*args: str, cwd: Path) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


def clone_run(run_root: Path, dest: Path) -> Path:
    """A private copy of a demo run (git history, DVC cache and outputs) a test may change."""
    shutil.copytree(run_root, dest, symlinks=True)
    return dest
