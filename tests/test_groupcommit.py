"""Group commit: several threads' write transactions, one commit per batch.

The committer runs on a real SQLite file.  To make a batch form on purpose,
a first piece of work holds the leading thread on an event while the other
threads queue behind it (:meth:`GroupCommitter.queued` says when they have);
releasing it lets the next leader take them all into one transaction.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from estd.groupcommit import Closed, GroupCommitter
from estd.ledger import Ledger, LedgerUnavailable, LimitReached, SerialTaken
from tests.test_ledger import T0, record

WAIT = 30.0
"""Bound for every wait on another thread (never reached when all is well)."""


class Session:
    """A sqlite3 connection in autocommit mode; COMMIT can be made to fail."""

    def __init__(self, path: Path) -> None:
        self.connection = sqlite3.connect(
            path, isolation_level=None, check_same_thread=False
        )
        self.fail_commit = False
        self.closed = False

    def execute(self, sql: str, params: Any = ()) -> list[Any]:
        if sql == "COMMIT" and self.fail_commit:
            self.fail_commit = False
            raise sqlite3.OperationalError("disk I/O error")
        return self.connection.execute(sql, params).fetchall()

    def close(self) -> None:
        self.closed = True
        self.connection.close()


class Harness:
    """A committer on a one-table database, and a way to hold its writer."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with sqlite3.connect(path) as setup:
            setup.execute("PRAGMA journal_mode=WAL")
            setup.execute("CREATE TABLE items (name TEXT PRIMARY KEY)")
        self.sessions: list[Session] = []
        self.committer: GroupCommitter[Session] = GroupCommitter(
            self.connect,
            "BEGIN IMMEDIATE",
            fatal=lambda exc: isinstance(exc, sqlite3.OperationalError),
            drop=lambda session: session.close(),
        )
        self.pool = ThreadPoolExecutor(max_workers=8)

    def connect(self) -> Session:
        session = Session(self.path)
        self.sessions.append(session)
        return session

    def committed(self) -> list[str]:
        """What another connection reads: only committed rows."""
        with sqlite3.connect(self.path) as reader:
            rows = reader.execute("SELECT name FROM items ORDER BY name").fetchall()
        return [name for (name,) in rows]

    def submit(self, work: Callable[[Session], Any]) -> Future[Any]:
        return self.pool.submit(self.committer.run, work)

    def insert(self, name: str) -> Callable[[Session], str]:
        def work(session: Session) -> str:
            session.execute("INSERT INTO items (name) VALUES (?)", (name,))
            return name

        return work

    def hold_writer(self) -> tuple[threading.Event, Future[Any]]:
        """Occupy the writer with a piece of work until the event is set."""
        entered, release = threading.Event(), threading.Event()

        def blocker(session: Session) -> str:
            entered.set()
            assert release.wait(WAIT)
            return self.insert("blocker")(session)

        held = self.submit(blocker)
        assert entered.wait(WAIT)
        return release, held

    def queue_up(self, works: list[Callable[[Session], Any]]) -> list[Future[Any]]:
        """Submit ``works`` behind a held writer; return once all are queued."""
        futures = [self.submit(work) for work in works]
        for _ in range(int(WAIT * 1000)):
            if self.committer.queued() == len(works):
                break
            threading.Event().wait(0.001)  # bounded poll of an observable state
        assert self.committer.queued() == len(works)
        return futures


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path / "items.db")
    yield harness
    harness.committer.close()
    harness.pool.shutdown()


def test_one_piece_commits_and_returns_its_result(harness: Harness) -> None:
    assert harness.committer.run(harness.insert("a")) == "a"
    assert harness.committed() == ["a"]
    assert (harness.committer.batches, harness.committer.pieces) == (1, 1)


def test_work_queued_meanwhile_commits_together(harness: Harness) -> None:
    release, held = harness.hold_writer()
    futures = harness.queue_up([harness.insert(name) for name in "bcd"])
    assert harness.committed() == []
    release.set()
    assert [f.result(WAIT) for f in futures] == ["b", "c", "d"]
    assert held.result(WAIT) == "blocker"
    assert harness.committed() == ["b", "blocker", "c", "d"]
    # The held piece alone, then the three queued behind it in one commit.
    assert (harness.committer.batches, harness.committer.pieces) == (2, 4)


def test_a_failing_piece_fails_alone(harness: Harness) -> None:
    harness.committer.run(harness.insert("taken"))
    release, _ = harness.hold_writer()

    def bad(session: Session) -> None:
        session.execute("INSERT INTO items (name) VALUES ('half-done')")
        raise ValueError("refused by the work itself")

    futures = harness.queue_up(
        [harness.insert("b"), bad, harness.insert("taken"), harness.insert("c")]
    )
    release.set()
    assert futures[0].result(WAIT) == "b"
    with pytest.raises(ValueError, match="refused by the work itself"):
        futures[1].result(WAIT)
    with pytest.raises(sqlite3.IntegrityError):
        futures[2].result(WAIT)
    assert futures[3].result(WAIT) == "c"
    # The failed pieces left nothing behind, not even their partial writes.
    assert harness.committed() == ["b", "blocker", "c", "taken"]


def test_a_database_failure_fails_the_whole_batch(harness: Harness) -> None:
    release, _ = harness.hold_writer()

    def broken(session: Session) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    futures = harness.queue_up([harness.insert("b"), broken, harness.insert("c")])
    release.set()
    for future in futures:
        with pytest.raises(sqlite3.OperationalError, match="disk is full"):
            future.result(WAIT)
    assert harness.committed() == ["blocker"]
    # The failed session was dropped; the next work gets a new one.
    assert harness.sessions[0].closed
    assert harness.committer.run(harness.insert("d")) == "d"
    assert len(harness.sessions) == 2
    assert harness.committed() == ["blocker", "d"]


def test_a_failed_commit_fails_every_piece(harness: Harness) -> None:
    release, held = harness.hold_writer()
    futures = harness.queue_up([harness.insert("b"), harness.insert("c")])
    harness.sessions[0].fail_commit = True  # the held batch's COMMIT
    release.set()
    with pytest.raises(sqlite3.OperationalError, match="disk I/O error"):
        held.result(WAIT)
    assert [f.result(WAIT) for f in futures] == ["b", "c"]
    assert harness.committed() == ["b", "c"]


def test_a_failed_commit_of_a_batch_reports_none_durable(harness: Harness) -> None:
    release, _ = harness.hold_writer()

    def fail_this_commit(session: Session) -> None:
        session.fail_commit = True

    futures = harness.queue_up(
        [fail_this_commit, harness.insert("b"), harness.insert("c")]
    )
    release.set()
    for future in futures:
        with pytest.raises(sqlite3.OperationalError, match="disk I/O error"):
            future.result(WAIT)
    assert harness.committed() == ["blocker"]


def test_close_fails_queued_work_and_refuses_more(harness: Harness) -> None:
    release, held = harness.hold_writer()
    futures = harness.queue_up([harness.insert("b")])
    closing = harness.pool.submit(harness.committer.close)
    release.set()
    closing.result(WAIT)
    assert held.result(WAIT) == "blocker"  # the batch in hand finishes
    with pytest.raises(Closed):
        futures[0].result(WAIT)
    with pytest.raises(Closed):
        harness.committer.run(harness.insert("c"))
    assert harness.committed() == ["blocker"]


# --- The ledger's writes go through it (SQLite) -------------------------------------


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    ledger = Ledger.open(f"sqlite:///{tmp_path / 'ledger.db'}")
    yield ledger
    ledger.close()


def hold_ledger_writer(ledger: Ledger) -> tuple[threading.Event, Future[Any]]:
    writer = ledger._writer
    assert writer is not None
    entered, release = threading.Event(), threading.Event()

    def blocker(session: object) -> None:
        entered.set()
        assert release.wait(WAIT)

    held = ThreadPoolExecutor(1).submit(writer.run, blocker)
    assert entered.wait(WAIT)
    return release, held


def test_ledger_limit_holds_within_one_batch(ledger: Ledger) -> None:
    """Four renewals of one subject in one commit: the limit of two holds."""
    writer = ledger._writer
    assert writer is not None
    release, held = hold_ledger_writer(ledger)
    with ThreadPoolExecutor(4) as pool:
        futures = [
            pool.submit(ledger.record_issuance, record(serial), limit=2)
            for serial in range(1, 5)
        ]
        for _ in range(int(WAIT * 1000)):
            if writer.queued() == 4:
                break
            threading.Event().wait(0.001)  # bounded poll of an observable state
        release.set()
        outcomes = []
        for future in futures:
            try:
                future.result(WAIT)
                outcomes.append("recorded")
            except LimitReached:
                outcomes.append("limit")
    held.result(WAIT)
    assert sorted(outcomes) == ["limit", "limit", "recorded", "recorded"]
    assert len(ledger.certificates()) == 2
    assert writer.batches == 2


def test_ledger_serial_conflict_in_a_batch_is_serial_taken(ledger: Ledger) -> None:
    ledger.record_issuance(record(7))
    release, held = hold_ledger_writer(ledger)
    with ThreadPoolExecutor(2) as pool:
        taken = pool.submit(ledger.record_issuance, record(7, "CN=device-2"))
        fresh = pool.submit(ledger.record_issuance, record(8, "CN=device-3"))
        writer = ledger._writer
        assert writer is not None
        for _ in range(int(WAIT * 1000)):
            if writer.queued() == 2:
                break
            threading.Event().wait(0.001)  # bounded poll of an observable state
        release.set()
        with pytest.raises(SerialTaken):
            taken.result(WAIT)
        fresh.result(WAIT)
    held.result(WAIT)
    assert sorted(row.serial for row in ledger.certificates()) == [7, 8]


def test_ledger_disk_failure_is_unavailable_and_recovers(
    ledger: Ledger, tmp_path: Path
) -> None:
    writer = ledger._writer
    assert writer is not None

    def full(session: object) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    with pytest.raises(LedgerUnavailable, match="disk is full"):
        ledger._write(full)
    ledger.record_issuance(record(1, issued_at=T0))
    assert [row.serial for row in ledger.certificates()] == [1]


def test_ledger_closed_refuses_writes(ledger: Ledger) -> None:
    ledger.close()
    with pytest.raises(Exception, match="closed"):
        ledger.record_issuance(record(1))
