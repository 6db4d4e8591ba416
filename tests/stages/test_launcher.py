"""The job launcher: real processes (small Python programs), real process groups, real pipes.

Remote nodes go through a stand-in ``ssh`` placed first on PATH: it drops ssh's options and the
host name and runs the remote command string with ``sh -c``, as sshd would, so the command the
launcher builds (cd, env, quoting, exec) and the stdin-end shutdown really run.
"""
from __future__ import annotations

import io
import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from stages.launcher import JobFailed, NodeSpec, run_job

HANG_GUARD_S = 120  # a broken launcher would hang forever: fail the test instead

# A node program: prints its lines, then behaves as told (exit code, sleep forever, ...).
NODE = textwrap.dedent("""
    import os, signal, subprocess, sys, time
    from stages.parallel import exit_with_parent
    marker, action = sys.argv[1], sys.argv[2]
    if os.environ.get("WATCH_STDIN") == "1":
        exit_with_parent()
    print("hello from", os.environ.get("NODE_NAME", "?"), "in", os.getcwd(), flush=True)
    print("env", os.environ.get("EXTRA", ""), "dmlc", os.environ.get("DMLC_ROLE", "-"), flush=True)
    if action == "child":  # leave a child in the group, then finish
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", marker])
        sys.exit(0)
    if action.startswith("exit"):
        print("Traceback: last words", flush=True)
        sys.exit(int(action[4:]))
    if action == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "chatty":
        for i in range(3):
            print("line", i, flush=True)
        sys.exit(0)
    if action == "hang":  # forks a child too, so the group has two processes
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", marker])
        time.sleep(600)
    if action == "ticks":  # prints forever
        while True:
            print("tick", flush=True)
            time.sleep(0.2)
""")


def node(tmp_path: Path, name: str, action: str, watched: bool = True, host: str = "localhost",
         **env) -> NodeSpec:
    return NodeSpec(name=name, argv=(sys.executable, "-c", NODE, marker(tmp_path), action),
                    env={"NODE_NAME": name, **env}, host=host, cwd=str(tmp_path),
                    watched=watched)


def marker(tmp_path: Path) -> str:
    return f"launcher-test-{tmp_path.name}"


def leftovers(tmp_path: Path) -> list[psutil.Process]:
    """Processes of this test still alive (their command line carries the test's marker)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmdline = proc.info["cmdline"] or []
        if marker(tmp_path) in cmdline and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(proc)
    return found


def wait_gone(tmp_path: Path, within_s: float = 30.0) -> list[psutil.Process]:
    deadline = time.monotonic() + within_s
    while leftovers(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.2)
    return leftovers(tmp_path)


def test_streams_every_line_with_its_node_name(tmp_path):
    out = io.StringIO()
    run_job([node(tmp_path, "server 0", "exit0", watched=False),
             node(tmp_path, "worker 0", "chatty", EXTRA="a b"),
             node(tmp_path, "worker 1", "chatty")], progress_timeout_s=60, out=out)
    lines = out.getvalue().splitlines()
    assert f"[worker 0] hello from worker 0 in {tmp_path}" in lines
    assert "[worker 0] env a b dmlc -" in lines
    assert [l for l in lines if l.startswith("[worker 1] line")] == [
        "[worker 1] line 0", "[worker 1] line 1", "[worker 1] line 2"]
    assert "[server 0] Traceback: last words" in lines
    assert not leftovers(tmp_path)


@pytest.mark.parametrize("action, needle", [("exit3", "exited with code 3"),
                                            ("sigkill", "was killed by signal 9 (SIGKILL)")])
def test_a_failed_worker_stops_the_job_and_names_itself(tmp_path, action, needle):
    out = io.StringIO()
    with pytest.raises(JobFailed) as err:
        run_job([node(tmp_path, "scheduler", "hang", watched=False),
                 node(tmp_path, "worker 0", "hang"),
                 node(tmp_path, "worker 1", action)], progress_timeout_s=HANG_GUARD_S, out=out)
    assert "worker 1 (pid " in str(err.value) and needle in str(err.value)
    assert "worker 0" not in str(err.value)
    if action == "exit3":  # its last words were printed before the job was stopped
        assert "[worker 1] Traceback: last words" in out.getvalue()
    assert not leftovers(tmp_path)  # the hanging nodes and the children they forked


def test_a_server_that_dies_stops_the_job(tmp_path):
    with pytest.raises(JobFailed, match=r"server 0 \(pid \d+\) exited with code 2"):
        run_job([node(tmp_path, "server 0", "exit2", watched=False),
                 node(tmp_path, "worker 0", "hang")], progress_timeout_s=HANG_GUARD_S,
                out=io.StringIO())
    assert not leftovers(tmp_path)


def test_silent_workers_time_out_and_are_killed(tmp_path):
    with pytest.raises(JobFailed) as err:
        run_job([node(tmp_path, "worker 0", "hang"), node(tmp_path, "worker 1", "hang")],
                progress_timeout_s=1.5, out=io.StringIO(), grace_s=1.0)
    message = str(err.value)
    assert "no progress" in message and "progress_timeout_s 1.5" in message
    assert "worker 0 (pid" in message and "worker 1 (pid" in message
    assert not leftovers(tmp_path)


def test_one_printing_worker_keeps_the_job_alive(tmp_path):
    """Progress is the job's: a worker waiting on another one (the rank 0 validating) is
    silent, the job is not stuck while some worker prints."""
    out = io.StringIO()
    with pytest.raises(JobFailed, match="exited with code 5"):
        run_job([node(tmp_path, "worker 0", "ticks"), node(tmp_path, "worker 1", "hang"),
                 NodeSpec("worker 2", (sys.executable, "-c", "import time, sys; time.sleep(4); "
                                       "sys.exit(5)", marker(tmp_path)), {}, cwd=str(tmp_path),
                          watched=True)],
                progress_timeout_s=1.0, out=out)
    assert out.getvalue().count("[worker 0] tick") > 5
    assert not leftovers(tmp_path)


def test_children_left_by_a_finished_node_are_killed_and_reported(tmp_path):
    out = io.StringIO()
    run_job([node(tmp_path, "worker 0", "child")], progress_timeout_s=60, out=out, grace_s=1.0)
    assert not leftovers(tmp_path)
    assert "killed processes left behind by worker 0" in out.getvalue()


def launcher_script(tmp_path: Path, specs: list[NodeSpec], timeout_s: float) -> list[str]:
    """A launcher in its own process (to kill it as a user or DVC would)."""
    data = json.dumps([{**s.__dict__, "env": dict(s.env)} for s in specs])
    code = ("import json, sys; from stages.launcher import NodeSpec, run_job; "
            f"run_job([NodeSpec(**d) for d in json.loads({data!r})], {timeout_s})")
    return [sys.executable, "-c", code, marker(tmp_path)]


def read_until(proc: subprocess.Popen, text: str) -> None:
    for line in proc.stdout:
        if text in line:
            return
    pytest.fail(f"the launcher ended before printing {text!r}")


def test_sigterm_to_the_launcher_kills_the_job(tmp_path):
    specs = [node(tmp_path, "server 0", "hang", watched=False), node(tmp_path, "worker 0", "ticks")]
    proc = subprocess.Popen(launcher_script(tmp_path, specs, 60), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    read_until(proc, "tick")
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=HANG_GUARD_S)
    assert proc.returncode != 0 and "stopped by SIGTERM" in output
    assert not leftovers(tmp_path)


def test_nodes_end_themselves_when_the_launcher_is_killed(tmp_path):
    """SIGKILL leaves the launcher no chance to clean up: the nodes see their stdin end."""
    specs = [node(tmp_path, "server 0", "hang", watched=False, WATCH_STDIN="1"),
             node(tmp_path, "worker 0", "ticks", WATCH_STDIN="1")]
    proc = subprocess.Popen(launcher_script(tmp_path, specs, 60), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    read_until(proc, "tick")
    assert len(leftovers(tmp_path)) >= 3  # launcher, two nodes (+ the server's child)
    proc.kill()
    proc.wait(timeout=HANG_GUARD_S)
    assert not wait_gone(tmp_path)


@pytest.fixture
def fake_ssh(tmp_path, monkeypatch) -> Path:
    """An ``ssh`` first on PATH that runs the remote command here, logging its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "ssh-calls.txt"
    script = bin_dir / "ssh"
    script.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        printf '%s\\n' "$*" >> {shlex.quote(str(log))}
        while [ $# -gt 2 ]; do shift; done   # options ... host command
        # like sshd: the remote command gets a session of its own and ssh's stdin
        exec setsid -w sh -c "$2"
    """))
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return log


def test_remote_nodes_run_through_ssh_and_die_with_the_job(tmp_path, fake_ssh):
    sub = tmp_path / "remote dir"
    sub.mkdir()
    remote = NodeSpec("worker 1", (sys.executable, "-c", NODE, marker(tmp_path), "hang"),
                      {"NODE_NAME": "worker 1", "EXTRA": "x y", "WATCH_STDIN": "1"},
                      host="gpu-host-7", cwd=str(sub))
    out = io.StringIO()
    with pytest.raises(JobFailed, match=r"worker 0 \(pid \d+\) exited with code 4"):
        run_job([remote, NodeSpec("worker 0", (sys.executable, "-c",
                                               "import time, sys; time.sleep(3); sys.exit(4)",
                                               marker(tmp_path)), {}, cwd=str(tmp_path),
                                  watched=True)], progress_timeout_s=60, out=out)
    assert f"[worker 1] hello from worker 1 in {sub}" in out.getvalue().splitlines()
    assert "[worker 1] env x y dmlc -" in out.getvalue().splitlines()
    assert "gpu-host-7" in fake_ssh.read_text()
    assert not wait_gone(tmp_path)  # the remote side ended when its ssh was killed


def test_ssh_connection_failure_is_named(tmp_path, fake_ssh):
    spec = NodeSpec("worker 1", ("sh", "-c", "exit 255"), {}, host="gpu-host-9",
                    cwd=str(tmp_path), watched=True)
    with pytest.raises(JobFailed, match="ssh's code for a failed connection to gpu-host-9"):
        run_job([spec], progress_timeout_s=60, out=io.StringIO())
