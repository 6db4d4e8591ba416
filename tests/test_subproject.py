"""A DVC project in a subdirectory of a git repository, laid out as demo/ is (its own .dvc,
code deps outside it like ``../stages/x.py``): experiments, direct and queued, and diffs against
a revision work from inside it, and code outside the subdirectory is hashed as a dependency.

A tiny pipeline stands in for the demo, whose queued run takes minutes (see README).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from tests.demo_run import dvc, git

LIB = '''\
import json, sys
import yaml
x = yaml.safe_load(open("params.yaml"))["p"]["x"]
open("out/value.txt", "w").write(f"{x}\\n")
json.dump({"value": x * 10}, open("metrics.json", "w"))
json.dump([{"step": i, "value": i * x} for i in range(3)], open("curve.json", "w"))
'''

DVC_YAML = """\
stages:
  make:
    cmd: mkdir -p out && python ../lib.py
    deps:
      - ../lib.py
    params:
      - p.x
    outs:
      - out
    metrics:
      - metrics.json:
          cache: false
    plots:
      - curve.json:
          cache: false
          x: step
          y: value
"""


def wait_for_queue(project: Path, timeout: float = 300) -> str:
    """Poll `dvc queue status` until nothing is queued or running; return the last status."""
    deadline = time.monotonic() + timeout
    while True:
        status = dvc("queue", "status", cwd=project).stdout
        if not any(word in status for word in ("Queued", "Running")):
            return status
        assert time.monotonic() < deadline, f"queue still busy after {timeout} s:\n{status}"
        time.sleep(2)


def experiment_values(project: Path) -> dict[str, tuple]:
    """Name -> (param p.x, metric value) of every experiment `dvc exp show --json` lists."""
    shown = json.loads(dvc("exp", "show", "--json", cwd=project).stdout)
    found = {}
    for commit in shown:
        for exp in commit.get("experiments") or []:
            for rev in exp.get("revs", []):
                data = rev["data"]
                x = data["params"]["params.yaml"]["data"]["p"]["x"]
                value = data["metrics"]["metrics.json"]["data"]["value"]
                found[rev["name"]] = (x, value)
    return found


def test_experiments_in_a_subdirectory_project(tmp_path):
    root = tmp_path / "repo"
    sub = root / "sub"
    sub.mkdir(parents=True)
    git("init", "-q", cwd=root)
    (root / "lib.py").write_text(LIB)
    assert dvc("init", "--subdir", "-q", cwd=sub).returncode == 0
    (sub / "dvc.yaml").write_text(DVC_YAML)
    (sub / "params.yaml").write_text("p:\n  x: 1\n")
    assert dvc("repro", cwd=sub).returncode == 0
    git("add", "-A", cwd=root)
    git("commit", "-qm", "baseline", cwd=root)
    assert "make" not in dvc("status", cwd=sub).stdout  # up to date

    # the dep outside the subdirectory is hashed: changing it makes the stage stale
    (root / "lib.py").write_text(LIB + "# changed\n")
    stale = dvc("status", cwd=sub).stdout
    assert "modified" in stale and "lib.py" in stale, stale
    git("checkout", "--", ".", cwd=root)

    # a queued experiment, run by the queue's worker in its own copy of the project
    queued = dvc("exp", "run", "--queue", "-S", "p.x=2", "--name", "queued-x2", cwd=sub)
    assert queued.returncode == 0
    try:
        assert dvc("queue", "start", cwd=sub).returncode == 0
        status = wait_for_queue(sub)
    finally:
        dvc("queue", "stop", cwd=sub)
    assert "Success" in status and "Failed" not in status, status
    assert experiment_values(sub)["queued-x2"] == (2, 20)

    # a direct experiment in the workspace, then diffs against the base revision
    assert dvc("exp", "run", "-S", "p.x=3", cwd=sub).returncode == 0
    diff = json.loads(dvc("metrics", "diff", "HEAD", "--json", cwd=sub).stdout)
    assert diff["metrics.json"]["value"] == {"old": 10, "new": 30, "diff": 20}
    plots = json.loads(dvc("plots", "diff", "HEAD", "--json", "-o", str(tmp_path / "p"),
                           cwd=sub).stdout)
    revs = {v["rev"] for v in plots["data"]["curve.json"][0]["content"]["data"]["values"]}
    assert revs == {"HEAD", "workspace"}
    assert (sub / "out" / "value.txt").read_text() == "3\n"
