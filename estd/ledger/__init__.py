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

The package's modules: :mod:`estd.ledger.errors` (the exceptions),
:mod:`estd.ledger.records` (what is stored and returned),
:mod:`estd.ledger.schema` (column conversions, statements, migrations),
:mod:`estd.ledger.backends` (SQLite and PostgreSQL) and here the
:class:`Ledger` itself, which also re-exports the public names.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import hashlib
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

from estd.ca import serial_hex
from estd.groupcommit import Closed, GroupCommitter
from estd.ledger.backends import Row, _Backend, _backend, _Session
from estd.ledger.errors import (
    LedgerError,
    LedgerUnavailable,
    LimitReached,
    NotFound,
    SerialTaken,
    _Conflict,
)
from estd.ledger.records import (
    PENDING_STATUSES,
    REVOCATION_REASONS,
    CertificateRow,
    IssuanceRecord,
    PendingRow,
    fingerprint_hex,
    san_text,
)
from estd.ledger.schema import (
    _DECIDE_PENDING,
    _INSERT_CERTIFICATE,
    _INSERT_PENDING,
    _REVOKE,
    _SCHEMA_VERSION_TABLE,
    _SELECT_CERTIFICATES,
    _SELECT_PENDING,
    MIGRATIONS,
    _certificate_row,
    _epoch,
    _pending_row,
    _serial_text,
    _utc,
)

DEFAULT_TIMEOUT = 10.0
"""Seconds to wait for a busy SQLite database or a PostgreSQL connection."""

_REVISION = "revocation_revision"

T = TypeVar("T")


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
    "LimitReached",
    "NotFound",
    "PendingRow",
    "SerialTaken",
    "fingerprint_hex",
    "san_text",
]
