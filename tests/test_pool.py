"""The signing thread pool and in_thread(), on real threads."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.python.failure import Failure

from estd.metrics import thread_pool_statistics
from estd.pool import SigningThreadPool, in_thread

WAIT = 30.0


class CollectingReactor:
    """callFromThread that records calls, to run them on the test's thread."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, tuple[Any, ...]]] = []
        self.arrived = threading.Semaphore(0)

    def callFromThread(self, function: Any, *args: Any) -> None:
        self.calls.append((function, args))
        self.arrived.release()

    def run_one(self) -> None:
        assert self.arrived.acquire(timeout=WAIT)
        function, args = self.calls.pop(0)
        function(*args)


@pytest.fixture
def pool() -> Iterator[SigningThreadPool]:
    pool = SigningThreadPool(2, name="estd-test")
    pool.start()
    yield pool
    pool.stop()


def test_result_and_failure_reach_the_deferred(pool: SigningThreadPool) -> None:
    reactor = CollectingReactor()
    threads: list[str] = []

    def work(value: int) -> int:
        threads.append(threading.current_thread().name)
        return value * 2

    def broken() -> None:
        raise ValueError("no such CSR")

    done = in_thread(reactor, pool, work, 21)
    failed = in_thread(reactor, pool, broken)
    results: list[Any] = []
    done.addCallback(results.append)
    failed.addErrback(results.append)
    reactor.run_one()
    reactor.run_one()
    assert 42 in results
    (failure,) = [r for r in results if isinstance(r, Failure)]
    assert failure.check(ValueError)
    assert threads[0].startswith("estd-test-")


def test_statistics_count_waiting_and_busy_calls(pool: SigningThreadPool) -> None:
    started = threading.Semaphore(0)
    release = threading.Event()

    def hold() -> None:
        started.release()
        assert release.wait(WAIT)

    for _ in range(5):
        pool.callInThreadWithCallback(None, hold)
    assert started.acquire(timeout=WAIT)
    assert started.acquire(timeout=WAIT)
    assert pool.statistics() == (3, 2)
    assert thread_pool_statistics(pool) == (3, 2)
    release.set()
    pool.stop()
    assert pool.statistics() == (0, 0)


def test_work_queued_before_start_runs_after(pool: SigningThreadPool) -> None:
    fresh = SigningThreadPool(1)
    ran = threading.Event()
    fresh.callInThreadWithCallback(None, ran.set)
    assert not ran.is_set()
    fresh.start()
    assert ran.wait(WAIT)
    fresh.stop()


def test_stop_finishes_queued_work_then_joins() -> None:
    pool = SigningThreadPool(1, name="estd-stop-test")
    order: list[int] = []
    for number in range(3):
        pool.callInThreadWithCallback(None, order.append, number)
    pool.start()
    pool.stop()
    assert order == [0, 1, 2]
    assert pool.statistics() == (0, 0)
    assert not any(t.name.startswith("estd-stop-test") for t in threading.enumerate())


def test_threads_are_daemons(pool: SigningThreadPool) -> None:
    names = {t.name: t.daemon for t in threading.enumerate()}
    assert names["estd-test-1"] is True
    assert names["estd-test-2"] is True


def test_a_pool_needs_a_thread() -> None:
    with pytest.raises(ValueError, match="at least one thread"):
        SigningThreadPool(0)
