"""One worker's view of a data-parallel job: its rank, sums over all workers, rank 0's bytes.

``Solo`` is the single-process case (distributed off): every operation is the identity, so the
training engine runs one code path. ``KVGroup`` is a worker of a parameter-server job
(``dist_sync`` / ``dist_device_sync``): the Trainer aggregates gradients through the same
kvstore, and this class uses it for what the training loop needs besides — sums of the epoch's
counts and losses, rank 0's checkpoint bytes, a check that every worker holds the same weights.

The kvstore's values travel and are added as float32: non-negative integers go as base-4096
digits (exact sums), floats as a (hi, lo) float32 pair (a float64 passes one worker's job
unchanged to ~1e-14; with several workers the server's float32 addition of the hi parts
leaves ~6e-8 relative error — losses, reported to 6 digits).
Every collective call must be made by every worker, in the same order (they block until all
workers made it; a worker that died leaves the others blocked — the launcher's progress
timeout ends such a job).

Node helpers: ``serve()`` runs the scheduler/server roles, ``exit_with_parent()`` ends a
launched process when the launcher goes away, ``Heartbeat`` prints progress for its watchdog.
"""
from __future__ import annotations

import hashlib
import logging
import os
import signal
import stat
import sys
import threading
import time
from typing import Callable, Optional, Sequence

import numpy as np

from stages.common import StageError

log = logging.getLogger(__name__)

BASE_KEY = 1 << 20  # our kvstore keys: far above the Trainer's (parameter indices 0..P-1)
DIGIT = 1 << 12     # a digit of an integer; sums of < 4096 workers stay exact in float32
DIGITS = 4          # integers up to 2**48


class Solo:
    """The single-process 'job': rank 0 of 1; the Trainer gets the kvstore name as usual."""

    rank, size = 0, 1

    def __init__(self, kvstore: str = "device") -> None:
        self.kvstore = kvstore

    def sum(self, floats: Sequence[float] = (), ints: Sequence[int] = ()):
        return [float(x) for x in floats], [int(x) for x in ints]

    def make_trainer(self, params, optimizer: str, optimizer_params: dict):
        """A Gluon Trainer over ``params``: here exactly the single-process one."""
        from mxnet import gluon

        return gluon.Trainer(params, optimizer, optimizer_params, kvstore=self.kvstore)

    def broadcast_bytes(self, data: Optional[bytes]) -> bytes:
        return data or b""

    def prepare_trainer(self, trainer) -> None:
        pass

    def check_identical(self, arrays, what: str) -> None:
        pass


class KVGroup(Solo):
    """Worker ``rank`` of ``size`` in a parameter-server job, over the kvstore ``kv``."""

    def __init__(self, kv, rank: int, size: int) -> None:
        super().__init__(kv)
        self.kv, self.rank, self.size = kv, rank, size
        self._keys: dict[int, int] = {}

    def make_trainer(self, params, optimizer: str, optimizer_params: dict):
        """A Trainer whose gradients are averaged over the workers by the kvstore.

        As GluonCV's distributed SSD recipe (its train_ssd.py with Horovod): each worker's loss
        is normalised over its own share of the global batch, the gradients are averaged
        (``rescale_grad`` 1/size; the kvstore sums) and the learning rate is the one set for
        the global batch. Updates run on each worker (``update_on_kvstore=False``), so the
        optimizer state is local — checkpointable, and the learning-rate schedule applies.
        """
        from mxnet import gluon

        scaled = {**optimizer_params,
                  "rescale_grad": optimizer_params.get("rescale_grad", 1.0) / self.size}
        trainer = gluon.Trainer(params, optimizer, scaled, kvstore=self.kv,
                                update_on_kvstore=False)
        self.prepare_trainer(trainer)
        return trainer

    def _pushpull(self, values: np.ndarray) -> np.ndarray:
        """Sum a float32 vector over all workers (one kvstore key per vector length)."""
        import mxnet as mx

        n = max(1, len(values))
        if n not in self._keys:  # every worker makes the same calls: the keys agree
            self._keys[n] = BASE_KEY + len(self._keys)
            self.kv.init(self._keys[n], mx.nd.zeros((n,)))
        out = mx.nd.zeros((n,))
        data = np.zeros(n, np.float32)
        data[:len(values)] = values
        self.kv.pushpull(self._keys[n], mx.nd.array(data), out=out)
        return out.asnumpy()[:len(values)]

    def sum(self, floats: Sequence[float] = (), ints: Sequence[int] = ()):
        """(floats summed over workers, ints summed over workers)."""
        floats = np.asarray(floats, np.float64)
        hi = floats.astype(np.float32)
        lo = (floats - hi).astype(np.float32)
        ints = [int(x) for x in ints]
        if any(x < 0 or x >= DIGIT ** DIGITS for x in ints):
            raise ValueError(f"sum() takes integers in [0, 2**48) (got {ints})")
        digits = [(x // DIGIT ** d) % DIGIT for x in ints for d in range(DIGITS)]
        total = self._pushpull(np.concatenate([hi, lo, np.asarray(digits, np.float32)]))
        n = len(floats)
        float_sums = [float(h) + float(l) for h, l in zip(total[:n].astype(np.float64),
                                                          total[n:2 * n].astype(np.float64))]
        d = total[2 * n:].astype(np.int64).reshape(-1, DIGITS)
        int_sums = [int(sum(int(row[k]) * DIGIT ** k for k in range(DIGITS))) for row in d]
        return float_sums, int_sums

    def broadcast_bytes(self, data: Optional[bytes]) -> bytes:
        """Rank 0's ``data`` on every worker (others pass None): pushed by rank 0, zeros by
        the rest, so the sum is rank 0's values, exactly (16 bits per float32)."""
        _, (length,) = self.sum(ints=[len(data) if self.rank == 0 else 0])
        if self.rank == 0:
            padded = data + b"\0" * (length % 2)
            values = np.frombuffer(padded, "<u2").astype(np.float32)
        else:
            values = np.zeros((length + 1) // 2, np.float32)
        summed = self._pushpull(values)
        return summed.astype("<u2").tobytes()[:length]

    def prepare_trainer(self, trainer) -> None:
        """Initialise the Trainer's kvstore now, and wait until its weights are pulled.

        MXNet 1.9.1 initialises the kvstore lazily inside the first ``step``: it pulls the
        initial weights and pushes the first gradients under the same keys, as independent
        engine operations, so a worker may push before its pull is served and then receive the
        *summed gradients* as its weights (measured: workers disagreed in 4 of 8 loopback runs
        with two workers). Doing the initialisation and waiting for it first avoids that.
        (Private Trainer methods: there is no public way to do this in MXNet 1.9.1, its last
        1.x release.)
        """
        import mxnet as mx

        trainer._init_kvstore()  # pylint: disable=protected-access
        trainer._init_params()  # pylint: disable=protected-access
        mx.nd.waitall()
        if trainer._params_to_init:  # pylint: disable=protected-access
            raise StageError("some parameters are not initialised yet (deferred shapes): run "
                             "a forward pass before preparing the trainer")

    def check_identical(self, arrays, what: str) -> None:
        """Raise StageError unless every worker holds bit-identical ``arrays`` (NDArrays)."""
        digest = hashlib.md5()
        for array in arrays:
            digest.update(array.asnumpy().tobytes())
        mine = list(np.frombuffer(digest.digest(), "<u2").tolist())
        _, total = self.sum(ints=mine)
        if total != [self.size * x for x in mine]:
            raise StageError(f"worker {self.rank}: the {what} differ between workers (they "
                             "must stay identical in synchronous data-parallel training)")


def connect(kvstore: str, rank: int, size: int) -> KVGroup:
    """Join the job as worker ``rank`` of ``size`` (the DMLC_* environment names the scheduler).

    Blocks until every worker and server has joined.
    """
    import mxnet as mx

    kv = mx.kv.create(kvstore)
    if kv.num_workers != size:
        raise StageError(f"the kvstore has {kv.num_workers} workers, expected {size}")
    return KVGroup(kv, rank, size)


def exit_now_on_failure(run: Callable[[], int]) -> int:
    """Run a worker's ``run``; if it fails, end the process at once with a non-zero code.

    A worker of a dist kvstore that raises would not exit: MXNet's shutdown waits for the
    other workers in a barrier. So the error is logged and the process ends with
    ``os._exit`` (2 for bad params, 1 otherwise), which the launcher sees immediately.
    """
    from stages.config import ParamsError

    try:
        return run()
    except BaseException as exc:  # pylint: disable=broad-except
        # Keep the exception: its traceback holds the frames that hold the kvstore, and freeing
        # a dist kvstore waits for the other workers (the very hang this function avoids).
        failure = exc
    if isinstance(failure, (ParamsError, StageError)):  # a message for the user
        log.error("%s", failure)
    else:
        log.error("worker failed", exc_info=failure)
    code = 2 if isinstance(failure, ParamsError) else 1
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def serve() -> None:
    """Be the scheduler or a server (``DMLC_ROLE``) until the workers are done.

    MXNet runs those roles when it is imported, and ends the process when they are over.
    """
    role = os.environ.get("DMLC_ROLE")
    if role not in ("scheduler", "server"):
        raise StageError(f"DMLC_ROLE must be scheduler or server here (got {role!r})")
    exit_with_parent()
    import mxnet  # noqa: F401  pylint: disable=unused-import,import-outside-toplevel

    raise StageError(f"MXNet returned from its {role} role: it was built without DIST_KVSTORE")


def exit_with_parent() -> bool:
    """In a launched process: kill this process group as soon as stdin reaches its end.

    The launcher holds the other end of stdin and never writes to it, so the end means the
    launcher (or the ssh connection to it) is gone. Does nothing when stdin is not a pipe or
    socket (a process started by hand from a terminal); returns whether the watch is on.
    """
    try:
        mode = os.fstat(0).st_mode
    except OSError:
        return False
    if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
        return False

    def watch() -> None:
        try:
            while os.read(0, 4096):
                pass
        except OSError:
            pass
        if os.getpgrp() == os.getpid():
            os.killpg(os.getpgrp(), signal.SIGKILL)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
    return True


class Heartbeat:
    """Log a progress line at most every ``interval_s`` (the launcher's sign of life)."""

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s, self.clock = interval_s, clock
        self.last = clock()

    def __call__(self, message: Callable[[], str]) -> None:
        now = self.clock()
        if now - self.last >= self.interval_s:
            self.last = now
            log.info("%s", message())
