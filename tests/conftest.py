"""Shared test fixtures: a clean environment for the real git/DVC/MXNet runs the tests make."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="session")
def _quiet_tools_env():
    """No analytics calls, a git identity for temp repos, and threads fitting this 2-core box."""
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    os.environ.setdefault("GIT_AUTHOR_NAME", "ssd-repro tests")
    os.environ.setdefault("GIT_AUTHOR_EMAIL", "tests@example.invalid")
    os.environ.setdefault("GIT_COMMITTER_NAME", "ssd-repro tests")
    os.environ.setdefault("GIT_COMMITTER_EMAIL", "tests@example.invalid")
    os.environ.setdefault("MXNET_CPU_WORKER_NTHREADS", "2")
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    yield


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> Path:
    """One real run of the offline demo, shared by every test that needs its outputs (it takes
    minutes): a fresh copy of this checkout, `dvc repro` in demo/, the results committed.

    Returns the copy's root (demo/ is the pipeline). Treat it as read-only: a test that changes
    anything works on its own copy (``tests.demo_run.clone_run``).
    """
    from tests.demo_run import copy_checkout, dvc, git

    root = tmp_path_factory.mktemp("demo_run") / "repo"
    root.mkdir()
    copy_checkout(REPO_ROOT, root)
    repro = dvc("repro", cwd=root / "demo")
    if repro.returncode != 0:
        pytest.fail(f"dvc repro of the demo failed (exit {repro.returncode}):\n"
                    f"{repro.stdout[-3000:]}\n{repro.stderr[-3000:]}")
    git("add", "-A", cwd=root)
    git("commit", "-qm", "demo results", cwd=root)
    return root


@pytest.fixture
def repo_root() -> Path:
    """The project checkout the tests run from."""
    return REPO_ROOT


@pytest.fixture
def archive_server(monkeypatch):
    """A real HTTP server on 127.0.0.1 serving files the test adds (see tests/httpserver.py).

    Loopback is exempted from any proxy set in the environment, so the tests reach the server.
    """
    from tests.httpserver import ArchiveServer

    for var in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(var, "127.0.0.1,localhost")
    with ArchiveServer() as server:
        yield server
