"""The issuance ledger, on SQLite and on a real PostgreSQL server.

:class:`LedgerContract` holds the behaviour both backends share; each
backend class supplies a database URL.  PostgreSQL tests need
``ESTD_TEST_POSTGRESQL`` (see tests/pg_support.py) and skip without it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import datetime
import hashlib
import ipaddress
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from estd.ca import CertificateAuthority, serial_hex
from estd.demo import device_name
from estd.ledger import (
    MIGRATIONS,
    REVOCATION_REASONS,
    CertificateRow,
    IssuanceRecord,
    Ledger,
    LedgerError,
    LedgerUnavailable,
    NotFound,
    PendingRow,
    SerialTaken,
)
from tests.pki import NOW, demo_pki, fioconfig_csr

if TYPE_CHECKING:
    from tests.pg_support import PrivatePostgreSQL

# Imported by pytest (not above) so that its fixtures register as a plugin.
pytest_plugins = ["tests.pg_support"]

T0 = datetime.datetime(2030, 5, 1, 12, 0, tzinfo=datetime.UTC)
MINUTE = datetime.timedelta(minutes=1)
HOUR = datetime.timedelta(hours=1)
DAY = datetime.timedelta(days=1)
ISSUER = hashlib.sha256(b"EST CA").hexdigest()
OTHER_ISSUER = hashlib.sha256(b"another EST CA").hexdigest()


def record(
    serial: int,
    subject: str = "CN=device-1",
    *,
    label: str = "",
    issued_at: datetime.datetime = T0,
    not_after: datetime.datetime | None = None,
    issuer: str = ISSUER,
) -> IssuanceRecord:
    """A record of a made-up certificate (the ledger does not parse ``der``)."""
    return IssuanceRecord(
        serial=serial,
        label=label,
        operation="simplereenroll",
        subject=subject,
        subject_der=x509.Name.from_rfc4514_string(subject).public_bytes(),
        san=None,
        public_key_sha256=hashlib.sha256(b"key %d" % serial).hexdigest(),
        not_before=issued_at - datetime.timedelta(minutes=1),
        not_after=not_after or issued_at + 365 * DAY,
        issuer=issuer,
        client_serial=None,
        client_issuer=None,
        client_address="192.0.2.1",
        user=None,
        issued_at=issued_at,
        der=b"certificate %d" % serial,
    )


def as_row(issued: IssuanceRecord, **revocation: Any) -> CertificateRow:
    """The row the ledger should return for ``issued``."""
    return CertificateRow(**dataclasses.asdict(issued), **revocation)


def serials(rows: list[CertificateRow]) -> list[int]:
    """The serials of ``rows``, in order."""
    return [row.serial for row in rows]


def reason_of(ledger: Ledger, serial: int) -> str | None:
    """The revocation reason of a certificate on record."""
    row = ledger.certificate(serial)
    assert row is not None
    return row.revocation_reason


def submit(ledger: Ledger, csr: bytes, **changes: Any) -> PendingRow:
    """Submit ``csr`` for manual approval with defaults for everything else."""
    arguments: dict[str, Any] = {
        "label": "",
        "csr_der": csr,
        "subject": "CN=device-1",
        "client_serial": "0A1B",
        "client_address": "192.0.2.1",
        "user": None,
        "now": T0,
        "expires_at": T0 + HOUR,
    }
    arguments.update(changes)
    return ledger.pending_submit(**arguments)


class LedgerContract:
    """What every ledger backend does."""

    @pytest.fixture
    def url(self) -> str:
        """The URL of an empty database (provided by each backend)."""
        raise NotImplementedError

    @staticmethod
    def query(url: str, statement: str) -> list[tuple[Any, ...]]:
        """Run one SQL statement on the database behind the ledger's back."""
        raise NotImplementedError

    @pytest.fixture
    def ledger(self, url: str) -> Iterator[Ledger]:
        """A ledger on the empty database."""
        ledger = Ledger.open(url)
        yield ledger
        ledger.close()

    @pytest.fixture
    def second(self, url: str, ledger: Ledger) -> Iterator[Ledger]:
        """A second ledger on the same database, as another estd instance has."""
        other = Ledger.open(url)
        yield other
        other.close()

    # --- Recording ---

    def test_issued_certificate_reads_back_exactly(self, ledger: Ledger) -> None:
        """Every field of a real issued certificate's record reads back unchanged."""
        pki = demo_pki()
        ca = CertificateAuthority(pki.est_ca.certificate, pki.est_ca.key)
        san = x509.SubjectAlternativeName(
            [
                x509.DNSName("device-1.example.com"),
                x509.IPAddress(ipaddress.ip_address("192.0.2.7")),
            ]
        )
        key, csr = fioconfig_csr(device_name("ledger-1"), extensions=[(san, False)])
        certificate = ca.issue(x509.load_der_x509_csr(csr), NOW, 30 * DAY).certificate
        client = pki.devices[0].certificate
        issued = IssuanceRecord.from_certificate(
            certificate,
            label="factory",
            operation="simpleenroll",
            issuer_certificate=pki.est_ca.certificate,
            client_certificate=client,
            client_address="198.51.100.4",
            user="installer",
            issued_at=NOW,
        )
        spki = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        assert issued == IssuanceRecord(
            serial=certificate.serial_number,
            label="factory",
            operation="simpleenroll",
            subject=device_name("ledger-1").rfc4514_string(),
            subject_der=device_name("ledger-1").public_bytes(),
            san="DNS:device-1.example.com, IP:192.0.2.7",
            public_key_sha256=hashlib.sha256(spki).hexdigest(),
            not_before=NOW - datetime.timedelta(minutes=1),
            not_after=NOW + 30 * DAY,
            issuer=pki.est_ca.certificate.fingerprint(hashes.SHA256()).hex(),
            client_serial=serial_hex(client.serial_number),
            client_issuer=client.issuer.rfc4514_string(),
            client_address="198.51.100.4",
            user="installer",
            issued_at=NOW,
            der=certificate.public_bytes(serialization.Encoding.DER),
        )
        ledger.record_issuance(issued)
        assert ledger.certificate(certificate.serial_number) == as_row(issued)

    def test_record_without_optional_fields_reads_back(self, ledger: Ledger) -> None:
        """A record with no SAN, client certificate, address or user reads back so."""
        bare = dataclasses.replace(record(7), client_address=None, label="lab")
        ledger.record_issuance(bare)
        assert ledger.certificate(7) == as_row(bare)
        assert ledger.certificate(8) is None

    def test_serials_up_to_160_bits_sort_numerically(self, ledger: Ledger) -> None:
        """Serials of any size up to 160 bits read back exactly and sort as numbers."""
        for serial in (15, 256, 2**159 + 3, 2**160 - 1, 1):
            ledger.record_issuance(record(serial))
        assert serials(ledger.certificates()) == [2**160 - 1, 2**159 + 3, 256, 15, 1]
        assert ledger.certificate(2**159 + 3) == as_row(record(2**159 + 3))

    def test_values_the_ledger_cannot_store_are_refused(self, ledger: Ledger) -> None:
        """Serials beyond 160 bits or negative, and naive times, raise ValueError."""
        with pytest.raises(ValueError, match="20 octets"):
            ledger.record_issuance(record(2**160))
        with pytest.raises(ValueError, match="20 octets"):
            ledger.record_issuance(record(-1))
        naive = dataclasses.replace(record(3), issued_at=T0.replace(tzinfo=None))
        with pytest.raises(ValueError, match="time zone"):
            ledger.record_issuance(naive)
        assert ledger.certificates() == []

    def test_duplicate_serial_is_refused(self, ledger: Ledger) -> None:
        """Recording a serial twice raises SerialTaken and keeps the first record."""
        ledger.record_issuance(record(5, "CN=first"))
        with pytest.raises(SerialTaken):
            ledger.record_issuance(record(5, "CN=second"))
        assert [row.subject for row in ledger.certificates()] == ["CN=first"]

    def test_concurrent_recording_never_reuses_a_serial(self, ledger: Ledger) -> None:
        """8 threads recording 50 certificates each, all trying the same serials
        in turn, store 400 rows with serials 1..400, each recorded once."""
        barrier = threading.Barrier(8, timeout=30)

        def worker(number: int) -> int:
            barrier.wait()
            candidate, recorded, collisions = 1, 0, 0
            while recorded < 50:
                try:
                    ledger.record_issuance(record(candidate, label=f"thread-{number}"))
                    recorded += 1
                except SerialTaken:
                    collisions += 1
                candidate += 1
            return collisions

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            collisions = list(pool.map(worker, range(8)))
        rows = ledger.certificates()
        assert sorted(serials(rows)) == list(range(1, 401))
        for number in range(8):
            assert len(ledger.certificates(label=f"thread-{number}")) == 50
        # Only one thread can have recorded serial 1.
        assert sum(collisions) >= 7

    # --- Schema ---

    def test_migrations_apply_once(self, url: str, ledger: Ledger) -> None:
        """Opening the ledger again keeps its data and applies no migration twice."""
        ledger.record_issuance(record(1))
        again = Ledger.open(url)
        try:
            assert again.schema_version() == len(MIGRATIONS)
            assert serials(again.certificates()) == [1]
        finally:
            again.close()
        versions = self.query(url, "SELECT version FROM schema_version ORDER BY 1")
        assert versions == [(v,) for v in range(1, len(MIGRATIONS) + 1)]

    def test_instances_starting_together_migrate_once(self, url: str) -> None:
        """Four ledgers opened at once on a new database all work; each
        migration is recorded once."""
        barrier = threading.Barrier(4, timeout=30)

        def start(_: int) -> Ledger:
            barrier.wait()
            return Ledger.open(url)

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            ledgers = list(pool.map(start, range(4)))
        for number, opened in enumerate(ledgers):
            opened.record_issuance(record(number + 1))
            opened.close()
        versions = self.query(url, "SELECT version FROM schema_version ORDER BY 1")
        assert versions == [(v,) for v in range(1, len(MIGRATIONS) + 1)]

    def test_newer_schema_is_refused(self, url: str, ledger: Ledger) -> None:
        """A ledger migrated by a newer estd is refused rather than misread."""
        ledger.close()
        self.query(
            url, "INSERT INTO schema_version (version, applied_at) VALUES (99, 0)"
        )
        with pytest.raises(LedgerError, match="schema version 99"):
            Ledger.open(url)

    # --- Revocation ---

    def test_revoke_by_serial(self, ledger: Ledger) -> None:
        """Revoking a serial marks only that certificate and bumps the revision;
        revoking it again changes nothing."""
        ledger.record_issuance(record(1))
        ledger.record_issuance(record(2))
        before = ledger.revocation_revision()
        assert ledger.revoke(serial=1, reason="keyCompromise", at=T0 + HOUR) == [1]
        assert ledger.is_revoked(1)
        assert not ledger.is_revoked(2)
        assert not ledger.is_revoked(999)
        revoked = ledger.revocation_revision()
        assert revoked > before
        assert ledger.certificate(1) == as_row(
            record(1), revoked_at=T0 + HOUR, revocation_reason="keyCompromise"
        )
        assert ledger.revoke(serial=1, reason="superseded", at=T0 + DAY) == []
        assert reason_of(ledger, 1) == "keyCompromise"
        assert ledger.revocation_revision() == revoked
        with pytest.raises(NotFound):
            ledger.revoke(serial=999, reason="unspecified", at=T0)

    def test_revoke_by_subject(self, ledger: Ledger) -> None:
        """Revoking a subject revokes its unrevoked certificates and no others."""
        for serial, subject in [
            (1, "CN=dev-a"),
            (2, "CN=dev-a"),
            (3, "CN=dev-a"),
            (4, "CN=dev-a2"),
            (5, "CN=dev-b"),
        ]:
            ledger.record_issuance(record(serial, subject))
        ledger.revoke(serial=3, reason="keyCompromise", at=T0)
        before = ledger.revocation_revision()
        revoked = ledger.revoke(
            subject="CN=dev-a", reason="cessationOfOperation", at=T0 + HOUR
        )
        assert revoked == [1, 2]
        assert ledger.revocation_revision() > before
        assert [ledger.is_revoked(serial) for serial in range(1, 6)] == [
            True,
            True,
            True,
            False,
            False,
        ]
        assert reason_of(ledger, 3) == "keyCompromise"
        with pytest.raises(NotFound):
            ledger.revoke(subject="CN=nobody", reason="unspecified", at=T0)

    @pytest.mark.parametrize("reason", sorted(REVOCATION_REASONS))
    def test_every_crl_reason_is_accepted(self, ledger: Ledger, reason: str) -> None:
        """Each RFC 5280 CRLReason name is a valid revocation reason."""
        ledger.record_issuance(record(1))
        assert ledger.revoke(serial=1, reason=reason, at=T0) == [1]
        assert ledger.revoked(ISSUER) == [(1, T0, reason)]

    def test_bad_revocation_requests_are_refused(self, ledger: Ledger) -> None:
        """Unknown reasons, and naming both or neither serial and subject,
        raise ValueError and revoke nothing."""
        ledger.record_issuance(record(1))
        for reason in ("stolen", "KeyCompromise", ""):
            with pytest.raises(ValueError, match="CRL reason"):
                ledger.revoke(serial=1, reason=reason, at=T0)
        with pytest.raises(ValueError, match="exactly one"):
            ledger.revoke(serial=1, subject="CN=device-1", reason="unspecified", at=T0)
        with pytest.raises(ValueError, match="exactly one"):
            ledger.revoke(reason="unspecified", at=T0)
        assert not ledger.is_revoked(1)
        assert ledger.revocation_revision() == 0

    def test_revoked_lists_one_issuers_revocations(self, ledger: Ledger) -> None:
        """revoked() gives serial, time and reason of one CA's revoked certificates."""
        for serial in (1, 2, 3):
            ledger.record_issuance(record(serial))
        ledger.record_issuance(record(4, issuer=OTHER_ISSUER))
        ledger.revoke(serial=3, reason="superseded", at=T0 + DAY)
        ledger.revoke(serial=1, reason="keyCompromise", at=T0 + HOUR)
        ledger.revoke(serial=4, reason="unspecified", at=T0)
        assert ledger.revoked(ISSUER) == [
            (1, T0 + HOUR, "keyCompromise"),
            (3, T0 + DAY, "superseded"),
        ]
        assert ledger.revoked(OTHER_ISSUER) == [(4, T0, "unspecified")]
        assert ledger.revoked("00" * 32) == []

    def test_revoke_superseded(self, ledger: Ledger) -> None:
        """A renewal revokes the subject's other valid certificates of its label
        as superseded, and nothing else."""
        at = T0 + 10 * DAY
        ledger.record_issuance(record(1, "CN=x"))
        ledger.record_issuance(record(2, "CN=x", not_after=T0 + DAY))  # expired
        ledger.record_issuance(record(3, "CN=x"))
        ledger.revoke(serial=3, reason="keyCompromise", at=T0)
        ledger.record_issuance(record(4, "CN=x", label="other"))
        ledger.record_issuance(record(5, "CN=y"))
        ledger.record_issuance(record(6, "CN=x", issued_at=at))  # the renewal
        before = ledger.revocation_revision()
        subject_der = record(6, "CN=x").subject_der
        assert ledger.revoke_superseded(subject_der, "", 6, at) == [1]
        assert ledger.certificate(1) == as_row(
            record(1, "CN=x"), revoked_at=at, revocation_reason="superseded"
        )
        assert [ledger.is_revoked(serial) for serial in range(1, 7)] == [
            True,
            False,
            True,
            False,
            False,
            False,
        ]
        assert reason_of(ledger, 3) == "keyCompromise"
        revised = ledger.revocation_revision()
        assert revised > before
        assert ledger.revoke_superseded(subject_der, "", 6, at) == []
        assert ledger.revocation_revision() == revised

    def test_instances_see_each_others_revocations(
        self, ledger: Ledger, second: Ledger
    ) -> None:
        """A revocation through one instance is seen by another at once."""
        ledger.record_issuance(record(1))
        assert second.certificate(1) == as_row(record(1))
        assert not second.is_revoked(1)
        ledger.revoke(serial=1, reason="keyCompromise", at=T0)
        assert second.is_revoked(1)
        assert second.revocation_revision() == ledger.revocation_revision() == 1
        second.record_issuance(record(2))
        second.revoke(serial=2, reason="superseded", at=T0)
        assert ledger.revoked(ISSUER) == [
            (1, T0, "keyCompromise"),
            (2, T0, "superseded"),
        ]
        assert ledger.revocation_revision() == 2
        with pytest.raises(SerialTaken):
            second.record_issuance(record(1))

    # --- Queries ---

    def test_issued_count_since(self, ledger: Ledger) -> None:
        """issued_count_since counts one subject's certificates from a time on."""
        for serial, moment in enumerate([T0 - 2 * DAY, T0 - HOUR, T0, T0 + HOUR], 1):
            ledger.record_issuance(record(serial, "CN=x", issued_at=moment))
        ledger.record_issuance(record(9, "CN=y"))
        x = record(0, "CN=x").subject_der
        assert ledger.issued_count_since(x, T0 - DAY) == 3
        assert ledger.issued_count_since(x, T0) == 2
        assert ledger.issued_count_since(x, T0 + DAY) == 0
        assert ledger.issued_count_since(record(0, "CN=y").subject_der, T0) == 1
        assert ledger.issued_count_since(record(0, "CN=z").subject_der, T0) == 0

    def test_certificates_filters(self, ledger: Ledger) -> None:
        """certificates() combines subject, label, time and revocation filters,
        newest first."""
        ledger.record_issuance(record(1, "CN=alpha-1", not_after=T0 + 10 * DAY))
        ledger.record_issuance(
            record(
                2,
                "CN=alpha-2",
                label="lab",
                issued_at=T0 + HOUR,
                not_after=T0 + 20 * DAY,
            )
        )
        ledger.record_issuance(
            record(3, "CN=beta", issued_at=T0 + 2 * HOUR, not_after=T0 + 30 * DAY)
        )
        ledger.revoke(serial=3, reason="keyCompromise", at=T0 + DAY)
        assert serials(ledger.certificates()) == [3, 2, 1]
        assert serials(ledger.certificates(subject="alpha")) == [2, 1]
        assert serials(ledger.certificates(subject="ALPHA")) == []
        assert serials(ledger.certificates(subject="%")) == []
        assert serials(ledger.certificates(label="lab")) == [2]
        assert serials(ledger.certificates(label="")) == [3, 1]
        assert serials(ledger.certificates(issued_since=T0 + HOUR)) == [3, 2]
        assert serials(ledger.certificates(expiring_before=T0 + 20 * DAY)) == [1]
        assert serials(ledger.certificates(revoked=True)) == [3]
        assert serials(ledger.certificates(revoked=False)) == [2, 1]
        assert serials(ledger.certificates(limit=2)) == [3, 2]
        assert serials(ledger.certificates(subject="alpha", label="")) == [1]
        assert ledger.certificates(revoked=True)[0].revoked_at == T0 + DAY
        with pytest.raises(ValueError, match="positive"):
            ledger.certificates(limit=0)

    # --- Manual approval ---

    def test_same_csr_gives_the_same_request(self, ledger: Ledger) -> None:
        """Submitting the same CSR for the same label again returns the same
        pending request; another label or CSR makes a new one."""
        first = submit(ledger, b"csr A")
        assert first.status == "pending"
        assert first.csr_sha256 == hashlib.sha256(b"csr A").hexdigest()
        assert first.created_at == T0
        assert first.expires_at == T0 + HOUR
        again = submit(ledger, b"csr A", now=T0 + 10 * MINUTE)
        assert again == first
        other_label = submit(ledger, b"csr A", label="lab")
        other_csr = submit(ledger, b"csr B")
        assert len({first.id, other_label.id, other_csr.id}) == 3
        assert ledger.pending_list() == [first, other_label, other_csr]
        assert ledger.pending_list("pending") == [first, other_label, other_csr]

    def test_approval_then_issue(self, ledger: Ledger) -> None:
        """An approved request is returned for the same CSR until it is marked
        issued, which records the certificate's serial."""
        pending = submit(ledger, b"csr A", user="installer")
        approved = ledger.pending_decide(
            pending.id, approve=True, by="alice", now=T0 + 30 * MINUTE
        )
        assert approved == dataclasses.replace(
            pending, status="approved", decided_at=T0 + 30 * MINUTE, decided_by="alice"
        )
        assert submit(ledger, b"csr A", now=T0 + 2 * HOUR) == approved
        ledger.pending_mark_issued(pending.id, 2**159 + 1, T0 + 2 * HOUR)
        issued = submit(ledger, b"csr A", now=T0 + 3 * HOUR)
        assert issued == dataclasses.replace(
            approved, status="issued", certificate_serial=2**159 + 1
        )
        assert ledger.pending_list("issued") == [issued]
        assert ledger.pending_list("pending") == []

    def test_rejection_and_invalid_decisions(self, ledger: Ledger) -> None:
        """A rejected request stays rejected; deciding twice, issuing an undecided
        or rejected request, and unknown ids are errors."""
        rejected = submit(ledger, b"csr A")
        undecided = submit(ledger, b"csr B")
        decision = ledger.pending_decide(rejected.id, approve=False, by="bob", now=T0)
        assert decision.status == "rejected"
        assert decision.decided_by == "bob"
        assert submit(ledger, b"csr A") == decision
        for attempt in (
            lambda: ledger.pending_decide(rejected.id, approve=True, by="x", now=T0),
            lambda: ledger.pending_mark_issued(rejected.id, 1, T0),
            lambda: ledger.pending_mark_issued(undecided.id, 1, T0),
        ):
            with pytest.raises(LedgerError) as caught:
                attempt()
            assert type(caught.value) is LedgerError
        with pytest.raises(NotFound):
            ledger.pending_decide(9999, approve=True, by="x", now=T0)
        with pytest.raises(NotFound):
            ledger.pending_mark_issued(9999, 1, T0)
        assert ledger.pending_list("rejected") == [decision]
        assert ledger.pending_list("pending") == [undecided]

    def test_pending_requests_expire(self, ledger: Ledger) -> None:
        """Requests still pending at their expiry time expire; the same CSR then
        makes a new request, and an expired one cannot be decided."""
        a = submit(ledger, b"csr A", expires_at=T0 + HOUR)
        b = submit(ledger, b"csr B", expires_at=T0 + 2 * HOUR)
        c = submit(ledger, b"csr C", expires_at=T0 + HOUR)
        ledger.pending_decide(c.id, approve=True, by="alice", now=T0)
        assert ledger.expire_pending(T0 + HOUR) == 1
        assert ledger.pending_list("expired") == [
            dataclasses.replace(a, status="expired")
        ]
        assert ledger.expire_pending(T0 + HOUR) == 0
        with pytest.raises(LedgerError, match="expired"):
            ledger.pending_decide(a.id, approve=True, by="alice", now=T0 + HOUR)
        renewed = submit(ledger, b"csr A", now=T0 + 2 * HOUR, expires_at=T0 + 3 * HOUR)
        assert renewed.id != a.id
        assert renewed.status == "pending"
        # Past its expiry but not yet swept: deciding fails, resubmitting
        # makes a new request.
        with pytest.raises(LedgerError, match="expired"):
            ledger.pending_decide(b.id, approve=True, by="alice", now=T0 + 2 * HOUR)
        fresh_b = submit(ledger, b"csr B", now=T0 + 2 * HOUR, expires_at=T0 + DAY)
        assert fresh_b.id not in (a.id, b.id, c.id, renewed.id)
        statuses = {row.id: row.status for row in ledger.pending_list()}
        assert statuses == {
            a.id: "expired",
            b.id: "expired",
            c.id: "approved",
            renewed.id: "pending",
            fresh_b.id: "pending",
        }

    def test_pending_list_refuses_unknown_status(self, ledger: Ledger) -> None:
        """pending_list rejects a status that does not exist."""
        with pytest.raises(ValueError, match="not one of"):
            ledger.pending_list("waiting")

    # --- Lifecycle ---

    def test_closed_ledger_is_not_used(self, ledger: Ledger) -> None:
        """A ledger answers ping while open and refuses every call once closed."""
        ledger.ping()
        ledger.close()
        with pytest.raises(LedgerError, match="closed"):
            ledger.ping()
        with pytest.raises(LedgerError, match="closed"):
            ledger.record_issuance(record(1))


class TestSQLiteLedger(LedgerContract):
    """The embedded SQLite ledger."""

    @pytest.fixture
    def url(self, tmp_path: Path) -> str:
        """A new SQLite file in the test's directory."""
        return f"sqlite://{tmp_path / 'ledger.db'}"

    @staticmethod
    def query(url: str, statement: str) -> list[tuple[Any, ...]]:
        """Run one statement through a separate sqlite3 connection."""
        with contextlib.closing(sqlite3.connect(url.removeprefix("sqlite://"))) as db:
            with db:
                return db.execute(statement).fetchall()

    def test_database_is_durable_wal(self, url: str, ledger: Ledger) -> None:
        """The SQLite file is in WAL mode and commits are synchronous=FULL."""
        assert self.query(url, "PRAGMA journal_mode") == [("wal",)]
        # Reaching into the connection: this setting is per connection.
        setting = ledger._run(
            lambda session: session.execute("PRAGMA synchronous"), write=False
        )
        assert setting == [(2,)]

    def test_plain_path_and_url_open_the_same_file(self, tmp_path: Path) -> None:
        """A file path and a sqlite:/// URL to it open the same ledger."""
        path = tmp_path / "state" / "ledger.db"
        path.parent.mkdir()
        by_path = Ledger.open(str(path))
        by_url = Ledger.open(f"sqlite://{path}")
        try:
            by_path.record_issuance(record(1))
            assert serials(by_url.certificates()) == [1]
        finally:
            by_path.close()
            by_url.close()

    def test_unwritable_path_is_unavailable(self, tmp_path: Path) -> None:
        """A database path that cannot be created raises LedgerUnavailable."""
        blocker = tmp_path / "not-a-directory"
        blocker.write_bytes(b"")
        with pytest.raises(LedgerUnavailable):
            Ledger.open(str(blocker / "ledger.db"))

    def test_locked_database_is_unavailable_then_recovers(self, tmp_path: Path) -> None:
        """While another writer holds the file past the busy timeout, recording
        raises LedgerUnavailable and stores nothing; afterwards it works."""
        path = tmp_path / "ledger.db"
        ledger = Ledger.open(str(path), timeout=0.05)
        other = sqlite3.connect(path, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            with pytest.raises(LedgerUnavailable):
                ledger.record_issuance(record(1))
            other.execute("ROLLBACK")
            assert ledger.certificate(1) is None
            ledger.record_issuance(record(1))
            assert serials(ledger.certificates()) == [1]
        finally:
            other.close()
            ledger.close()


class TestPostgreSQLLedger(LedgerContract):
    """The shared PostgreSQL ledger, on the server ESTD_TEST_POSTGRESQL names."""

    @pytest.fixture
    def url(self, postgresql_url: str) -> str:
        """A new database of the test's own."""
        return postgresql_url

    @staticmethod
    def query(url: str, statement: str) -> list[tuple[Any, ...]]:
        """Run one statement through a separate psycopg connection."""
        with psycopg.connect(url, autocommit=True) as db:
            cursor = db.execute(statement)
            return cursor.fetchall() if cursor.description else []


class TestPostgreSQLOutage:
    """A private PostgreSQL server stopped and started under a running ledger."""

    def test_server_going_away_and_coming_back(
        self, private_postgresql: PrivatePostgreSQL
    ) -> None:
        """With the server stopped, recording raises LedgerUnavailable and
        stores nothing; once it is back the same Ledger records again."""
        ledger = Ledger.open(private_postgresql.url, timeout=5)
        try:
            ledger.record_issuance(record(1))
            private_postgresql.stop()
            with pytest.raises(LedgerUnavailable):
                ledger.record_issuance(record(2, issued_at=T0 + HOUR))
            with pytest.raises(LedgerUnavailable):
                ledger.ping()
            with pytest.raises(LedgerUnavailable):
                ledger.is_revoked(1)
            private_postgresql.start()
            assert ledger.certificate(2) is None
            ledger.record_issuance(record(2, issued_at=T0 + HOUR))
            assert serials(ledger.certificates()) == [2, 1]
        finally:
            ledger.close()

    def test_idle_connections_survive_a_restart(
        self, private_postgresql: PrivatePostgreSQL
    ) -> None:
        """After a server restart nobody noticed, the first write and the first
        read on connections opened before it succeed."""
        ledger = Ledger.open(private_postgresql.url, timeout=5)
        # A second thread keeps its own connection, used only for reading.
        with concurrent.futures.ThreadPoolExecutor(1) as reader:
            try:
                ledger.record_issuance(record(1))
                assert not reader.submit(ledger.is_revoked, 1).result()
                private_postgresql.stop()
                private_postgresql.start()
                ledger.record_issuance(record(2))
                assert not reader.submit(ledger.is_revoked, 1).result()
                assert serials(ledger.certificates()) == [2, 1]
            finally:
                ledger.close()


def test_unreachable_postgresql_is_unavailable() -> None:
    """Opening a PostgreSQL ledger where no server listens raises
    LedgerUnavailable."""
    from tests.pg_support import free_port

    url = f"postgresql://estd@127.0.0.1:{free_port()}/estd"
    with pytest.raises(LedgerUnavailable, match="cannot connect"):
        Ledger.open(url, timeout=2)


@pytest.mark.parametrize(
    "url",
    [
        "mysql://db/estd",
        "sqlite://",
        "",
        ":memory:",
        "sqlite://:memory:",
        "postgresql://db/estd?no_such_parameter=1",
    ],
)
def test_unusable_urls_are_refused(url: str) -> None:
    """Other databases, in-memory SQLite and malformed PostgreSQL URLs raise
    ValueError."""
    with pytest.raises(ValueError):
        Ledger.open(url)
