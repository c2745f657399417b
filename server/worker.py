"""One worker thread per loaded session: backends are not re-entrant, so a session runs one job at a time.

Jobs wait in a bounded queue; `submit` refuses a job at once (`QueueFullError`, a 503 with Retry-After)
instead of letting waits grow without bound. A job whose caller stopped waiting (timeout or disconnect)
is cancelled and skipped when its turn comes.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future

from sdxs_edge.errors import SDXSError


class QueueFullError(SDXSError):
    """The model's queue is full: the client should retry later."""


class Worker:
    """A thread that runs `fn(*args)` jobs for one session, in order, one at a time.

    Args:
        name: the thread's name (the model id).
        max_queue: jobs that may wait; one more is refused with QueueFullError.
    """

    def __init__(self, name: str, max_queue: int):
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._thread = threading.Thread(target=self._loop, name=f"sdxs-serve-{name}", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable, *args) -> Future:
        """Queue a job; its Future gets the result or the exception. Raises QueueFullError at once when full."""
        fut: Future = Future()
        try:
            self._queue.put_nowait((fut, fn, args))
        except queue.Full:
            raise QueueFullError(f"the model's queue is full ({self._queue.maxsize} waiting); retry shortly") from None
        return fut

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            fut, fn, args = job
            if not fut.set_running_or_notify_cancel():
                continue  # the caller gave up while it waited
            try:
                fut.set_result(fn(*args))
            except BaseException as e:  # handed to the waiting request, which turns it into a JSON error
                fut.set_exception(e)

    def stop(self, timeout: float = 5.0) -> None:
        """Finish the running job, drop the waiting ones and end the thread."""
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job[0].cancel()
        self._queue.put(None)
        self._thread.join(timeout)
