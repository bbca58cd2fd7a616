"""The issuance ledger: every certificate issued, its revocation, approvals.

Synchronous code for the signing thread pool.  One code path serves SQLite
(the embedded default) and PostgreSQL (several estd instances sharing one
ledger); what differs (connecting, placeholders, two column types, one
string function, error classes, the migration lock) lives in the two
``_Backend`` classes.

Each thread reads on its own connection.  A connection that fails is dropped
and the next call connects again, so a database that went away and came back
works without reopening the :class:`Ledger`.  SQLite writes share one
connection and commit whatever queued meanwhile together (group commit: one
fsync for several concurrent issuances, see :mod:`estd.groupcommit`);
PostgreSQL writes run on each thread's connection, since the server commits
concurrent transactions together itself.

Timestamps are stored as whole UTC epoch seconds; serial numbers as 40
lower-case hex digits, which sort and compare like the 160-bit numbers they
are (RFC 5280 §4.1.2.2 allows serials of up to 20 octets).
"""

from __future__ import annotations

import abc
import contextlib
import datetime
import functools
import hashlib
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, TypeVar

import psycopg
import psycopg.conninfo
import psycopg.errors
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from estd.ca import serial_hex
from estd.groupcommit import Closed, GroupCommitter
from estd.wire import raw_subject_and_key_of_certificate

REVOCATION_REASONS = frozenset(
    {
        "unspecified",
        "keyCompromise",
        "cACompromise",
        "affiliationChanged",
        "superseded",
        "cessationOfOperation",
        "certificateHold",
        "removeFromCRL",
        "privilegeWithdrawn",
        "aACompromise",
    }
)
"""RFC 5280 §5.3.1 CRLReason names (value 7 is unused there)."""

PENDING_STATUSES = frozenset({"pending", "approved", "rejected", "issued", "expired"})

DEFAULT_TIMEOUT = 10.0
"""Seconds to wait for a busy SQLite database or a PostgreSQL connection."""

_SERIAL_LIMIT = 1 << 160
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
_SECOND = datetime.timedelta(seconds=1)
_REVISION = "revocation_revision"
# pg_advisory_lock key for migrations: the bytes "estdledg".
_MIGRATION_LOCK = 0x65737464_6C656467

T = TypeVar("T")
Row = tuple[Any, ...]


class LedgerError(Exception):
    """The ledger refused or could not carry out an operation."""


class LedgerUnavailable(LedgerError):
    """The database is unreachable or failed to read or write (HTTP 503)."""


class SerialTaken(LedgerError):
    """A certificate with this serial is already on record; pick another."""


class LimitReached(LedgerError):
    """The subject already got its allowed number of certificates."""

    def __init__(self, count: int) -> None:
        super().__init__(f"{count} certificates in the window")
        self.count = count


class NotFound(LedgerError):
    """No certificate or pending request matches."""


class _Conflict(LedgerError):
    """A UNIQUE constraint refused a row (turned into something specific)."""


# --- Records -------------------------------------------------------------------


@dataclass(frozen=True)
class IssuanceRecord:
    """What the ledger keeps about one issued certificate."""

    serial: int
    label: str
    operation: str
    subject: str
    """RFC 4514 text of the subject, for people."""
    subject_der: bytes
    """The subject Name exactly as encoded in the certificate, for matching."""
    san: str | None
    """The SubjectAltName as ``DNS:a, IP:1.2.3.4`` (openssl's spelling)."""
    public_key_sha256: str
    """Hex SHA-256 of the certificate's SubjectPublicKeyInfo DER."""
    not_before: datetime.datetime
    not_after: datetime.datetime
    issuer: str
    """Hex SHA-256 fingerprint of the issuing CA certificate."""
    client_serial: str | None
    """Serial (upper-case hex) of the client certificate that asked, if any."""
    client_issuer: str | None
    """RFC 4514 issuer of that client certificate."""
    client_address: str | None
    user: str | None
    """The HTTP Basic user that asked, if any."""
    issued_at: datetime.datetime
    der: bytes

    @classmethod
    def from_certificate(
        cls,
        certificate: x509.Certificate,
        *,
        label: str,
        operation: str,
        issuer_certificate: x509.Certificate,
        client_certificate: x509.Certificate | None = None,
        client_address: str | None = None,
        user: str | None = None,
        issued_at: datetime.datetime,
    ) -> IssuanceRecord:
        """The record of ``certificate``, issued by ``issuer_certificate``."""
        subject_der, spki = raw_subject_and_key_of_certificate(certificate)
        return cls(
            serial=certificate.serial_number,
            label=label,
            operation=operation,
            subject=certificate.subject.rfc4514_string(),
            subject_der=subject_der,
            san=san_text(certificate),
            public_key_sha256=hashlib.sha256(spki).hexdigest(),
            not_before=certificate.not_valid_before_utc,
            not_after=certificate.not_valid_after_utc,
            issuer=fingerprint_hex(issuer_certificate),
            client_serial=(
                serial_hex(client_certificate.serial_number)
                if client_certificate is not None
                else None
            ),
            client_issuer=(
                client_certificate.issuer.rfc4514_string()
                if client_certificate is not None
                else None
            ),
            client_address=client_address,
            user=user,
            issued_at=issued_at,
            der=certificate.public_bytes(serialization.Encoding.DER),
        )


@functools.lru_cache(maxsize=64)
def fingerprint_hex(certificate: x509.Certificate) -> str:
    """Hex SHA-256 fingerprint of a (CA) certificate, computed once per CA."""
    return certificate.fingerprint(hashes.SHA256()).hex()


@dataclass(frozen=True)
class CertificateRow(IssuanceRecord):
    """A certificate on record, with its revocation if it was revoked."""

    revoked_at: datetime.datetime | None = None
    revocation_reason: str | None = None


@dataclass(frozen=True)
class PendingRow:
    """An enrollment request waiting for (or past) an operator's decision.

    RFC 7030 §4.2.3: the client repeats the same CSR until it is decided.
    """

    id: int
    label: str
    csr_sha256: str
    subject: str
    client_serial: str | None
    client_address: str | None
    user: str | None
    created_at: datetime.datetime
    expires_at: datetime.datetime
    status: str
    decided_at: datetime.datetime | None
    decided_by: str | None
    certificate_serial: int | None


def san_text(certificate: x509.Certificate) -> str | None:
    """The certificate's SubjectAltName as readable text, or None."""
    try:
        names = certificate.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value
    except x509.ExtensionNotFound:
        return None
    return ", ".join(_general_name_text(name) for name in names)


def _general_name_text(name: x509.GeneralName) -> str:
    if isinstance(name, x509.DNSName):
        return f"DNS:{name.value}"
    if isinstance(name, x509.IPAddress):
        return f"IP:{name.value}"
    if isinstance(name, x509.UniformResourceIdentifier):
        return f"URI:{name.value}"
    if isinstance(name, x509.RFC822Name):
        return f"email:{name.value}"
    if isinstance(name, x509.DirectoryName):
        return f"DirName:{name.value.rfc4514_string()}"
    if isinstance(name, x509.RegisteredID):
        return f"RID:{name.value.dotted_string}"
    if isinstance(name, x509.OtherName):
        return f"othername:{name.type_id.dotted_string}:{name.value.hex()}"
    return repr(name)


# --- Column values ---------------------------------------------------------------


def _serial_text(serial: int) -> str:
    if not 0 <= serial < _SERIAL_LIMIT:
        raise ValueError(f"serial {serial} does not fit in 20 octets")
    return format(serial, "040x")


def _serial_value(text: str | None) -> int | None:
    return None if text is None else int(text, 16)


def _epoch(moment: datetime.datetime) -> int:
    if moment.utcoffset() is None:
        raise ValueError(f"{moment!r} has no time zone; the ledger needs UTC times")
    return (moment - _EPOCH) // _SECOND


def _moment(seconds: int | None) -> datetime.datetime | None:
    return None if seconds is None else _EPOCH + seconds * _SECOND


def _utc(seconds: int) -> datetime.datetime:
    return _EPOCH + seconds * _SECOND


_CERTIFICATE_COLUMNS = (
    "serial, label, operation, subject, subject_der, san, public_key_sha256, "
    "not_before, not_after, issuer, client_serial, client_issuer, client_address, "
    "user_name, issued_at, der, revoked_at, revocation_reason"
)


# Statements assembled from the column lists above; values are always
# parameters.
_SELECT_CERTIFICATES = f"SELECT {_CERTIFICATE_COLUMNS} FROM certificates"  # noqa: S608
_INSERT_CERTIFICATE = (
    f"INSERT INTO certificates ({_CERTIFICATE_COLUMNS}) VALUES "  # noqa: S608
    "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, NULL)"
)


def _certificate_row(row: Row) -> CertificateRow:
    return CertificateRow(
        serial=int(row[0], 16),
        label=row[1],
        operation=row[2],
        subject=row[3],
        subject_der=bytes(row[4]),
        san=row[5],
        public_key_sha256=row[6],
        not_before=_utc(row[7]),
        not_after=_utc(row[8]),
        issuer=row[9],
        client_serial=row[10],
        client_issuer=row[11],
        client_address=row[12],
        user=row[13],
        issued_at=_utc(row[14]),
        der=bytes(row[15]),
        revoked_at=_moment(row[16]),
        revocation_reason=row[17],
    )


_PENDING_COLUMNS = (
    "id, label, csr_sha256, subject, client_serial, client_address, user_name, "
    "created_at, expires_at, status, decided_at, decided_by, certificate_serial"
)


_SELECT_PENDING = f"SELECT {_PENDING_COLUMNS} FROM pending"  # noqa: S608
_INSERT_PENDING = (
    "INSERT INTO pending (label, csr_sha256, subject, client_serial,"  # noqa: S608
    " client_address, user_name, created_at, expires_at, status)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'pending')"
    f" RETURNING {_PENDING_COLUMNS}"
)
_DECIDE_PENDING = (
    "UPDATE pending SET status = ?, decided_at = ?, decided_by = ?"  # noqa: S608
    " WHERE id = ? AND status = 'pending' AND expires_at > ?"
    f" RETURNING {_PENDING_COLUMNS}"
)
# Revoking by serial or by subject: (the update, whether any matches).
_REVOKE = {
    "serial": (
        "UPDATE certificates SET revoked_at = ?, revocation_reason = ?"
        " WHERE serial = ? AND revoked_at IS NULL RETURNING serial",
        "SELECT 1 FROM certificates WHERE serial = ?",
    ),
    "subject": (
        "UPDATE certificates SET revoked_at = ?, revocation_reason = ?"
        " WHERE subject = ? AND revoked_at IS NULL RETURNING serial",
        "SELECT 1 FROM certificates WHERE subject = ? LIMIT 1",
    ),
}


def _pending_row(row: Row) -> PendingRow:
    return PendingRow(
        id=row[0],
        label=row[1],
        csr_sha256=row[2],
        subject=row[3],
        client_serial=row[4],
        client_address=row[5],
        user=row[6],
        created_at=_utc(row[7]),
        expires_at=_utc(row[8]),
        status=row[9],
        decided_at=_moment(row[10]),
        decided_by=row[11],
        certificate_serial=_serial_value(row[12]),
    )


# --- Schema --------------------------------------------------------------------

# Each version is a list of statements applied in one transaction.  {blob}
# and {id} are the two column types the backends spell differently.  Never
# edit a released version; append a new one.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE certificates (
            serial TEXT PRIMARY KEY,
            label TEXT NOT NULL,
            operation TEXT NOT NULL,
            subject TEXT NOT NULL,
            subject_der {blob} NOT NULL,
            san TEXT,
            public_key_sha256 TEXT NOT NULL,
            not_before BIGINT NOT NULL,
            not_after BIGINT NOT NULL,
            issuer TEXT NOT NULL,
            client_serial TEXT,
            client_issuer TEXT,
            client_address TEXT,
            user_name TEXT,
            issued_at BIGINT NOT NULL,
            der {blob} NOT NULL,
            revoked_at BIGINT,
            revocation_reason TEXT,
            CHECK ((revoked_at IS NULL) = (revocation_reason IS NULL))
        )""",
        "CREATE INDEX certificates_by_subject_der"
        " ON certificates (subject_der, issued_at)",
        "CREATE INDEX certificates_by_subject ON certificates (subject)",
        "CREATE INDEX certificates_by_issued_at ON certificates (issued_at)",
        "CREATE INDEX certificates_revoked ON certificates (issuer, serial)"
        " WHERE revoked_at IS NOT NULL",
        """CREATE TABLE counters (
            name TEXT PRIMARY KEY,
            value BIGINT NOT NULL
        )""",
        "INSERT INTO counters (name, value) VALUES ('revocation_revision', 0)",
        """CREATE TABLE pending (
            id {id},
            label TEXT NOT NULL,
            csr_sha256 TEXT NOT NULL,
            subject TEXT NOT NULL,
            client_serial TEXT,
            client_address TEXT,
            user_name TEXT,
            created_at BIGINT NOT NULL,
            expires_at BIGINT NOT NULL,
            status TEXT NOT NULL CHECK (status IN
                ('pending', 'approved', 'rejected', 'issued', 'expired')),
            decided_at BIGINT,
            decided_by TEXT,
            certificate_serial TEXT,
            issued_at BIGINT
        )""",
        # One live request per label and CSR; expired ones stay as history.
        "CREATE UNIQUE INDEX pending_live ON pending (label, csr_sha256)"
        " WHERE status <> 'expired'",
        "CREATE INDEX pending_by_status ON pending (status, expires_at)",
    ),
)

_SCHEMA_VERSION_TABLE = """CREATE TABLE IF NOT EXISTS schema_version (
    version INTEGER PRIMARY KEY,
    applied_at BIGINT NOT NULL
)"""


# --- Backends --------------------------------------------------------------------


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


# --- The ledger --------------------------------------------------------------------


class Ledger:
    """The certificates estd issued, their revocations and pending approvals.

    Thread-safe: each thread uses its own connection.  Every method raises
    :class:`LedgerUnavailable` when the database cannot be reached.
    """

    def __init__(self, backend: _Backend) -> None:
        """Use :meth:`open`; this does not touch the database."""
        self._backend = backend
        self._local = threading.local()
        self._sessions: set[_Session] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._writer: GroupCommitter[_Session] | None = None
        if backend.group_commit:
            self._writer = GroupCommitter(
                backend.connect,
                backend.begin_write,
                fatal=lambda exc: (
                    isinstance(exc, Exception) and backend.problem(exc) == "unavailable"
                ),
                drop=lambda session: session.close(),
            )

    @classmethod
    def open(cls, url: str, *, timeout: float = DEFAULT_TIMEOUT) -> Ledger:
        """Connect to the ledger at ``url`` and bring its schema up to date.

        ``url`` is ``sqlite:///ABSOLUTE/PATH``, a file path (SQLite; the
        directory must exist) or ``postgresql://...`` (any libpq URL).
        ``timeout`` bounds waiting for a busy SQLite file or for a
        PostgreSQL server to accept a connection.
        """
        ledger = cls(_backend(url, timeout))
        try:
            ledger._run(ledger._migrate, write=False)
        except BaseException:
            ledger.close()
            raise
        return ledger

    def close(self) -> None:
        """Close every thread's connection; the ledger cannot be used after."""
        with self._lock:
            self._closed = True
            sessions, self._sessions = self._sessions, set()
        if self._writer is not None:
            self._writer.close()
        for session in sessions:
            session.close()

    # --- Connections and transactions ---

    def _session(self) -> tuple[_Session, bool]:
        """This thread's session, and whether it was used before."""
        if self._closed:
            raise LedgerError("the ledger is closed")
        session: _Session | None = getattr(self._local, "session", None)
        if session is not None:
            return session, True
        try:
            session = self._backend.connect()
        except Exception as exc:
            if self._backend.problem(exc) is None:
                raise
            raise LedgerUnavailable(f"cannot connect to the ledger: {exc}") from exc
        with self._lock:
            self._sessions.add(session)
        self._local.session = session
        return session, False

    def _drop(self, session: _Session) -> None:
        self._local.session = None
        with self._lock:
            self._sessions.discard(session)
        session.close()

    def _transaction(self, session: _Session, work: Callable[[_Session], T]) -> T:
        session.execute(self._backend.begin_write)
        return self._complete(session, work)

    @staticmethod
    def _complete(session: _Session, work: Callable[[_Session], T]) -> T:
        """Run ``work`` in the transaction just begun; commit, or roll back."""
        try:
            result = work(session)
            session.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(Exception):
                session.execute("ROLLBACK")
            raise
        return result

    def _run(self, work: Callable[[_Session], T], *, write: bool) -> T:
        """Run ``work`` on this thread's connection, in a write transaction
        if ``write``, turning driver errors into ledger errors."""
        if write and self._writer is not None:
            return self._write(work)
        retried = False
        while True:
            session, reused = self._session()
            began = False
            try:
                if not write:
                    return work(session)
                session.execute(self._backend.begin_write)
                began = True
                return self._complete(session, work)
            except Exception as exc:
                error = self._ledger_error(exc)
                if error is None:
                    raise
                if isinstance(error, _Conflict):
                    raise error from exc
                lost = session.lost
                self._drop(session)
                # A connection that sat idle while the server restarted fails
                # on first use.  Trying again on a new one is safe when
                # nothing was done yet: a read, or a write that failed at BEGIN.
                if reused and lost and not retried and not (write and began):
                    retried = True
                    continue
                raise error from exc

    def _ledger_error(self, exc: Exception) -> LedgerError | None:
        """What a driver exception means for callers (None: a bug, re-raise)."""
        problem = self._backend.problem(exc)
        if problem is None:
            return None
        if problem == "conflict":
            return _Conflict(str(exc))
        return LedgerUnavailable(f"the ledger is unavailable: {exc}")

    def write_statistics(self) -> tuple[int, int] | None:
        """(commits, writes) so far with group commit (SQLite), else None."""
        if self._writer is None:
            return None
        return self._writer.batches, self._writer.pieces

    def _write(self, work: Callable[[_Session], T]) -> T:
        """Run ``work`` in the group committer's next transaction."""
        assert self._writer is not None
        try:
            return self._writer.run(work)
        except Closed:
            raise LedgerError("the ledger is closed") from None
        except Exception as exc:
            error = self._ledger_error(exc)
            if error is None:
                raise
            raise error from exc

    def _migrate(self, session: _Session) -> None:
        with self._backend.migration_lock(session):
            self._transaction(session, lambda s: s.execute(_SCHEMA_VERSION_TABLE))
            for version, steps in enumerate(MIGRATIONS, start=1):
                self._transaction(
                    session, functools.partial(self._migrate_to, version, steps)
                )

    def _migrate_to(
        self, version: int, steps: Sequence[str], session: _Session
    ) -> None:
        current = self._current_version(session)
        if current > len(MIGRATIONS):
            raise LedgerError(
                f"the ledger has schema version {current}; this estd knows only "
                f"up to {len(MIGRATIONS)}: upgrade estd"
            )
        if current >= version:
            return
        for step in steps:
            session.execute(step.format_map(self._backend.column_types))
        session.execute(
            "INSERT INTO schema_version (version, applied_at) VALUES (?, ?)",
            (version, _epoch(datetime.datetime.now(datetime.UTC))),
        )

    @staticmethod
    def _current_version(session: _Session) -> int:
        (row,) = session.execute("SELECT max(version) FROM schema_version")
        return row[0] or 0

    def schema_version(self) -> int:
        """The schema version of the database (``len(MIGRATIONS)`` after open)."""
        return self._run(self._current_version, write=False)

    def ping(self) -> None:
        """Return if the database answers; raise :class:`LedgerUnavailable` if not."""
        self._run(lambda session: session.execute("SELECT 1"), write=False)

    # --- Certificates ---

    def record_issuance(
        self,
        record: IssuanceRecord,
        *,
        limit: int | None = None,
        window: datetime.timedelta = datetime.timedelta(days=1),
    ) -> None:
        """Record an issued certificate durably (committed when this returns).

        Raises :class:`SerialTaken` if the serial is already on record (the
        caller signs again with a new serial) and :class:`LedgerUnavailable`
        if it cannot be written (the certificate must not be sent).  With a
        ``limit``, raises :class:`LimitReached` instead of recording when the
        subject already has that many certificates issued within ``window``
        before ``record.issued_at``: counted in the same transaction, so
        simultaneous requests cannot both slip under it.
        """
        since = _epoch(record.issued_at - window)
        values = (
            _serial_text(record.serial),
            record.label,
            record.operation,
            record.subject,
            record.subject_der,
            record.san,
            record.public_key_sha256,
            _epoch(record.not_before),
            _epoch(record.not_after),
            record.issuer,
            record.client_serial,
            record.client_issuer,
            record.client_address,
            record.user,
            _epoch(record.issued_at),
            record.der,
        )

        def work(session: _Session) -> None:
            if limit is not None:
                self._backend.lock_subject(session, record.subject_der)
                rows = session.execute(
                    "SELECT count(*) FROM certificates"
                    " WHERE subject_der = ? AND issued_at >= ?",
                    (record.subject_der, since),
                )
                if int(rows[0][0]) >= limit:
                    raise LimitReached(int(rows[0][0]))
            session.execute(_INSERT_CERTIFICATE, values)

        try:
            self._run(work, write=True)
        except _Conflict:
            raise SerialTaken(f"serial {serial_hex(record.serial)} is taken") from None

    def certificate(self, serial: int) -> CertificateRow | None:
        """The certificate with this serial, or None."""
        rows = self._run(
            lambda session: session.execute(
                _SELECT_CERTIFICATES + " WHERE serial = ?",
                (_serial_text(serial),),
            ),
            write=False,
        )
        return _certificate_row(rows[0]) if rows else None

    def certificates(
        self,
        *,
        subject: str | None = None,
        label: str | None = None,
        issued_since: datetime.datetime | None = None,
        expiring_before: datetime.datetime | None = None,
        revoked: bool | None = None,
        limit: int | None = None,
    ) -> list[CertificateRow]:
        """Certificates matching every filter given, newest first.

        ``subject`` matches any part of the RFC 4514 subject (case
        sensitive); ``expiring_before`` selects notAfter before that time.
        """
        conditions: list[str] = []
        params: list[object] = []
        if subject is not None:
            conditions.append(self._backend.contains.format(column="subject"))
            params.append(subject)
        if label is not None:
            conditions.append("label = ?")
            params.append(label)
        if issued_since is not None:
            conditions.append("issued_at >= ?")
            params.append(_epoch(issued_since))
        if expiring_before is not None:
            conditions.append("not_after < ?")
            params.append(_epoch(expiring_before))
        if revoked is not None:
            conditions.append(f"revoked_at IS {'NOT ' if revoked else ''}NULL")
        sql = _SELECT_CERTIFICATES
        if conditions:
            sql += " WHERE " + " AND ".join(conditions)
        sql += " ORDER BY issued_at DESC, serial DESC"
        if limit is not None:
            if limit < 1:
                raise ValueError(f"limit must be positive, not {limit}")
            sql += " LIMIT ?"
            params.append(limit)
        rows = self._run(lambda session: session.execute(sql, params), write=False)
        return [_certificate_row(row) for row in rows]

    def issued_count_since(self, subject_der: bytes, since: datetime.datetime) -> int:
        """How many certificates with this subject were issued at or after ``since``."""
        rows = self._run(
            lambda session: session.execute(
                "SELECT count(*) FROM certificates"
                " WHERE subject_der = ? AND issued_at >= ?",
                (subject_der, _epoch(since)),
            ),
            write=False,
        )
        return int(rows[0][0])

    # --- Revocation ---

    def is_revoked(self, serial: int) -> bool:
        """True if the certificate with this serial is revoked (False if unknown)."""
        rows = self._run(
            lambda session: session.execute(
                "SELECT 1 FROM certificates"
                " WHERE serial = ? AND revoked_at IS NOT NULL",
                (_serial_text(serial),),
            ),
            write=False,
        )
        return bool(rows)

    def revoke(
        self,
        *,
        serial: int | None = None,
        subject: str | None = None,
        reason: str,
        at: datetime.datetime,
    ) -> list[int]:
        """Revoke one certificate by serial, or all of a subject; the serials revoked.

        ``subject`` must equal the RFC 4514 subject text.  Certificates
        already revoked keep their date and reason and are not returned.
        Raises :class:`NotFound` when no certificate matches at all and
        ``ValueError`` for a reason that is not an RFC 5280 CRLReason name.
        """
        if (serial is None) == (subject is None):
            raise ValueError("revoke by serial or by subject (exactly one)")
        _check_reason(reason)
        if serial is not None:
            (update, exists), value = _REVOKE["serial"], _serial_text(serial)
            what = f"serial {serial_hex(serial)}"
        else:
            assert subject is not None
            (update, exists), value = _REVOKE["subject"], subject
            what = f"subject {subject!r}"
        revoked_at = _epoch(at)

        def work(session: _Session) -> list[int]:
            rows = session.execute(update, (revoked_at, reason, value))
            if not rows and not session.execute(exists, (value,)):
                raise NotFound(f"no certificate with {what}")
            return self._revoked_now(session, rows)

        return self._run(work, write=True)

    def revoke_superseded(
        self,
        subject_der: bytes,
        label: str,
        keep_serial: int,
        at: datetime.datetime,
    ) -> list[int]:
        """Revoke the subject's other unexpired certificates of ``label`` as
        superseded (after a renewal issued ``keep_serial``); the serials revoked."""
        moment = _epoch(at)

        def work(session: _Session) -> list[int]:
            rows = session.execute(
                "UPDATE certificates SET revoked_at = ?,"
                " revocation_reason = 'superseded'"
                " WHERE subject_der = ? AND label = ? AND serial <> ?"
                " AND revoked_at IS NULL AND not_after > ? RETURNING serial",
                (moment, subject_der, label, _serial_text(keep_serial), moment),
            )
            return self._revoked_now(session, rows)

        return self._run(work, write=True)

    @staticmethod
    def _revoked_now(session: _Session, rows: list[Row]) -> list[int]:
        """Bump the revision if ``rows`` (serials just revoked) is not empty."""
        if rows:
            session.execute(
                "UPDATE counters SET value = value + 1 WHERE name = ?", (_REVISION,)
            )
        return sorted(int(row[0], 16) for row in rows)

    def revoked(self, issuer: str) -> list[tuple[int, datetime.datetime, str]]:
        """(serial, revocation time, reason) of the revoked certificates of
        ``issuer`` (a CA certificate's hex SHA-256 fingerprint), for its CRL."""
        rows = self._run(
            lambda session: session.execute(
                "SELECT serial, revoked_at, revocation_reason FROM certificates"
                " WHERE issuer = ? AND revoked_at IS NOT NULL ORDER BY serial",
                (issuer,),
            ),
            write=False,
        )
        return [(int(serial, 16), _utc(at), reason) for serial, at, reason in rows]

    def next_number(self, name: str) -> int:
        """The next value of the counter ``name`` (1, 2, ...), shared by every
        instance on this ledger: CRL numbers must only grow (RFC 5280 §5.2.3)."""

        def work(session: _Session) -> int:
            session.execute(
                "INSERT INTO counters (name, value) VALUES (?, 0)"
                " ON CONFLICT (name) DO NOTHING",
                (name,),
            )
            session.execute(
                "UPDATE counters SET value = value + 1 WHERE name = ?", (name,)
            )
            rows = session.execute("SELECT value FROM counters WHERE name = ?", (name,))
            return int(rows[0][0])

        return self._run(work, write=True)

    def revocation_revision(self) -> int:
        """A number that grows with every revocation, to notice changes cheaply."""
        rows = self._run(
            lambda session: session.execute(
                "SELECT value FROM counters WHERE name = ?", (_REVISION,)
            ),
            write=False,
        )
        return int(rows[0][0])

    # --- Manual approval (RFC 7030 §4.2.3) ---

    def pending_submit(
        self,
        *,
        label: str,
        csr_der: bytes,
        subject: str,
        client_serial: str | None,
        client_address: str | None,
        user: str | None,
        now: datetime.datetime,
        expires_at: datetime.datetime,
    ) -> PendingRow:
        """The request for this label and CSR: the existing one whatever its
        status, or a new pending one if there is none or it has expired."""
        csr_sha256 = hashlib.sha256(csr_der).hexdigest()
        moment = _epoch(now)
        key = (label, csr_sha256)

        def work(session: _Session) -> PendingRow:
            session.execute(
                "UPDATE pending SET status = 'expired' WHERE label = ?"
                " AND csr_sha256 = ? AND status = 'pending' AND expires_at <= ?",
                (*key, moment),
            )
            rows = session.execute(
                _SELECT_PENDING
                + " WHERE label = ? AND csr_sha256 = ? AND status <> 'expired'",
                key,
            )
            if not rows:
                rows = session.execute(
                    _INSERT_PENDING,
                    (
                        *key,
                        subject,
                        client_serial,
                        client_address,
                        user,
                        moment,
                        _epoch(expires_at),
                    ),
                )
            return _pending_row(rows[0])

        try:
            return self._run(work, write=True)
        except _Conflict:
            # Another instance inserted the same request just now: use it.
            return self._run(work, write=True)

    def pending_decide(
        self, id: int, *, approve: bool, by: str, now: datetime.datetime
    ) -> PendingRow:
        """Approve or reject a pending request (only while it is pending).

        Raises :class:`NotFound` for an unknown id and :class:`LedgerError`
        for a request already decided, issued or expired.
        """
        moment = _epoch(now)

        def work(session: _Session) -> PendingRow:
            rows = session.execute(
                _DECIDE_PENDING,
                ("approved" if approve else "rejected", moment, by, id, moment),
            )
            if not rows:
                row = self._pending(session, id)
                status = "expired" if row.status == "pending" else row.status
                raise LedgerError(f"request {id} is {status}, no longer pending")
            return _pending_row(rows[0])

        return self._run(work, write=True)

    def pending_mark_issued(self, id: int, serial: int, now: datetime.datetime) -> None:
        """Note that the approved request ``id`` got certificate ``serial``."""
        values = (_serial_text(serial), _epoch(now), id)

        def work(session: _Session) -> None:
            rows = session.execute(
                "UPDATE pending SET status = 'issued', certificate_serial = ?,"
                " issued_at = ? WHERE id = ? AND status = 'approved' RETURNING id",
                values,
            )
            if not rows:
                row = self._pending(session, id)
                raise LedgerError(f"request {id} is {row.status}, not approved")

        self._run(work, write=True)

    @staticmethod
    def _pending(session: _Session, id: int) -> PendingRow:
        rows = session.execute(_SELECT_PENDING + " WHERE id = ?", (id,))
        if not rows:
            raise NotFound(f"no pending request {id}")
        return _pending_row(rows[0])

    def pending_list(self, status: str | None = None) -> list[PendingRow]:
        """Requests (with this status, if given), oldest first."""
        sql = _SELECT_PENDING
        params: tuple[object, ...] = ()
        if status is not None:
            if status not in PENDING_STATUSES:
                choices = ", ".join(sorted(PENDING_STATUSES))
                raise ValueError(f"{status!r} is not one of {choices}")
            sql += " WHERE status = ?"
            params = (status,)
        sql += " ORDER BY id"
        rows = self._run(lambda session: session.execute(sql, params), write=False)
        return [_pending_row(row) for row in rows]

    def expire_pending(self, now: datetime.datetime) -> int:
        """Mark requests still pending at their expiry time expired; how many."""
        rows = self._run(
            lambda session: session.execute(
                "UPDATE pending SET status = 'expired'"
                " WHERE status = 'pending' AND expires_at <= ? RETURNING id",
                (_epoch(now),),
            ),
            write=True,
        )
        return len(rows)


def _check_reason(reason: str) -> None:
    if reason not in REVOCATION_REASONS:
        names = ", ".join(sorted(REVOCATION_REASONS))
        raise ValueError(f"{reason!r} is not a CRL reason; use one of {names}")


__all__ = [
    "MIGRATIONS",
    "PENDING_STATUSES",
    "REVOCATION_REASONS",
    "CertificateRow",
    "IssuanceRecord",
    "Ledger",
    "LedgerError",
    "LedgerUnavailable",
    "NotFound",
    "PendingRow",
    "SerialTaken",
    "san_text",
]
