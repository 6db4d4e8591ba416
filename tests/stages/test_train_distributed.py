"""The train stage as a parameter-server job on loopback: real scheduler, server and workers
(MXNet's dist_sync), the demo SSD on a tiny generated VOC set, one OpenMP thread per worker.

Three runs of the same params are shared by the tests: one process (kvstore device), a job with
one worker and a job with two workers, worker 1 of which runs through ``ssh`` (a stand-in that
runs the remote command here, in a session of its own, as sshd would).
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import yaml

from stages.common import run_stage
from stages.outputs import MARKER
from stages.train import main
from stages.train_job import CODE_ENV, FINGERPRINT_ENV, PARAMS_ENV, code_digest
from tests.stages.train_helpers import distributed, train_params, write_devkit

HANG_GUARD_S = 600  # a broken job would hang: fail the test instead (never reached when working)
# Two workers differ from one process by per-worker BatchNorm statistics (over 4 images instead
# of 8 here) and by normalising each worker's loss over its own positive anchors (GluonCV's
# distributed recipe) instead of the batch's. Measured on this set (3 epochs, 4 seeds): the
# final-epoch loss of 2 workers is 3-7% above one process (one process on two CPU contexts,
# i.e. per-context BatchNorm alone, 1-5%); anchor accuracy differs by at most 0.022; between
# seeds one process varies by 5% (loss) and 0.03 (accuracy). Tolerances: twice the largest
# difference measured.
LOSS_REL_TOL, ACC_ABS_TOL = 0.15, 0.045
EPOCHS = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def params(**dist) -> dict:
    """Same training in every run: 3 epochs of 4 global batches of 8, mAP after the last."""
    return train_params(epochs=EPOCHS, lr=0.01, warmup_epochs=0, lr_decay_epochs=[],
                        val_interval=EPOCHS, checkpoint_interval=1, threads=1,
                        distributed=distributed(**{"scheduler_port": free_port(), **dist}))


ARGS = ["voc", "--out", "model/trained", "--checkpoints", "model/ckpt", "--live", "live",
        "--metrics", "metrics/train_voc.json", "--speed", "metrics/speed_train_voc.json"]


def setup(root: Path, devkit: Path, train: dict, **extra) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump({"train": {"voc": train}, **extra}))
    return [sys.executable, "-m", "stages.train", ARGS[0], "--data", str(devkit), *ARGS[1:]]


def run(root: Path, cmd: list[str], env: dict | None = None) -> dict:
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=HANG_GUARD_S,
                          env=env)
    return {"code": proc.returncode, "log": proc.stdout + proc.stderr, "root": root}


def results(root: Path) -> dict:
    net = json.loads((root / "model/trained/net.json").read_text())
    return {"metrics": (root / "metrics/train_voc.json").read_text(),
            "params": (root / "model/trained/net.params").read_bytes(),
            "net": net,
            "history": net["provenance"]["history"],  # the checkpoints are gone: run complete
            "live": (root / "live/metrics.json").read_text()}


@pytest.fixture(scope="module")
def devkit(tmp_path_factory) -> Path:
    return write_devkit(tmp_path_factory.mktemp("voc"))


@pytest.fixture(scope="module")
def fake_ssh(tmp_path_factory) -> dict:
    """PATH with an ``ssh`` that runs the remote command here in its own session."""
    bin_dir = tmp_path_factory.mktemp("bin")
    script = bin_dir / "ssh"
    script.write_text(textwrap.dedent("""\
        #!/bin/sh
        while [ $# -gt 2 ]; do shift; done   # options ... host command
        exec setsid -w sh -c "$2"
    """))
    script.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


@pytest.fixture(scope="module")
def single(devkit, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("single")
    done = run(root, setup(root, devkit, params(kvstore="device", workers=1)))
    assert done["code"] == 0, done["log"][-3000:]
    return {**done, **results(root)}


@pytest.fixture(scope="module")
def dist1(devkit, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("dist1")
    done = run(root, setup(root, devkit, params(workers=1)))
    assert done["code"] == 0, done["log"][-3000:]
    return {**done, **results(root)}


def dist2_params() -> dict:
    return params(workers=2, hosts=["localhost", "127.0.0.1"])  # worker 1 goes through ssh


@pytest.fixture(scope="module")
def dist2(devkit, tmp_path_factory, fake_ssh) -> dict:
    root = tmp_path_factory.mktemp("dist2")
    done = run(root, setup(root, devkit, dist2_params()), env=fake_ssh)
    assert done["code"] == 0, done["log"][-3000:]
    return {**done, **results(root)}


def job_processes(root: Path) -> list[psutil.Process]:
    """Live processes working in ``root`` (the stage's job runs every process there)."""
    found = []
    for proc in psutil.process_iter(["cwd", "status"]):
        if proc.info["cwd"] and Path(proc.info["cwd"]) == root \
                and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(proc)
    return found


# ---------------------------------------------------------------------------------------------
# Training

def test_one_worker_job_computes_exactly_what_one_process_does(single, dist1):
    """Through scheduler and server, the same batches, flips, learning rate, gradient and
    metrics: identical files (the job's own images/s aside)."""
    assert dist1["metrics"] == single["metrics"]
    assert dist1["params"] == single["params"]
    assert dist1["net"]["provenance"]["fingerprint"] == single["net"]["provenance"]["fingerprint"]
    strip = [{k: v for k, v in h.items() if k not in ("seconds", "images_per_s")}
             for h in single["history"]]
    assert [{k: v for k, v in h.items() if k not in ("seconds", "images_per_s")}
            for h in dist1["history"]] == strip
    assert "starting dist_sync" in dist1["log"] and "[worker 0] " in dist1["log"]


def test_two_workers_agree_with_one_process(single, dist2):
    one, two = json.loads(single["metrics"]), json.loads(dist2["metrics"])
    assert two["epochs"] == one["epochs"] == EPOCHS
    assert abs(two["acc"] - one["acc"]) <= ACC_ABS_TOL, (one, two)
    assert abs(two["loss"] - one["loss"]) <= LOSS_REL_TOL * one["loss"], (one, two)
    # every epoch counts both workers' shares: all 32 images, and as many anchors as one
    # process counts within a few percent (the mined negatives follow each worker's weights)
    assert [h["images"] for h in dist2["history"]] == [32] * EPOCHS
    for a, b in zip(single["history"], dist2["history"]):
        assert abs(b["counted"] - a["counted"]) <= 0.1 * a["counted"]
    assert 0.0 <= dist2["history"][-1]["map"] <= 100.0  # worker 0 validated
    assert dist2["params"] != single["params"]


def test_two_worker_job_logs_every_process_and_only_worker_0_writes(dist2):
    log = dist2["log"]
    assert "[worker 0] " in log and "[worker 1] " in log  # (scheduler, server: silent)
    assert "(worker 1 of 2)" in log and "(worker 0 of 2)" in log
    assert "published model/trained, live, metrics/train_voc.json" in log
    root = dist2["root"]
    # the launcher removed the checkpoints once it had published the outputs
    assert sorted(p.name for p in (root / "model/ckpt").iterdir()) == [MARKER]
    leftovers = [p for d in ("model", "metrics", ".") for p in (root / d).iterdir()
                 if p.name.endswith(".tmp")]
    assert not leftovers
    assert not job_processes(root)


def test_the_two_worker_model_goes_through_convert_and_evaluate(dist2, devkit, monkeypatch):
    from stages.convert import main as convert_main
    from stages.evaluate_voc import main as evaluate_main

    root = dist2["root"]
    data = yaml.safe_load((root / "params.yaml").read_text())
    data["convert"] = {"voc": {"weights": "trained", "head": "gluoncv"}}
    data["evaluate"] = {"voc": {"split": [2007, "test"], "batch_size": 4, "threads": 1,
                                "samples": 1, "draw_thresh": 0.3, "max_images": 0}}
    (root / "params.yaml").write_text(yaml.safe_dump(data))
    monkeypatch.chdir(root)
    assert run_stage(convert_main, ["voc", "--out", "model/fp32",
                                    "--trained", "model/trained"]) == 0
    assert run_stage(evaluate_main, ["voc", "fp32", "--model", "model/fp32", "--data",
                                     str(devkit), "--metrics", "metrics/voc_fp32.json",
                                     "--speed", "metrics/speed_voc_fp32.json",
                                     "--eval-dir", "eval/voc_fp32"]) == 0
    voc = json.loads((root / "metrics/voc_fp32.json").read_text())
    assert 0.0 <= voc["map"] <= 100.0


# ---------------------------------------------------------------------------------------------
# A worker dies

def wait_for(path: Path, proc: subprocess.Popen, within_s: float = HANG_GUARD_S) -> None:
    deadline = time.monotonic() + within_s
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            out = proc.stdout.read() if proc.stdout else ""
            pytest.fail(f"the stage ended (or stalled) before writing {path}:\n{out[-3000:]}")
        time.sleep(0.02)


def worker_process(root: Path, rank: int) -> psutil.Process:
    for proc in job_processes(root):
        cmdline = proc.cmdline()
        if "--role" in cmdline and cmdline[cmdline.index("--role") + 1] == "worker" \
                and cmdline[cmdline.index("--rank") + 1] == str(rank):
            return proc
    raise AssertionError(f"no worker {rank} running in {root}")


def test_a_killed_worker_fails_the_stage_and_the_rerun_resumes(devkit, tmp_path, fake_ssh,
                                                                dist2):
    train = dist2_params()
    cmd = setup(tmp_path, devkit, train)
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=fake_ssh)
    wait_for(tmp_path / "model/ckpt/epoch-0001.json", proc)
    worker_process(tmp_path, 1).kill()
    out, _ = proc.communicate(timeout=HANG_GUARD_S)
    assert proc.returncode == 1, out[-3000:]
    # worker 1 runs through ssh: its exit reaches the launcher as ssh's exit code
    assert "worker 1 (pid" in out and "on 127.0.0.1) exited with code" in out
    assert "stopped every process of the job" in out and "no progress" not in out
    assert not job_processes(tmp_path)  # scheduler, server, worker 0, the ssh of worker 1
    assert not (tmp_path / "model/trained").exists() and not (tmp_path / "live").exists()
    assert not (tmp_path / "metrics").exists() or not any((tmp_path / "metrics").iterdir())
    assert not [p for p in (tmp_path / "model").iterdir() if p.name.endswith(".tmp")]
    kept = sorted(p.name for p in (tmp_path / "model/ckpt").glob("epoch-*.json"))
    assert kept and kept[-1] < f"epoch-{EPOCHS:04d}.json"  # it did not get to the end

    train["distributed"]["scheduler_port"] = free_port()
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"train": {"voc": train}}))
    again = run(tmp_path, cmd, env=fake_ssh)
    assert again["code"] == 0, again["log"][-3000:]
    assert f"resuming from checkpoint after epoch {int(kept[-1][6:10])}/{EPOCHS}" in again["log"]
    resumed = results(tmp_path)
    # the same run as the uninterrupted one: same weights, same metrics
    assert resumed["metrics"] == dist2["metrics"] and resumed["params"] == dist2["params"]


@pytest.mark.parametrize("wrong, needle", [
    (FINGERPRINT_ENV, "worker 1: its training images under"),  # another host's other images
    (CODE_ENV, "worker 1: its code (stages/*.py in"),  # another host's other checkout
])
def test_a_worker_unlike_the_launcher_refuses_to_start(devkit, tmp_path, wrong, needle):
    from stages.train import TrainParams, fingerprint

    train = params(workers=2)
    cmd = setup(tmp_path, devkit, train) + ["--role", "worker", "--rank", "1"]
    p = TrainParams.model_validate(train)
    from stages.voc import image_ids, load_voc

    ids = image_ids(load_voc(devkit, p.splits, tuple(p.classes)))
    env = {**os.environ, PARAMS_ENV: p.model_dump_json(), CODE_ENV: code_digest(),
           FINGERPRINT_ENV: fingerprint(p.model_dump(), p.classes, ids), wrong: "0" * 64}
    done = run(tmp_path, cmd, env=env)
    assert done["code"] == 1, done["log"][-2000:]
    assert needle in done["log"] and "differ" in done["log"]


# ---------------------------------------------------------------------------------------------
# Bad settings: exit 2 before any process starts

@pytest.fixture
def taken_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.mark.parametrize("change, needle", [
    ({"kvstore": "dist_synk"}, "train.voc.distributed.kvstore: Input should be 'device', "
                               "'local', 'dist_sync' or 'dist_device_sync'"),
    ({"kvstore": "device", "workers": 2}, "workers: 2 needs kvstore dist_sync or "
                                          "dist_device_sync"),
    ({"workers": 3}, "must be a multiple of distributed.workers x devices (3): more workers "
                     "than equal shares of a batch"),
    ({"workers": 64, "batch": 64}, "64 workers but only 32 training images"),
    ({"hosts": ["localhost", "no-such-host.invalid"]}, "host 'no-such-host.invalid' cannot "
                                                       "be resolved"),
    ({"hosts": ["gpu-1", "localhost"]}, "the first host must be 'localhost'"),
    ({"hosts": "no-hosts-file.txt"}, "cannot read hosts file 'no-hosts-file.txt'"),
    ({"scheduler_host": "192.0.2.1"}, "it must be an address of this machine"),
    ({"port": "taken"}, "is already in use; choose another scheduler_port"),
    ({"missing": "progress_timeout_s"}, "train.voc.distributed.progress_timeout_s: required "
                                        "key is missing"),
])
def test_bad_settings_exit_2_before_any_process_starts(devkit, tmp_path, monkeypatch, capsys,
                                                       taken_port, change, needle):
    change = dict(change)
    batch = change.pop("batch", 8)
    train = params()
    if change.pop("port", None):
        train["distributed"]["scheduler_port"] = taken_port
    missing = change.pop("missing", None)
    train["distributed"].update(change)
    if missing:
        del train["distributed"][missing]
    train["batch_size"] = batch
    setup(tmp_path, devkit, train)
    monkeypatch.chdir(tmp_path)
    code = run_stage(main, ["voc", "--data", str(devkit), *ARGS[1:]])
    err = capsys.readouterr().err
    assert code == 2 and needle in err, err[-2000:]
    assert not psutil.Process().children(recursive=True)  # no scheduler, server, worker
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # nothing written
