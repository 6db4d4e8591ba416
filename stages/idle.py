"""Work that should only use CPU time nobody else wants: idle-priority threads.

On a machine whose cores MXNet's OpenMP threads keep busy, side work (decoding the next images,
hashing a model file for a provenance record) must not preempt them: a preempted OpenMP thread
stalls its whole team at the next barrier. Threads here run at the lowest priority the OS offers
(``SCHED_IDLE`` on Linux), so they only get cores that would otherwise idle: during a stage's
single-threaded setup, or the network's own idle moments. Such a thread may also get almost no
CPU on a busy machine, so whoever needs its result must not wait on it for long: ``IdleTask``
computes the value in the caller's thread instead when it is not ready yet.
"""
from __future__ import annotations

import os
import threading
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


def lower_thread_priority() -> None:
    """Make the calling thread run only on CPU time nobody else wants (best effort).

    Linux: ``SCHED_IDLE``. Elsewhere, or if refused: the highest nice value for this thread
    (Linux's setpriority on a thread id), else nothing.
    """
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # 0 = the calling thread
        return
    except (AttributeError, OSError):
        pass
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):
        pass


class IdleTask(Generic[T]):
    """``fn()`` started now in a daemon thread at idle priority.

    ``result()`` returns the thread's value (or raises its error) if it has finished, and
    otherwise calls ``fn()`` in the caller's thread rather than wait on a thread that may be
    starved; the late value of the background call is then dropped. ``fn`` must therefore be
    safe to run twice (e.g. hashing a file).
    """

    def __init__(self, fn: Callable[[], T], name: str = "idle-task") -> None:
        self.fn = fn
        self._done = threading.Event()
        self._value: T | None = None
        self._error: BaseException | None = None
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def _run(self) -> None:
        lower_thread_priority()
        try:
            self._value = self.fn()
        except BaseException as exc:  # pylint: disable=broad-except  # re-raised in result()
            self._error = exc
        self._done.set()

    def done(self) -> bool:
        return self._done.is_set()

    def result(self) -> T:
        if not self._done.is_set():
            return self.fn()
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]
