"""Start, watch and stop the processes of a distributed job, on this machine or over ssh.

``run_job(nodes, progress_timeout_s)`` starts every node, streams its output (stdout and stderr
merged) line by line with a ``[name]`` prefix, and returns once every *watched* node (the
workers) has exited 0 and the others (scheduler, servers) have followed. It raises ``JobFailed``
— after killing every process it started — when a node exits non-zero or is killed, or when no
watched node has printed a line for ``progress_timeout_s`` seconds (a parameter-server job that
lost a worker does not fail by itself: the others wait in a push/pull forever).

No orphans: each node runs in a process group (session) of its own, and stopping kills whole
groups (SIGTERM, then SIGKILL after a grace period), so children a node forked (DataLoader
workers) go too. Each node's stdin is a pipe the launcher never writes: a node that calls
``stages.parallel.exit_with_parent()`` kills its own group when that pipe closes, which is what
happens when the launcher dies, even by SIGKILL, and — through ssh, which forwards the end of
its stdin — on a remote host when the local ``ssh`` process is killed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
from typing import Callable, Iterator, Mapping, Optional, Sequence, TextIO

from stages.common import StageError
from stages.remote import LOCAL_HOST, local_env, ssh_argv, ssh_hint

MAX_LINE = 1 << 16  # a line longer than this is cut (a process printing without newlines)


class JobFailed(StageError):
    """A node failed or the job stopped making progress; every process was killed."""


@dataclasses.dataclass(frozen=True)
class NodeSpec:
    """One process of the job: ``argv`` run in ``cwd`` on ``host`` with ``env`` set.

    Local nodes inherit the launcher's environment with ``env`` on top; remote ones get their
    login environment with ``env`` on top. ``watched`` nodes count for the progress timeout.
    """

    name: str
    argv: tuple[str, ...]
    env: Mapping[str, str]
    host: str = LOCAL_HOST
    cwd: str = "."
    watched: bool = False


def describe_exit(code: int) -> str:
    """'exited with code 3' / 'was killed by signal 9 (SIGKILL)'."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "unknown"
        return f"was killed by signal {-code} ({name})"
    return f"exited with code {code}"


class _Node:
    """A started node: its process, output buffer and last output time."""

    def __init__(self, spec: NodeSpec, started: float) -> None:
        self.spec = spec
        if spec.host == LOCAL_HOST:
            cmd, env, cwd = list(spec.argv), local_env(spec.env), spec.cwd
        else:
            cmd, env, cwd = ssh_argv(spec.host, spec.argv, spec.env, spec.cwd), None, None
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        os.set_blocking(self.proc.stdout.fileno(), False)
        self.pending = b""
        self.last_output = started
        self.last_line = ""
        self.code: Optional[int] = None

    def label(self) -> str:
        where = "" if self.spec.host == LOCAL_HOST else f" on {self.spec.host}"
        return f"{self.spec.name} (pid {self.proc.pid}{where})"

    def group_alive(self) -> bool:
        """Whether any process of the node's group is left (the leader reaped or not)."""
        try:
            os.killpg(self.proc.pid, 0)
            return True
        except (ProcessLookupError, PermissionError):  # gone, or the id is someone else's now
            return False

    def signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)


class _Job:
    """The started nodes, their output streaming and the checks of the supervision loop."""

    def __init__(self, out: TextIO, clock: Callable[[], float]) -> None:
        self.out, self.clock = out, clock
        self.nodes: list[_Node] = []
        self.selector = selectors.DefaultSelector()

    def start(self, spec: NodeSpec) -> None:
        node = _Node(spec, self.clock())
        self.nodes.append(node)
        self.selector.register(node.proc.stdout, selectors.EVENT_READ, node)

    def pump(self, wait_s: float) -> None:
        """Print the complete lines that arrive within ``wait_s`` seconds."""
        if not self.selector.get_map():
            time.sleep(wait_s)
            return
        for key, _ in self.selector.select(wait_s):
            self.read(key.data)

    def read(self, node: _Node) -> bool:
        """Read and print what the node's pipe holds; False when nothing was there."""
        try:
            chunk = os.read(node.proc.stdout.fileno(), MAX_LINE)
        except (BlockingIOError, InterruptedError):  # nothing available right now
            return False
        if not chunk:  # end of output: print what is left, stop watching the pipe
            self.selector.unregister(node.proc.stdout)
            node.proc.stdout.close()
            if node.pending:
                self.emit(node, node.pending)
            node.pending = b""
            return False
        lines = (node.pending + chunk).split(b"\n")
        node.pending = lines.pop()
        if len(node.pending) >= MAX_LINE:
            lines.append(node.pending)
            node.pending = b""
        for line in lines:
            self.emit(node, line)
        return True

    def emit(self, node: _Node, raw: bytes) -> None:
        line = raw.decode("utf-8", "replace").rstrip("\r")
        node.last_output, node.last_line = self.clock(), line
        self.out.write(f"[{node.spec.name}] {line}\n")
        self.out.flush()

    def drain(self, node: _Node) -> None:
        """Print what an exited node left in its pipe (its last words: a traceback).

        Bounded: a child the node left behind may hold the pipe open and keep writing.
        """
        for _ in range(256):
            if node.proc.stdout.closed or not self.read(node):
                return

    def reap(self) -> list[_Node]:
        """Nodes that exited since the last call (their exit codes recorded)."""
        exited = []
        for node in self.nodes:
            if node.code is None and node.proc.poll() is not None:
                node.code = node.proc.returncode
                self.drain(node)
                exited.append(node)
        return exited

    def stop(self, grace_s: float) -> list[_Node]:
        """Close every stdin, SIGTERM every group, SIGKILL what is left after ``grace_s``.

        Returns the nodes whose group still had processes when the job was over (stray
        children of a finished node included), all killed.
        """
        for node in self.nodes:
            with contextlib.suppress(OSError):
                node.proc.stdin.close()
        self.reap()
        leftover = [n for n in self.nodes if n.code is None or n.group_alive()]
        for node in leftover:
            node.signal_group(signal.SIGTERM)
        deadline = self.clock() + grace_s
        while self.clock() < deadline:
            self.pump(0.1)
            self.reap()
            if not any(n.code is None or n.group_alive() for n in leftover):
                break
        for node in self.nodes:
            node.signal_group(signal.SIGKILL)
        for node in self.nodes:
            node.proc.wait()
            node.code = node.proc.returncode if node.code is None else node.code
        for node in self.nodes:  # every writer is dead now: the pipes end
            self.drain(node)
            if not node.proc.stdout.closed:
                self.selector.unregister(node.proc.stdout)
                node.proc.stdout.close()
        self.selector.close()
        return leftover


def run_job(nodes: Sequence[NodeSpec], progress_timeout_s: float, out: TextIO | None = None,
            grace_s: float = 5.0, linger_s: float = 60.0,
            clock: Callable[[], float] = time.monotonic) -> None:
    """Run ``nodes`` to completion (see the module doc); raise ``JobFailed`` on failure.

    ``linger_s``: how long the unwatched nodes may take to exit after the last watched one,
    and the watched ones after an unwatched one exited 0 (a parameter server ends its own
    process once the workers are done).
    """
    if not any(n.watched for n in nodes):
        raise ValueError("a job needs at least one watched node")
    job = _Job(out or sys.stderr, clock)
    with _signals_as_errors():
        try:
            for spec in nodes:
                job.start(spec)
            _supervise(job, progress_timeout_s, linger_s)
        finally:
            leftover = job.stop(grace_s)
    stray = [n.label() for n in leftover]
    if stray:  # the job itself succeeded; say what had to be killed
        job.out.write(f"[launcher] killed processes left behind by {', '.join(stray)}\n")


def _supervise(job: _Job, timeout_s: float, linger_s: float) -> None:
    watched = [n for n in job.nodes if n.spec.watched]
    others = [n for n in job.nodes if not n.spec.watched]
    linger_since: Optional[float] = None
    while True:
        job.pump(0.2)
        failed = [n for n in job.reap() if n.code != 0]
        if failed:  # several at once: a worker's death can crash the others' ps-lite
            raise JobFailed("; ".join(f"{n.label()} {describe_exit(n.code)}"
                                      f"{ssh_hint(n.spec.host, n.code)}"
                                      for n in failed) + "; stopped every process of the job")
        now = job.clock()
        if all(n.code is not None for n in watched):
            if all(n.code is not None for n in others):
                return
            linger_since = linger_since if linger_since is not None else now
            if now - linger_since > linger_s:
                return  # the workers are done: stop() ends what did not exit by itself
            continue
        running = [n for n in watched if n.code is None]
        if linger_since is None and any(n.code == 0 for n in others):
            linger_since = now
        if linger_since is not None and now - linger_since > linger_s:
            gone = ", ".join(n.label() for n in others if n.code is not None)
            raise JobFailed(f"{gone} ended but {', '.join(n.label() for n in running)} did "
                            f"not finish within {linger_s:g} s; stopped every process")
        silent = now - max(n.last_output for n in running)
        if silent > timeout_s:
            details = "; ".join(f"{n.label()} last printed {now - n.last_output:.0f} s ago"
                                + (f": {n.last_line.strip()[:160]!r}" if n.last_line else "")
                                for n in running)
            raise JobFailed(f"no progress: no worker printed anything for {silent:.0f} s "
                            f"(progress_timeout_s {timeout_s:g}); {details}; "
                            "stopped every process of the job")


class JobInterrupted(JobFailed):
    """The launcher got SIGTERM/SIGHUP (e.g. `dvc repro` was stopped)."""


@contextlib.contextmanager
def _signals_as_errors() -> Iterator[None]:
    """While running: SIGTERM/SIGHUP raise JobInterrupted, so the job's processes are killed.

    (Python's default for those signals ends the interpreter without running ``finally``.)
    Only possible in the main thread; elsewhere the handlers are left alone.
    """
    saved = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            saved[sig] = signal.signal(sig, _interrupt)
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def _interrupt(signum: int, _frame) -> None:
    raise JobInterrupted(f"stopped by {signal.Signals(signum).name}; "
                         "killing every process of the job")
