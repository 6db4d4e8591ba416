"""Polling for what background threads do, with a deadline (tests only)."""
import time


def wait_for(condition, timeout: float = 30.0) -> bool:
    """Whether ``condition()`` became true within ``timeout`` seconds (polled every 5 ms)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True
