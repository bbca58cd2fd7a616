"""The signing thread pool: a fixed set of daemon threads and one queue.

It does what :func:`twisted.internet.threads.deferToThreadPool` needs of a
:class:`twisted.python.threadpool.ThreadPool` (``callInThreadWithCallback``,
``start``, ``stop``) and no more.  Twisted's pool coordinates its workers
through a ``Team`` that takes locks and hands work around twice per call;
under a fleet of renewals that cost about 40 µs of CPU per request more
than a queue does.  Threads are started with the service, all at once, and
never keep the process alive: after shutdown-timeout, work still signing is
abandoned and the process exits without joining it.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger(namespace="estd")

T = TypeVar("T")
OnResult = Callable[[bool, Any], None]
_Work = tuple[OnResult | None, Callable[..., Any], tuple[Any, ...], dict[str, Any]]


class WorkerPool(Protocol):
    """What :func:`in_thread` needs of a pool (tests substitute their own)."""

    def callInThreadWithCallback(
        self, onResult: OnResult | None, func: Callable[..., Any], *args: Any
    ) -> None:
        """Run ``func(*args)`` elsewhere, then ``onResult(ok, result)``."""


def in_thread(
    reactor: Any, pool: WorkerPool, func: Callable[..., T], *args: Any
) -> defer.Deferred[T]:
    """``func(*args)`` in ``pool``; its outcome fires the Deferred on the reactor.

    ``reactor`` provides IReactorFromThreads.
    """
    result: defer.Deferred[T] = defer.Deferred()

    def on_result(ok: bool, value: Any) -> None:
        reactor.callFromThread(result.callback if ok else result.errback, value)

    pool.callInThreadWithCallback(on_result, func, *args)
    return result


class SigningThreadPool:
    """``size`` threads running queued calls in order of arrival."""

    def __init__(self, size: int, name: str = "estd-signing") -> None:
        if size < 1:
            raise ValueError(f"a thread pool needs at least one thread, not {size}")
        self.size = size
        self.name = name
        self._queue: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._busy = 0
        self._lock = threading.Lock()
        self.started = False

    def start(self) -> None:
        """Start the threads; work queued before runs now."""
        if self.started:
            return
        self.started = True
        for number in range(1, self.size + 1):
            thread = threading.Thread(
                target=self._work, name=f"{self.name}-{number}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Let the threads finish the work queued so far, then join them."""
        threads, self._threads = self._threads, []
        for _ in threads:
            self._queue.put(None)
        for thread in threads:
            thread.join()
        self.started = False

    def callInThreadWithCallback(
        self,
        onResult: OnResult | None,
        func: Callable[..., Any],
        *args: Any,
        **kw: Any,
    ) -> None:
        """Run ``func(*args, **kw)`` in a thread; then ``onResult(ok, result)``
        (in that thread), where ``result`` is a Failure when ``ok`` is False."""
        self._queue.put((onResult, func, args, kw))

    def statistics(self) -> tuple[int, int]:
        """(calls waiting for a thread, threads running a call)."""
        return self._queue.qsize(), self._busy

    def _work(self) -> None:
        get = self._queue.get
        lock = self._lock
        while True:
            item = get()
            if item is None:
                return
            on_result, func, args, kw = item
            with lock:
                self._busy += 1
            try:
                result = func(*args, **kw)
                ok = True
            except BaseException:
                result = Failure()
                ok = False
            with lock:
                self._busy -= 1
            if on_result is None:
                if not ok:
                    log.failure("unhandled error in a signing thread", result)
            else:
                try:
                    on_result(ok, result)
                except BaseException:
                    log.failure("error passing a signing thread's result on")
            del item, on_result, func, args, kw, result
