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
