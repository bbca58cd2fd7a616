"""The ledger's tables: column conversions, SQL statements, migrations.

How values are stored (serials as 40 hex digits, times as UTC epoch
seconds), the statements built from the column lists, turning rows back into
records, and :data:`MIGRATIONS`, the schema versions in order.
"""

from __future__ import annotations

import datetime

from estd.ledger.backends import Row
from estd.ledger.records import CertificateRow, PendingRow

# --- Column values ---------------------------------------------------------------

_SERIAL_LIMIT = 1 << 160
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
_SECOND = datetime.timedelta(seconds=1)


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
