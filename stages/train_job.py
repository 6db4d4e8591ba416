"""The train stage as a parameter-server job: checks first, then the processes, then outputs.

``launch`` is what ``python -m stages.train`` does when ``distributed.kvstore`` is ``dist_*``:
it refuses bad settings before any process starts (``stages.cluster``: exit 2), starts the
scheduler, the servers and the workers (``stages.launcher``: local processes or ssh), streams
their logs and fails — killing them all — if one fails or the job stops making progress.

Every node runs this same stage module with ``--role``. The workers get the launcher's validated
params (``PARAMS_ENV``, so a host with another params.yaml cannot change them), the fingerprint
of the launcher's params and image list (``FINGERPRINT_ENV``: a host whose data differs
refuses to start) and the digest of its code (``CODE_ENV``: so does a host whose checkout
differs). Worker 0 runs here and writes the stage's outputs, into temporary
paths beside them; they replace the declared outputs only once every process of the job has
ended well, so a failed job publishes nothing (checkpoints are written in place, as always:
they are the resume state).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Optional, TextIO

from stages.cluster import (DistributedParams, check_reachable, check_scheduler_address,
                            check_shards, job_nodes, place, read_hosts)
from stages.common import StageError, atomic_path
from stages.launcher import run_job

log = logging.getLogger(__name__)

PARAMS_ENV = "SSD_REPRO_TRAIN_PARAMS"
FINGERPRINT_ENV = "SSD_REPRO_TRAIN_FINGERPRINT"
CODE_ENV = "SSD_REPRO_CODE"
STAGED = ("out", "live", "metrics", "speed")  # outputs worker 0 writes to temporary paths


@dataclasses.dataclass(frozen=True)
class StagePaths:
    """The train stage's command-line paths."""

    data: Path
    out: Path
    checkpoints: Path
    live: Path
    metrics: Path
    speed: Path
    pretrained_base: Optional[Path] = None  # read by worker 0 only

    def argv(self) -> list[str]:
        base = ["--pretrained-base", str(self.pretrained_base)] if self.pretrained_base else []
        return ["--data", str(self.data), "--out", str(self.out),
                "--checkpoints", str(self.checkpoints), "--live", str(self.live),
                "--metrics", str(self.metrics), "--speed", str(self.speed), *base]


def code_digest() -> str:
    """Digest of the project's code: every ``.py`` file of the ``stages`` package."""
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def node_command(branch: str, paths: StagePaths, role: str, rank: Optional[int]) -> list[str]:
    """``python -m stages.train <branch> <paths> --role R [--rank N]`` with this venv's python."""
    argv = [sys.executable, "-m", "stages.train", branch, *paths.argv(), "--role", role]
    return argv + (["--rank", str(rank)] if rank is not None else [])


def launch(branch: str, paths: StagePaths, params_json: str, dp: DistributedParams,
           threads: int, images: int, digest: str, claim: Callable[[], None],
           out: Optional[TextIO] = None) -> None:
    """Check the settings, ``claim()`` the output directories, run the job, publish worker 0's
    outputs (see the module doc)."""
    check_shards(dp.workers, images)
    hosts = read_hosts(dp.hosts)
    scheduler_ip = check_scheduler_address(dp.scheduler_host, dp.scheduler_port)
    cwd = os.getcwd()
    check_reachable(scheduler_ip, hosts, sys.executable, cwd)
    claim()
    with contextlib.ExitStack() as stack:
        staged = dataclasses.replace(paths, **{name: stack.enter_context(
            atomic_path(getattr(paths, name))) for name in STAGED})
        env = {PARAMS_ENV: params_json, FINGERPRINT_ENV: digest, CODE_ENV: code_digest(),
               "PYTHONUNBUFFERED": "1"}
        nodes = job_nodes(place(dp.workers, dp.servers, hosts), dp, scheduler_ip, threads,
                          lambda pl: node_command(branch, staged, pl.role, pl.rank), env, cwd)
        log.info("starting %s (%s): scheduler on %s:%d, %d server(s), %d worker(s) on %s",
                 dp.kvstore, "hosts file " + dp.hosts if isinstance(dp.hosts, str) else "hosts",
                 scheduler_ip, dp.scheduler_port, dp.servers, dp.workers, ", ".join(hosts))
        run_job(nodes, dp.progress_timeout_s, out=out)
        missing = [str(getattr(paths, n)) for n in STAGED if not getattr(staged, n).exists()]
        if missing:
            raise StageError(f"the job ended but worker 0 wrote no {', '.join(missing)}")
    log.info("published %s", ", ".join(str(getattr(paths, n)) for n in STAGED))
