"""Group commit: the write transactions of many threads, one commit apiece batch.

A SQLite ledger takes one writer at a time, and every commit in
``synchronous=FULL`` waits for an fsync.  With each signing thread writing
its own transactions, concurrent renewals queue on SQLite's busy handler
(which polls by sleeping) and pay one fsync each.  Here the threads share
one write connection and take turns leading: a thread that finds no commit
in progress runs its own work at once (no handoff); threads that arrive
while one is in progress queue, and when it ends the next leader takes the
whole queue into one transaction, each piece under its own savepoint, and
commits once for all of them.

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
from dataclasses import dataclass
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
    finished: bool = False
    result: Any = None
    error: BaseException | None = None


class GroupCommitter(Generic[S]):
    """Runs write transactions for many threads, several per commit.

    ``connect`` makes the shared write session (used by one thread at a
    time, the leader); ``begin`` starts a write transaction; ``fatal(exc)``
    says whether an exception raised by a piece of work is the database's
    failure (True: the whole batch fails with it and the session is dropped
    with ``drop``) or the work's own (False: only that piece fails).
    """

    def __init__(
        self,
        connect: Callable[[], S],
        begin: str,
        fatal: Callable[[BaseException], bool],
        drop: Callable[[S], None],
    ) -> None:
        self._connect = connect
        self._begin = begin
        self._fatal = fatal
        self._drop = drop
        self._queue: collections.deque[_Job[S]] = collections.deque()
        self._turn = threading.Condition()
        self._leading = False
        self._closed = False
        self._session: S | None = None
        self.batches = 0
        """Commits made so far (each of one or more pieces of work)."""
        self.pieces = 0
        """Pieces of work committed or failed so far."""

    def run(self, work: Callable[[S], T]) -> T:
        """Run ``work(session)`` in a write transaction; return once committed."""
        job: _Job[S] = _Job(work)
        turn = self._turn
        with turn:
            if self._closed:
                raise Closed("the ledger is closed")
            self._queue.append(job)
            while True:
                while self._leading and not job.finished:
                    turn.wait()
                if job.finished:
                    break
                if self._closed:
                    self._queue.remove(job)
                    raise Closed("the ledger is closed")
                # Lead: take everything queued (ours among it, oldest first).
                self._leading = True
                count = min(MAX_BATCH, len(self._queue))
                batch = [self._queue.popleft() for _ in range(count)]
                turn.release()
                try:
                    self._commit(batch)
                finally:
                    turn.acquire()
                    for piece in batch:
                        piece.finished = True
                    self.batches += 1
                    self.pieces += len(batch)
                    self._leading = False
                    turn.notify_all()
        if job.error is not None:
            raise job.error
        result: T = job.result
        return result

    def queued(self) -> int:
        """Pieces of work waiting for the next transaction."""
        with self._turn:
            return len(self._queue)

    def close(self) -> None:
        """Let the batch in hand finish, fail whatever else is queued, stop."""
        with self._turn:
            self._closed = True
            while self._leading:
                self._turn.wait()
            for job in self._queue:
                job.error = Closed("the ledger is closed")
                job.finished = True
            self._queue.clear()
            self._turn.notify_all()
            if self._session is not None:
                self._drop(self._session)
                self._session = None

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
