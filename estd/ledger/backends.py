"""The two databases: what differs between SQLite and PostgreSQL.

A :class:`_Backend` connects (a :class:`_Session` per thread), names the
column types and SQL spellings that differ, classifies driver errors and
takes the locks; :func:`_backend` picks one from a ledger URL.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import sqlite3
import time
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar, Literal

import psycopg
import psycopg.conninfo
import psycopg.errors

from estd.ledger.errors import LedgerError

# pg_advisory_lock key for migrations: the bytes "estdledg".
_MIGRATION_LOCK = 0x65737464_6C656467

Row = tuple[Any, ...]


class _Session(abc.ABC):
    """One thread's connection, in autocommit mode: transactions are explicit."""

    @abc.abstractmethod
    def execute(self, sql: str, params: Sequence[object] = ()) -> list[Row]:
        """Run one statement with ``?`` placeholders; its rows, if any."""

    @property
    @abc.abstractmethod
    def lost(self) -> bool:
        """True once the connection to the server is known to be broken."""

    @abc.abstractmethod
    def close(self) -> None:
        """Close the connection, ignoring errors."""


class _Backend(abc.ABC):
    """What differs between SQLite and PostgreSQL."""

    begin_write: ClassVar[str]
    group_commit: ClassVar[bool] = False
    """Writes share one connection, batched (see :mod:`estd.groupcommit`)."""
    column_types: ClassVar[dict[str, str]]
    contains: ClassVar[str]
    """SQL testing that column {column} contains the text parameter."""

    @abc.abstractmethod
    def connect(self) -> _Session:
        """A new, ready session."""

    @abc.abstractmethod
    def problem(self, exc: Exception) -> Literal["unavailable", "conflict"] | None:
        """How an exception from the driver is reported (None: a bug, re-raise)."""

    def migration_lock(
        self, session: _Session
    ) -> contextlib.AbstractContextManager[None]:
        """Held while migrating, so that two instances starting together don't race."""
        return contextlib.nullcontext()

    def lock_subject(self, session: _Session, subject_der: bytes) -> None:
        """Serialise, until commit, write transactions about one subject.

        SQLite's BEGIN IMMEDIATE already serialises every writer.
        """
        return None


class _SQLiteSession(_Session):
    def __init__(self, connection: sqlite3.Connection) -> None:
        self._connection = connection

    def execute(self, sql: str, params: Sequence[object] = ()) -> list[Row]:
        return self._connection.execute(sql, tuple(params)).fetchall()

    @property
    def lost(self) -> bool:
        return False

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._connection.close()


class _SQLite(_Backend):
    # IMMEDIATE takes the write lock at BEGIN, so writers queue on the busy
    # timeout instead of failing when a read transaction tries to upgrade.
    begin_write = "BEGIN IMMEDIATE"
    # One writer at a time, an fsync per commit: batch them.
    group_commit = True
    column_types: ClassVar[dict[str, str]] = {
        "blob": "BLOB",
        "id": "INTEGER PRIMARY KEY AUTOINCREMENT",
    }
    contains = "instr({column}, ?) > 0"

    def __init__(self, path: str, timeout: float) -> None:
        self.path = path
        self.timeout = timeout

    def connect(self) -> _Session:
        # check_same_thread=False only so that Ledger.close() may close every
        # thread's connection; each connection is used by one thread.
        connection = sqlite3.connect(
            self.path,
            timeout=self.timeout,
            isolation_level=None,
            check_same_thread=False,
        )
        try:
            mode = self._wal_mode(connection)
            if mode != "wal":
                raise LedgerError(f"{self.path}: SQLite refused WAL mode ({mode})")
            # Durable at COMMIT: the certificate is sent only after it.
            connection.execute("PRAGMA synchronous=FULL")
        except BaseException:
            connection.close()
            raise
        return _SQLiteSession(connection)

    def _wal_mode(self, connection: sqlite3.Connection) -> str:
        """Switch a new database to WAL (a no-op after the first time)."""
        # SQLite answers SQLITE_BUSY at once, without its busy handler, when
        # two connections switch a new file to WAL together; wait here.
        deadline = time.monotonic() + self.timeout
        pause = 0.001
        while True:
            try:
                (mode,) = connection.execute("PRAGMA journal_mode=WAL").fetchone()
                return str(mode)
            except sqlite3.OperationalError as exc:
                busy = exc.sqlite_errorname.startswith("SQLITE_BUSY")
                if not busy or time.monotonic() + pause > deadline:
                    raise
            time.sleep(pause)
            pause = min(pause * 2, 0.1)

    def problem(self, exc: Exception) -> Literal["unavailable", "conflict"] | None:
        if isinstance(exc, sqlite3.IntegrityError):
            unique = ("SQLITE_CONSTRAINT_PRIMARYKEY", "SQLITE_CONSTRAINT_UNIQUE")
            return "conflict" if exc.sqlite_errorname in unique else None
        # Locked past the busy timeout, I/O errors, a full disk, a file that
        # is not a database: the ledger cannot answer now.
        if isinstance(exc, sqlite3.OperationalError | sqlite3.InternalError):
            return "unavailable"
        if type(exc) is sqlite3.DatabaseError:
            return "unavailable"
        return None


class _PostgreSQLSession(_Session):
    def __init__(self, connection: psycopg.Connection[Row]) -> None:
        self._connection = connection

    def execute(self, sql: str, params: Sequence[object] = ()) -> list[Row]:
        cursor = self._connection.execute(_pyformat(sql), tuple(params) or None)
        return cursor.fetchall() if cursor.description is not None else []

    @property
    def lost(self) -> bool:
        return self._connection.broken or self._connection.closed

    def close(self) -> None:
        with contextlib.suppress(psycopg.Error):
            self._connection.close()


def _pyformat(sql: str) -> str:
    return sql.replace("%", "%%").replace("?", "%s")


class _PostgreSQL(_Backend):
    begin_write = "BEGIN"
    column_types: ClassVar[dict[str, str]] = {
        "blob": "BYTEA",
        "id": "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
    }
    contains = "strpos({column}, ?) > 0"

    def __init__(self, url: str, timeout: float) -> None:
        try:
            self.params: dict[str, Any] = psycopg.conninfo.conninfo_to_dict(url)
        except psycopg.ProgrammingError as exc:
            # Not echoing the URL: it may hold a password.
            raise ValueError(f"not a valid PostgreSQL URL: {exc}") from None
        # Give up on a server that does not answer rather than hold a
        # signing thread; the URL may set other values.
        self.params.setdefault("connect_timeout", str(max(1, round(timeout))))
        self.params.setdefault("tcp_user_timeout", str(round(timeout * 1000)))
        self.params.setdefault("application_name", "estd")

    def connect(self) -> _Session:
        return _PostgreSQLSession(psycopg.connect(autocommit=True, **self.params))

    def problem(self, exc: Exception) -> Literal["unavailable", "conflict"] | None:
        if isinstance(exc, psycopg.errors.UniqueViolation):
            return "conflict"
        # Connection failures, a server shutting down, disk full, I/O errors.
        if isinstance(exc, psycopg.OperationalError):
            return "unavailable"
        return None

    def lock_subject(self, session: _Session, subject_der: bytes) -> None:
        # READ COMMITTED lets two transactions count the same rows; a
        # transaction-scoped advisory lock per subject orders them.
        key = int.from_bytes(
            hashlib.sha256(subject_der).digest()[:8], "big", signed=True
        )
        session.execute("SELECT pg_advisory_xact_lock(?)", (key,))

    @contextlib.contextmanager
    def migration_lock(self, session: _Session) -> Iterator[None]:
        session.execute("SELECT pg_advisory_lock(?)", (_MIGRATION_LOCK,))
        try:
            yield
        finally:
            if not session.lost:
                session.execute("SELECT pg_advisory_unlock(?)", (_MIGRATION_LOCK,))


def _backend(url: str, timeout: float) -> _Backend:
    scheme, separator, rest = url.partition("://")
    if not separator:
        path = url
    elif scheme in ("postgresql", "postgres"):
        return _PostgreSQL(url, timeout)
    elif scheme == "sqlite":
        path = rest
    else:
        raise ValueError(
            f"unknown ledger URL scheme {scheme!r}: use sqlite:///PATH, "
            "a file path or postgresql://"
        )
    if not path or path == ":memory:" or path.startswith("file:"):
        # Each thread has its own connection, so they need a shared file.
        raise ValueError(f"{url!r}: the SQLite ledger needs a file path")
    return _SQLite(path, timeout)
