"""Group commit: the write transactions of many threads, one commit apiece batch.

A SQLite ledger takes one writer at a time, and every commit in
``synchronous=FULL`` waits for an fsync.  With each signing thread writing
its own transactions, concurrent renewals queue on SQLite's busy handler
(which polls by sleeping) and pay one fsync each.  Here one thread owns the
write connection: callers hand it their work and block until it is durable;
it runs everything queued meanwhile in one transaction, each piece under its
own savepoint, and commits once.

What a caller sees does not change: :meth:`GroupCommitter.run` returns when
its work is committed, or raises.  A piece of work that raises has only its
own savepoint rolled back; the others still commit.  A failure of the
database itself (a full disk, an I/O error, a failed COMMIT) fails every
piece of the batch, so nothing is reported durable that is not.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

T = TypeVar("T")
S = TypeVar("S", bound="Session")

MAX_BATCH = 64
"""Pieces of work in one transaction at most (a batch is whatever queued)."""


class Session(Protocol):
    """A connection in autocommit mode, as the ledger's sessions are."""

    def execute(self, sql: str, params: Any = ()) -> Any:
        """Run one statement."""


class Closed(Exception):
    """The committer was closed before this work ran."""


@dataclass(eq=False)
class _Job(Generic[S]):
    work: Callable[[S], Any]
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None


class GroupCommitter(Generic[S]):
    """Runs write transactions on one thread, several per commit.

    ``connect`` makes the writer's session (called on the writer thread);
    ``begin`` starts a write transaction; ``fatal(exc, session)`` says
    whether an exception raised by a piece of work is the database's
    failure (True: the whole batch fails with it and the session is
    dropped) or the work's own (False: only that piece fails).
    """

    def __init__(
        self,
        connect: Callable[[], S],
        begin: str,
        fatal: Callable[[BaseException], bool],
        drop: Callable[[S], None],
        name: str = "estd-ledger-writer",
    ) -> None:
        self._connect = connect
        self._begin = begin
        self._fatal = fatal
        self._drop = drop
        self._name = name
        self._queue: collections.deque[_Job[S]] = collections.deque()
        self._wakeup = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._session: S | None = None
        self.batches = 0
        """Commits made so far (each of one or more pieces of work)."""
        self.pieces = 0
        """Pieces of work committed or failed so far."""

    def run(self, work: Callable[[S], T]) -> T:
        """Run ``work(session)`` in a write transaction; return once committed."""
        job: _Job[S] = _Job(work)
        with self._wakeup:
            if self._closed:
                raise Closed("the ledger is closed")
            self._queue.append(job)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, name=self._name, daemon=True
                )
                self._thread.start()
            self._wakeup.notify()
        job.done.wait()
        if job.error is not None:
            raise job.error
        result: T = job.result
        return result

    def queued(self) -> int:
        """Pieces of work waiting for the next transaction."""
        with self._wakeup:
            return len(self._queue)

    def close(self) -> None:
        """Finish the batch in hand, fail whatever else is queued, stop."""
        with self._wakeup:
            self._closed = True
            self._wakeup.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        for job in self._take(len(self._queue)):
            job.error = Closed("the ledger is closed")
            job.done.set()
        if self._session is not None:
            self._drop(self._session)
            self._session = None

    def _take(self, most: int) -> list[_Job[S]]:
        with self._wakeup:
            count = min(most, len(self._queue))
            return [self._queue.popleft() for _ in range(count)]

    def _loop(self) -> None:
        while True:
            with self._wakeup:
                while not self._queue and not self._closed:
                    self._wakeup.wait()
                if self._closed:
                    return
            batch = self._take(MAX_BATCH)
            try:
                self._commit(batch)
            finally:
                self.batches += 1
                self.pieces += len(batch)
                for job in batch:
                    job.done.set()

    def _commit(self, batch: list[_Job[S]]) -> None:
        try:
            if self._session is None:
                self._session = self._connect()
            session = self._session
            session.execute(self._begin)
        except BaseException as exc:
            self._fail(batch, exc)
            return
        try:
            if len(batch) == 1:
                # Alone: the transaction is the work's own.
                batch[0].result = batch[0].work(session)
            else:
                for job in batch:
                    self._piece(session, job)
            session.execute("COMMIT")
        except BaseException as exc:
            try:
                session.execute("ROLLBACK")
            except BaseException:  # noqa: S110 - the first error is the one to report
                pass
            if len(batch) == 1 and not self._fatal(exc):
                batch[0].error = exc
                return
            self._fail(batch, exc)

    def _piece(self, session: S, job: _Job[S]) -> None:
        session.execute("SAVEPOINT piece")
        try:
            job.result = job.work(session)
        except BaseException as exc:
            if self._fatal(exc):
                raise
            session.execute("ROLLBACK TO piece")
            job.error = exc
        session.execute("RELEASE piece")

    def _fail(self, batch: list[_Job[S]], exc: BaseException) -> None:
        """The database failed: every piece fails with it, on a new session next."""
        for job in batch:
            job.error = exc
            job.result = None
        if self._session is not None:
            self._drop(self._session)
            self._session = None
