"""Idle-priority side work: the thread's priority, and never waiting on a starved thread."""
import os
import threading

import pytest

from stages import idle
from tests.stages.waiting import wait_for


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="os.SCHED_IDLE exists on Linux only")
def test_background_threads_run_at_idle_priority():
    seen = []

    def probe():
        idle.lower_thread_priority()
        seen.append(os.sched_getscheduler(0))

    thread = threading.Thread(target=probe)
    thread.start()
    thread.join()
    assert seen == [os.SCHED_IDLE]
    assert os.sched_getscheduler(0) != os.SCHED_IDLE  # the caller's thread is untouched


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="os.SCHED_IDLE exists on Linux only")
def test_a_task_runs_in_an_idle_priority_thread_and_gives_its_value():
    ran_in = []

    def work():
        ran_in.append((threading.current_thread().name, os.sched_getscheduler(0)))
        return 42

    task = idle.IdleTask(work, "probe-task")
    assert wait_for(task.done)
    assert task.result() == 42
    assert ran_in == [("probe-task", os.SCHED_IDLE)]  # computed once, in the background


def test_a_task_that_is_not_done_is_computed_by_the_caller():
    """A starved background thread (simulated: it blocks) must not make the caller wait."""
    release = threading.Event()
    calls = []

    def work():
        calls.append(threading.current_thread().name)
        if threading.current_thread().name == "stuck":
            release.wait(60)
            return "late"
        return "now"

    task = idle.IdleTask(work, "stuck")
    assert wait_for(lambda: calls)  # the background call has started ...
    assert task.result() == "now"  # ... and the caller did not wait for it
    release.set()
    assert wait_for(task.done)


def test_a_failing_task_raises_its_error_in_the_caller():
    def work():
        raise OSError("cannot read model.params")

    task = idle.IdleTask(work)
    assert wait_for(task.done)
    with pytest.raises(OSError, match="model.params"):
        task.result()

