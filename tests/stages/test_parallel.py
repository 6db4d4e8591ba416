"""Worker-side collectives over a real parameter-server job on loopback (scheduler, server and
two workers started by the launcher, MXNet's dist_sync kvstore)."""
from __future__ import annotations

import io
import json
import socket
import sys
import textwrap

import pytest

from stages.cluster import DistributedParams, job_nodes, place
from stages.launcher import JobFailed, run_job
from stages.parallel import Heartbeat, Solo

HANG_GUARD_S = 300.0  # far above the test's run time: a failure must not be found by timeout

# A worker program: joins the two-worker dist_sync job as rank argv[1], then runs its body (code
# using ``rank`` and ``group``) as the inside of ``run``, under exit_now_on_failure.
WORKER_FRAME = textwrap.dedent("""
    import json, logging, os, sys
    os.environ["OMP_NUM_THREADS"] = "1"
    from stages.parallel import connect, exit_now_on_failure, exit_with_parent
    exit_with_parent()
    logging.basicConfig()

    def run():
        rank = int(sys.argv[1])
        group = connect("dist_sync", rank, 2)
    {body}

    exit_now_on_failure(run)
""")


def worker_script(body: str) -> str:
    """The worker program whose ``run`` goes on with ``body`` (after joining the job)."""
    return WORKER_FRAME.format(body=textwrap.indent(textwrap.dedent(body).strip(), "    "))


WORKER = worker_script("""
    import mxnet as mx
    import numpy as np
    from mxnet import autograd, gluon
    out = {}
    out["sum"] = group.sum([0.1 * (rank + 1), 1e10 / 3], [rank + 1, 2**40 + rank, 0])
    out["empty"] = group.sum()
    blob = bytes(range(256)) * 4 + b"odd"
    out["bytes_ok"] = group.broadcast_bytes(blob if rank == 0 else None) == blob
    out["empty_bytes"] = group.broadcast_bytes(b"" if rank == 0 else None).decode()
    # A linear model initialised differently on each worker: after the trainer is made,
    # every worker holds the same weights, and one SGD step (lr 1) subtracts the mean of
    # the workers' gradients (the gradient of sum(x @ w) is the column sums of x).
    mx.random.seed(rank)
    net = gluon.nn.Dense(1, use_bias=False, in_units=2)
    net.initialize(mx.init.Normal(1.0))
    trainer = group.make_trainer(net.collect_params(), "sgd", {"learning_rate": 1.0})
    group.check_identical([net.weight.data()], "initial weights")
    w0 = net.weight.data().asnumpy().ravel()
    xs = [np.array([[1.0, 2.0], [3.0, -1.0]]), np.array([[0.5, 0.25], [2.0, 8.0]])]
    with autograd.record():
        loss = net(mx.nd.array(xs[rank])).sum()
    loss.backward()
    trainer.step(1)
    group.check_identical([net.weight.data()], "weights")
    out["averaged"] = [net.weight.data().asnumpy().ravel().tolist(),
                       (w0 - (xs[0].sum(0) + xs[1].sum(0)) / 2).tolist()]
    try:
        group.check_identical([mx.nd.ones((3,)) * rank], "test arrays")
        out["different"] = "passed"
    except Exception as exc:
        out["different"] = str(exc)
    print("RESULT " + json.dumps(out), flush=True)
    return 0
""")


class Tee(io.StringIO):
    """Keeps the job's output for the test and shows it in pytest's report of a failure."""

    def write(self, text: str) -> int:
        sys.stdout.write(text)
        return super().write(text)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loopback(workers: int, **over) -> DistributedParams:
    return DistributedParams(**{"kvstore": "dist_sync", "workers": workers, "servers": 1,
                                "hosts": ["localhost"], "scheduler_host": "127.0.0.1",
                                "scheduler_port": free_port(), "progress_timeout_s": 120.0,
                                **over})


def run_script(tmp_path, script: str, workers: int = 2) -> list[dict]:
    p = loopback(workers)

    def command(pl):
        if pl.role == "worker":
            return [sys.executable, "-c", script, str(pl.rank)]
        return [sys.executable, "-c", "from stages.parallel import serve; serve()"]

    out = Tee()
    run_job(job_nodes(place(p.workers, p.servers, p.hosts), p, "127.0.0.1", 1, command, {},
                      str(tmp_path)), p.progress_timeout_s, out=out)
    results = {}
    for line in out.getvalue().splitlines():
        name, _, text = line.partition("] ")
        if text.startswith("RESULT "):
            results[name.strip("[")] = json.loads(text[len("RESULT "):])
    return [results[f"worker {r}"] for r in range(workers)]


def test_collectives_over_a_loopback_parameter_server(tmp_path):
    results = run_script(tmp_path, WORKER)
    for r in results:
        floats, ints = r["sum"]
        # the server adds float32 values: 2**-24 relative rounding of the sum
        assert floats == pytest.approx([0.3, 2e10 / 3], rel=2**-23)
        assert ints == [3, 2 * 2**40 + 1, 0]  # exact, beyond float32's 2**24
        assert r["empty"] == [[], []]
        assert r["bytes_ok"] and r["empty_bytes"] == ""
        assert "the test arrays differ between workers" in r["different"]
        got, want = r["averaged"]
        assert got == pytest.approx(want, rel=1e-6)


def test_solo_is_the_identity():
    solo = Solo("device")
    assert solo.sum([0.1, 2.5], [3]) == ([0.1, 2.5], [3])
    from mxnet import gluon

    net = gluon.nn.Dense(1, in_units=1)
    net.initialize()
    trainer = solo.make_trainer(net.collect_params(), "sgd", {"learning_rate": 0.1})
    assert trainer._kvstore_params["kvstore"] == "device"  # as gluon.Trainer's default
    assert solo.broadcast_bytes(b"abc") == b"abc" and (solo.rank, solo.size) == (0, 1)


def test_heartbeat_speaks_at_most_every_interval(caplog):
    now = [0.0]
    beat = Heartbeat(10.0, clock=lambda: now[0])
    with caplog.at_level("INFO", logger="stages.parallel"):
        for t in (1.0, 5.0, 10.5, 12.0, 21.0):
            now[0] = t
            beat(lambda: f"at {now[0]}")
    assert [r.getMessage() for r in caplog.records] == ["at 10.5", "at 21.0"]


def test_a_worker_that_dies_leaves_the_others_blocked_until_the_timeout(tmp_path):
    """What the launcher's progress timeout is for: dist_sync has no failure detection."""
    script = textwrap.dedent("""
        import os, sys, time
        os.environ["OMP_NUM_THREADS"] = "1"
        from stages.parallel import connect, exit_with_parent
        exit_with_parent()
        rank = int(sys.argv[1])
        group = connect("dist_sync", rank, 2)
        print("joined", flush=True)
        if rank == 1:
            time.sleep(600)  # alive but never takes part again
        group.sum([1.0])
        print("summed", flush=True)
    """)
    p = loopback(2, progress_timeout_s=10.0)
    out = Tee()
    with pytest.raises(JobFailed, match="no progress"):
        run_job(job_nodes(place(2, 1, ["localhost"]), p, "127.0.0.1", 1,
                          lambda pl: [sys.executable, "-c", script, str(pl.rank)]
                          if pl.role == "worker" else
                          [sys.executable, "-c", "from stages.parallel import serve; serve()"],
                          {}, str(tmp_path)), p.progress_timeout_s, out=out, grace_s=2)
    lines = out.getvalue().splitlines()
    assert "[worker 0] joined" in lines and "[worker 1] joined" in lines
    assert "[worker 0] summed" not in lines


def test_a_worker_that_raises_exits_at_once_instead_of_waiting_in_mxnet_shutdown(tmp_path):
    """Without exit_now_on_failure, the failed worker would sit in MXNet's exit barrier."""
    script = worker_script("""
        from stages.common import StageError
        if rank == 1:
            raise StageError("worker 1 gives up")
        group.sum([1.0])
        return 0
    """)
    p = loopback(2, progress_timeout_s=HANG_GUARD_S)
    out = Tee()
    with pytest.raises(JobFailed, match=r"worker 1 \(pid \d+\) exited with code 1"):
        run_job(job_nodes(place(2, 1, ["localhost"]), p, "127.0.0.1", 1,
                          lambda pl: [sys.executable, "-c", script, str(pl.rank)]
                          if pl.role == "worker" else
                          [sys.executable, "-c", "from stages.parallel import serve; serve()"],
                          {}, str(tmp_path)), p.progress_timeout_s, out=out, grace_s=2)
    assert "[worker 1] ERROR:stages.parallel:worker 1 gives up" in out.getvalue().splitlines()
