"""estd.enrollment.enroll with a real issuance ledger.

Every test calls :func:`estd.enrollment.enroll` directly, as the signing
thread pool does, with a real :class:`~estd.ledger.Ledger`: SQLite in the
test's directory and, where ``ESTD_TEST_POSTGRESQL`` names a server, the
same test again on a fresh PostgreSQL database.  The outage tests stop a
private PostgreSQL server under the ledger (tests/pg_support.py).
"""

from __future__ import annotations

import base64
import datetime
import functools
import hashlib
import ipaddress
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import ExtendedKeyUsageOID

import estd.ca
from estd import auth
from estd.ca import CertificateAuthority, serial_hex
from estd.config import Config, LabelConfig
from estd.demo import Pair, device_name
from estd.enrollment import Enrollment, EnrollmentRequest, enroll
from estd.errors import (
    EstError,
    Forbidden,
    PendingApproval,
    ServiceUnavailable,
    TooManyRequests,
)
from estd.identity import ClientIdentity
from estd.ledger import CertificateRow, Ledger, LedgerError, PendingRow
from estd.policy import Operation
from estd.wire import decode_body
from tests.pki import NOW, demo_pki, fioconfig_csr
from tests.test_labels_web import load_ini
from tests.test_serverkeygen import parse_multipart

if TYPE_CHECKING:
    from tests.pg_support import PrivatePostgreSQL

# Imported by pytest (not above) so that its fixtures register as a plugin.
pytest_plugins = ["tests.pg_support"]

ENROLL, REENROLL = Operation.SIMPLEENROLL, Operation.SIMPLEREENROLL
ADDRESS = "192.0.2.7"
MINUTE = datetime.timedelta(minutes=1)
HOUR = datetime.timedelta(hours=1)
DAY = datetime.timedelta(days=1)
DURATION = datetime.timedelta(hours=26280)
"""The demo est.ini's cert-duration."""
USER, PASSWORD = "dev-1", "correct horse"
SUPERSEDING_LABELS = """
[label fleet]
revoke-superseded = yes

[label lab]
revoke-superseded = yes
"""


# --- Ledgers ------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty ledger database: a SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite://{tmp_path / 'estd.sqlite3'}"
    postgresql_url: str = request.getfixturevalue("postgresql_url")
    return postgresql_url


@pytest.fixture
def ledger(url: str) -> Iterator[Ledger]:
    """The ledger estd records into."""
    opened = Ledger.open(url)
    yield opened
    opened.close()


@pytest.fixture
def reader(url: str, ledger: Ledger) -> Iterator[Ledger]:
    """A second ledger on the same database, as another estd instance or estctl."""
    opened = Ledger.open(url)
    yield opened
    opened.close()


# --- Settings, clients and requests ---------------------------------------------------


@functools.cache
def config(sections: str = "", **options: str) -> Config:
    """The demo configuration plus ``sections`` and est.ini overrides (cached)."""
    return load_ini(sections, **options)


def settings(**options: str) -> LabelConfig:
    """The unlabelled path's settings with these est.ini overrides."""
    return config(**options).default


def device(index: int = 0) -> Pair:
    """A demo device (its certificate comes from the demo device CA)."""
    return demo_pki().devices[index]


def identity(certificate: x509.Certificate, anchor: Pair) -> ClientIdentity:
    """What the TLS layer reports for ``certificate`` verified against ``anchor``."""
    return ClientIdentity(certificate, (certificate, anchor.certificate))


def device_identity(pair: Pair) -> ClientIdentity:
    """A demo device as the TLS layer reports it."""
    return identity(pair.certificate, demo_pki().device_ca)


def issued_identity(certificate: x509.Certificate) -> ClientIdentity:
    """A certificate estd issued, presented as the client, chained to the EST CA."""
    return identity(certificate, demo_pki().est_ca)


def b64(der: bytes) -> bytes:
    """The one-line base64 body of a DER CSR."""
    return base64.b64encode(der)


def renewal(
    client: ClientIdentity, csr_der: bytes | None = None, **fields: Any
) -> EnrollmentRequest:
    """A simplereenroll of ``client`` (a fresh CSR for its subject unless given)."""
    if csr_der is None:
        csr_der = fioconfig_csr(client.certificate.subject)[1]
    return EnrollmentRequest(
        REENROLL, b64(csr_der), client=client, client_address=ADDRESS, **fields
    )


def certificates_of(enrollment: Enrollment) -> list[x509.Certificate]:
    """The certificates in an enrollment's base64 certs-only PKCS#7 body."""
    return pkcs7.load_der_pkcs7_certificates(decode_body(enrollment.body))


def der(certificate: x509.Certificate) -> bytes:
    """A certificate's DER."""
    return certificate.public_bytes(serialization.Encoding.DER)


def spki_sha256(public_key: Any) -> str:
    """Hex SHA-256 of a public key's SubjectPublicKeyInfo DER."""
    spki = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).hexdigest()


def fingerprint(pair: Pair) -> str:
    """Hex SHA-256 fingerprint of a CA certificate, as the ledger names issuers."""
    return pair.certificate.fingerprint(hashes.SHA256()).hex()


def serials(rows: list[CertificateRow]) -> list[int]:
    """The serials of ledger rows, in their order."""
    return [row.serial for row in rows]


def refuse_signing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any signing attempt fail the test."""

    def issue(*args: object, **kwargs: object) -> None:
        raise AssertionError("a certificate was signed")

    monkeypatch.setattr(CertificateAuthority, "issue", issue)


def client_certificate(subject: x509.Name, issuer: Pair, serial: int) -> Pair:
    """A clientAuth device certificate with a chosen serial number."""
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.certificate.subject)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(NOW - HOUR)
        .not_valid_after(NOW + 365 * DAY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .sign(issuer.key, hashes.SHA256())
    )
    return Pair(certificate, key)


# --- Every issuance is on record ------------------------------------------------------


def test_renewal_is_on_record_with_every_field(ledger: Ledger, reader: Ledger) -> None:
    """A renewal is committed to the ledger, every field filled in, before enroll
    returns the very certificate it recorded."""
    pair = device()
    key, csr = fioconfig_csr(pair.certificate.subject)
    result = enroll(settings(), renewal(device_identity(pair), csr), NOW, ledger)
    certificate = result.issued.certificate
    assert certificates_of(result) == [certificate]
    # Read through another connection: the row is committed, not just written.
    assert reader.certificates() == [
        CertificateRow(
            serial=certificate.serial_number,
            label="",
            operation="simplereenroll",
            subject=pair.certificate.subject.rfc4514_string(),
            subject_der=pair.certificate.subject.public_bytes(),
            san=None,
            public_key_sha256=spki_sha256(key.public_key()),
            not_before=NOW - MINUTE,
            not_after=NOW + DURATION,
            issuer=fingerprint(demo_pki().est_ca),
            client_serial=serial_hex(pair.certificate.serial_number),
            client_issuer=demo_pki().device_ca.certificate.subject.rfc4514_string(),
            client_address=ADDRESS,
            user=None,
            issued_at=NOW,
            der=der(certificate),
            revoked_at=None,
            revocation_reason=None,
        )
    ]


def test_enrollment_with_san_is_on_record(ledger: Ledger, reader: Ledger) -> None:
    """A simpleenroll is recorded with its operation, label and SubjectAltName."""
    pair = device()
    san = x509.SubjectAlternativeName(
        [
            x509.DNSName("device-1.example.com"),
            x509.IPAddress(ipaddress.ip_address("192.0.2.10")),
        ]
    )
    _, csr = fioconfig_csr(device_name("sensor-7"), extensions=[(san, False)])
    request = EnrollmentRequest(
        ENROLL, b64(csr), client=device_identity(pair), client_address=ADDRESS
    )
    labels = config("\n[label factory]\nenroll-subject = any\n")
    result = enroll(labels.labels["factory"], request, NOW, ledger)
    row = reader.certificate(result.issued.certificate.serial_number)
    assert row is not None
    assert (row.label, row.operation, row.subject, row.san) == (
        "factory",
        "simpleenroll",
        device_name("sensor-7").rfc4514_string(),
        "DNS:device-1.example.com, IP:192.0.2.10",
    )
    assert row.der == der(result.issued.certificate)


@pytest.fixture
def users_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A users file holding dev-1 (bcrypt at the lowest cost, for speed)."""
    monkeypatch.setattr(auth, "BCRYPT_ROUNDS", 4)
    path = tmp_path / "users.htpasswd"
    auth.set_password(str(path), USER, PASSWORD)
    return str(path)


def test_basic_user_is_on_record(
    ledger: Ledger, reader: Ledger, users_file: str
) -> None:
    """An enrollment by an HTTP Basic user records the user and no client
    certificate."""
    basic = load_ini(auth="basic", users_file=users_file).default
    key, csr = fioconfig_csr(x509.Name.from_rfc4514_string("CN=" + USER))
    request = EnrollmentRequest(
        ENROLL, b64(csr), credentials=(USER, PASSWORD), client_address=ADDRESS
    )
    result = enroll(basic, request, NOW, ledger)
    (row,) = reader.certificates()
    assert row.serial == result.issued.certificate.serial_number
    assert (row.subject, row.user, row.client_serial, row.client_issuer) == (
        "CN=dev-1",
        USER,
        None,
        None,
    )
    assert (row.client_address, row.public_key_sha256) == (
        ADDRESS,
        spki_sha256(key.public_key()),
    )
    assert row.der == der(result.issued.certificate)


def test_serverkeygen_is_on_record(ledger: Ledger, reader: Ledger) -> None:
    """/serverkeygen is recorded as operation 'serverkeygen', with the key the
    server made, and the certificate sent is the one on record."""
    pair = device()
    csr_key, csr = fioconfig_csr(pair.certificate.subject)
    request = EnrollmentRequest(
        ENROLL,
        b64(csr),
        client=device_identity(pair),
        server_keygen=True,
        client_address=ADDRESS,
    )
    result = enroll(settings(serverkeygen="yes"), request, NOW, ledger)
    assert result.content_type is not None
    key_part, certificate_part = parse_multipart(result.content_type, result.body)
    key_der = key_part.get_payload(decode=True)
    assert isinstance(key_der, bytes)
    key = serialization.load_der_private_key(key_der, password=None)
    pkcs7_der = certificate_part.get_payload(decode=True)
    assert isinstance(pkcs7_der, bytes)
    (sent,) = pkcs7.load_der_pkcs7_certificates(pkcs7_der)
    (row,) = reader.certificates()
    assert (row.serial, row.operation, row.der) == (
        sent.serial_number,
        "serverkeygen",
        der(sent),
    )
    assert row.public_key_sha256 == spki_sha256(key.public_key())
    assert row.public_key_sha256 != spki_sha256(csr_key.public_key())
    assert sent == result.issued.certificate


# --- The database is away: 503, nothing issued ----------------------------------------


def test_stopped_database_is_503_and_nothing_leaves(
    private_postgresql: PrivatePostgreSQL, users_file: str
) -> None:
    """While the ledger's PostgreSQL server is stopped, enrollments get 503 with
    Retry-After and no certificate; once it is back the same requests succeed."""
    ledger = Ledger.open(private_postgresql.url, timeout=5)
    try:
        pair = device()
        first = enroll(settings(), renewal(device_identity(pair)), NOW, ledger)
        csr = fioconfig_csr(pair.certificate.subject)[1]
        by_certificate = renewal(device_identity(pair), csr)
        basic = load_ini(auth="basic", users_file=users_file).default
        # A Basic user's request reaches the ledger only to record: signed,
        # then refused because the record cannot be written.
        by_user = EnrollmentRequest(
            ENROLL,
            b64(fioconfig_csr(x509.Name.from_rfc4514_string("CN=" + USER))[1]),
            credentials=(USER, PASSWORD),
        )
        private_postgresql.stop()
        for label, request in ((settings(), by_certificate), (basic, by_user)):
            with pytest.raises(ServiceUnavailable) as caught:
                enroll(label, request, NOW + MINUTE, ledger)
            assert caught.value.status == 503
            assert caught.value.headers == {"Retry-After": "30"}
            assert caught.value.reason == (
                "the issuance ledger is unavailable; retry later"
            )
        private_postgresql.start()
        assert serials(ledger.certificates()) == [
            first.issued.certificate.serial_number
        ]
        again = enroll(settings(), by_certificate, NOW + 2 * MINUTE, ledger)
        user_again = enroll(basic, by_user, NOW + 2 * MINUTE, ledger)
        assert sorted(serials(ledger.certificates())) == sorted(
            [
                first.issued.certificate.serial_number,
                again.issued.certificate.serial_number,
                user_again.issued.certificate.serial_number,
            ]
        )
    finally:
        ledger.close()


# --- Serial numbers are unique --------------------------------------------------------


def test_taken_serial_is_redrawn(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the drawn serial is already on record, estd signs again with a new
    serial: one new row, and the taken serial is not issued twice."""
    pair = device()
    earlier = enroll(settings(), renewal(device_identity(pair)), NOW, ledger)
    taken = earlier.issued.certificate.serial_number
    fresh = taken ^ 0x5A5A
    draws = iter([taken, fresh])
    monkeypatch.setattr(estd.ca, "random_serial", lambda: next(draws))
    result = enroll(settings(), renewal(device_identity(pair)), NOW + MINUTE, ledger)
    assert result.issued.certificate.serial_number == fresh
    assert certificates_of(result)[0].serial_number == fresh
    assert serials(ledger.certificates()) == [fresh, taken]
    earlier_row = ledger.certificate(taken)
    assert earlier_row is not None
    assert earlier_row.der == der(earlier.issued.certificate)


def test_serial_that_stays_taken_is_503(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If every draw hits a serial on record, the client gets 503 after five
    attempts and no certificate."""
    pair = device()
    earlier = enroll(settings(), renewal(device_identity(pair)), NOW, ledger)
    taken = earlier.issued.certificate.serial_number
    draws: list[int] = []

    def draw() -> int:
        draws.append(taken)
        return taken

    monkeypatch.setattr(estd.ca, "random_serial", draw)
    with pytest.raises(ServiceUnavailable) as caught:
        enroll(settings(), renewal(device_identity(pair)), NOW + MINUTE, ledger)
    assert (caught.value.status, caught.value.reason, caught.value.headers) == (
        503,
        "no unique serial number could be drawn",
        {"Retry-After": "5"},
    )
    assert len(draws) == 5
    assert serials(ledger.certificates()) == [taken]


# --- Revoked clients ----------------------------------------------------------------


def test_revoked_client_is_refused_before_signing(
    ledger: Ledger, reader: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A device presenting a certificate estd issued and an operator revoked is
    refused with 403 before anything is signed, also by another instance."""
    pair = device()
    issued = enroll(settings(), renewal(device_identity(pair)), NOW, ledger)
    certificate = issued.issued.certificate
    # Still valid: it renews through the other instance.
    renewed = enroll(
        settings(), renewal(issued_identity(certificate)), NOW + MINUTE, reader
    )
    assert reader.revoke(
        serial=certificate.serial_number, reason="keyCompromise", at=NOW + HOUR
    ) == [certificate.serial_number]
    refuse_signing(monkeypatch)
    for instance in (ledger, reader):
        with pytest.raises(Forbidden) as caught:
            enroll(
                settings(),
                renewal(issued_identity(certificate)),
                NOW + 2 * HOUR,
                instance,
            )
        assert caught.value.status == 403
        assert caught.value.reason == (
            f"the client certificate was revoked on {NOW + HOUR:%Y-%m-%d}"
        )
    assert serials(ledger.certificates()) == [
        renewed.issued.certificate.serial_number,
        certificate.serial_number,
    ]


def test_same_serial_from_another_issuer_is_not_refused(ledger: Ledger) -> None:
    """A certificate from another CA that happens to share a revoked serial is
    not refused: only the revoked certificate itself is."""
    pair = device(1)
    issued = enroll(settings(), renewal(device_identity(pair)), NOW, ledger)
    revoked = issued.issued.certificate
    ledger.revoke(serial=revoked.serial_number, reason="unspecified", at=NOW)
    twin = client_certificate(
        pair.certificate.subject, demo_pki().device_ca, revoked.serial_number
    )
    result = enroll(
        settings(),
        renewal(identity(twin.certificate, demo_pki().device_ca)),
        NOW + MINUTE,
        ledger,
    )
    assert result.issued.certificate.subject == pair.certificate.subject
    row = ledger.certificate(result.issued.certificate.serial_number)
    assert row is not None
    assert row.client_serial == serial_hex(revoked.serial_number)
    device_ca = demo_pki().device_ca.certificate
    assert row.client_issuer == device_ca.subject.rfc4514_string()


def test_revoked_client_leaves_no_pending_request(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With manual approval, a revoked client is refused (403) without a request
    being queued for an operator."""
    pair = device()
    issued = enroll(settings(), renewal(device_identity(pair)), NOW, ledger)
    certificate = issued.issued.certificate
    ledger.revoke(serial=certificate.serial_number, reason="superseded", at=NOW)
    refuse_signing(monkeypatch)
    with pytest.raises(Forbidden) as caught:
        enroll(
            settings(approval="manual"),
            renewal(issued_identity(certificate)),
            NOW + MINUTE,
            ledger,
        )
    revoked_on = f"{NOW:%Y-%m-%d}"
    assert caught.value.reason == f"the client certificate was revoked on {revoked_on}"
    assert ledger.pending_list() == []


# --- max-issuance-per-day -------------------------------------------------------------


def test_daily_limit_per_subject(ledger: Ledger) -> None:
    """With max-issuance-per-day = 2 a subject gets two certificates in 24 hours
    and then 429 with Retry-After, while other subjects are not held back."""
    limited = settings(max_issuance_per_day="2")
    first, second = device(0), device(1)
    for offset in (0, 1):
        enroll(limited, renewal(device_identity(first)), NOW + offset * HOUR, ledger)
    with pytest.raises(TooManyRequests) as caught:
        enroll(limited, renewal(device_identity(first)), NOW + 2 * HOUR, ledger)
    assert (caught.value.status, caught.value.headers, caught.value.reason) == (
        429,
        {"Retry-After": "3600"},
        "this subject reached the limit of certificates per 24 hours (2)",
    )
    assert len(ledger.certificates()) == 2
    other = enroll(limited, renewal(device_identity(second)), NOW + 2 * HOUR, ledger)
    assert other.issued.certificate.subject == second.certificate.subject
    # The window slides: at exactly 24 hours the first still counts.
    with pytest.raises(TooManyRequests):
        enroll(limited, renewal(device_identity(first)), NOW + DAY, ledger)
    later = enroll(
        limited,
        renewal(device_identity(first)),
        NOW + DAY + datetime.timedelta(seconds=1),
        ledger,
    )
    assert later.issued.certificate.subject == first.certificate.subject
    subject = first.certificate.subject.rfc4514_string()
    assert len(ledger.certificates(subject=subject)) == 3


def test_daily_limit_counts_only_new_certificates(ledger: Ledger) -> None:
    """An approved CSR polled again gets its certificate again without counting
    against max-issuance-per-day."""
    strict = settings(approval="manual", max_issuance_per_day="1")
    pair = device()
    csr = fioconfig_csr(pair.certificate.subject)[1]
    with pytest.raises(PendingApproval):
        enroll(strict, renewal(device_identity(pair), csr), NOW, ledger)
    ledger.pending_decide(1, approve=True, by="operator", now=NOW)
    issued = enroll(strict, renewal(device_identity(pair), csr), NOW + MINUTE, ledger)
    for minutes in (2, 3):
        again = enroll(
            strict, renewal(device_identity(pair), csr), NOW + minutes * MINUTE, ledger
        )
        assert again.issued.certificate == issued.issued.certificate
    # A new CSR, once approved, would be a second certificate today.
    other_csr = fioconfig_csr(pair.certificate.subject)[1]
    with pytest.raises(PendingApproval):
        enroll(strict, renewal(device_identity(pair), other_csr), NOW, ledger)
    ledger.pending_decide(2, approve=True, by="operator", now=NOW)
    with pytest.raises(TooManyRequests):
        enroll(
            strict, renewal(device_identity(pair), other_csr), NOW + 4 * MINUTE, ledger
        )
    assert serials(ledger.certificates()) == [issued.issued.certificate.serial_number]


# --- Manual approval (RFC 7030 §4.2.3) ------------------------------------------------


def manual(**options: str) -> LabelConfig:
    """Settings with approval = manual, Retry-After 120 and a one-hour expiry."""
    return settings(
        approval="manual",
        approval_retry_after="120",
        pending_expiry="1h",
        **options,
    )


def test_first_request_waits_for_approval(ledger: Ledger) -> None:
    """The first POST is stored as pending and answered 202 with the configured
    Retry-After; the same CSR again gets the same request, still 202."""
    pair = device()
    csr = fioconfig_csr(pair.certificate.subject)[1]
    for minutes in (0, 5):
        with pytest.raises(PendingApproval) as caught:
            enroll(
                manual(),
                renewal(device_identity(pair), csr),
                NOW + minutes * MINUTE,
                ledger,
            )
        assert (caught.value.status, caught.value.headers, caught.value.reason) == (
            202,
            {"Retry-After": "120"},
            "request 1 is waiting for an operator's approval",
        )
    assert ledger.pending_list() == [
        PendingRow(
            id=1,
            label="",
            csr_sha256=hashlib.sha256(csr).hexdigest(),
            subject=pair.certificate.subject.rfc4514_string(),
            client_serial=serial_hex(pair.certificate.serial_number),
            client_address=ADDRESS,
            user=None,
            created_at=NOW,
            expires_at=NOW + HOUR,
            status="pending",
            decided_at=None,
            decided_by=None,
            certificate_serial=None,
        )
    ]
    assert ledger.certificates() == []


def test_approved_request_gets_its_certificate_every_time(ledger: Ledger) -> None:
    """After approval the same CSR is issued once, the request is marked issued
    with the serial, and asking again returns that same certificate."""
    pair = device()
    key, csr = fioconfig_csr(pair.certificate.subject)
    with pytest.raises(PendingApproval):
        enroll(manual(), renewal(device_identity(pair), csr), NOW, ledger)
    ledger.pending_decide(1, approve=True, by="operator", now=NOW + MINUTE)
    issued = enroll(
        manual(), renewal(device_identity(pair), csr), NOW + 2 * MINUTE, ledger
    )
    certificate = issued.issued.certificate
    assert certificates_of(issued) == [certificate]
    assert spki_sha256(certificate.public_key()) == spki_sha256(key.public_key())
    (request,) = ledger.pending_list()
    assert (request.id, request.status, request.certificate_serial) == (
        1,
        "issued",
        certificate.serial_number,
    )
    assert (request.decided_by, request.decided_at) == ("operator", NOW + MINUTE)
    again = enroll(
        manual(), renewal(device_identity(pair), csr), NOW + 3 * MINUTE, ledger
    )
    assert again.issued.certificate == certificate
    assert again.body == issued.body
    assert serials(ledger.certificates()) == [certificate.serial_number]


def test_rejected_request_is_403(ledger: Ledger) -> None:
    """After an operator rejects a request, the same CSR gets 403, every time."""
    pair = device()
    csr = fioconfig_csr(pair.certificate.subject)[1]
    with pytest.raises(PendingApproval):
        enroll(manual(), renewal(device_identity(pair), csr), NOW, ledger)
    ledger.pending_decide(1, approve=False, by="operator", now=NOW)
    for minutes in (1, 2):
        with pytest.raises(Forbidden) as caught:
            enroll(
                manual(),
                renewal(device_identity(pair), csr),
                NOW + minutes * MINUTE,
                ledger,
            )
        assert (caught.value.status, caught.value.reason) == (
            403,
            "request 1 was rejected by an operator",
        )
    assert ledger.certificates() == []
    assert [row.status for row in ledger.pending_list()] == ["rejected"]


def test_expired_request_starts_over(ledger: Ledger) -> None:
    """A request left undecided past pending-expiry expires; the same CSR then
    makes a new request, and the expired one can no longer be approved."""
    pair = device()
    csr = fioconfig_csr(pair.certificate.subject)[1]
    with pytest.raises(PendingApproval):
        enroll(manual(), renewal(device_identity(pair), csr), NOW, ledger)
    assert ledger.expire_pending(NOW + HOUR - datetime.timedelta(seconds=1)) == 0
    assert ledger.expire_pending(NOW + HOUR) == 1
    with pytest.raises(LedgerError) as refused:
        ledger.pending_decide(1, approve=True, by="operator", now=NOW + HOUR)
    assert str(refused.value) == "request 1 is expired, no longer pending"
    with pytest.raises(PendingApproval) as caught:
        enroll(manual(), renewal(device_identity(pair), csr), NOW + HOUR, ledger)
    assert caught.value.reason == "request 2 is waiting for an operator's approval"
    assert [(row.id, row.status) for row in ledger.pending_list()] == [
        (1, "expired"),
        (2, "pending"),
    ]
    assert ledger.pending_list("pending")[0].expires_at == NOW + 2 * HOUR


def test_serverkeygen_answer_is_not_repeated(ledger: Ledger) -> None:
    """With manual approval, an approved /serverkeygen request gets its key and
    certificate once; the same CSR again gets 403 (the key was not kept)."""
    pair = device()
    csr = fioconfig_csr(pair.certificate.subject)[1]
    keygen = manual(serverkeygen="yes")

    def request() -> EnrollmentRequest:
        return EnrollmentRequest(
            ENROLL,
            b64(csr),
            client=device_identity(pair),
            server_keygen=True,
            client_address=ADDRESS,
        )

    with pytest.raises(PendingApproval):
        enroll(keygen, request(), NOW, ledger)
    ledger.pending_decide(1, approve=True, by="operator", now=NOW)
    issued = enroll(keygen, request(), NOW + MINUTE, ledger)
    assert issued.content_type is not None
    assert issued.content_type.startswith("multipart/mixed; boundary=")
    serial = issued.issued.certificate.serial_number
    (row,) = ledger.certificates()
    assert (row.serial, row.operation) == (serial, "serverkeygen")
    with pytest.raises(Forbidden) as caught:
        enroll(keygen, request(), NOW + 2 * MINUTE, ledger)
    assert caught.value.reason == "request 1 was already answered; send a new CSR"
    assert serials(ledger.certificates()) == [serial]
    assert [(p.status, p.certificate_serial) for p in ledger.pending_list()] == [
        ("issued", serial)
    ]


# --- revoke-superseded ----------------------------------------------------------------


def test_renewal_revokes_superseded_certificates_of_its_label(ledger: Ledger) -> None:
    """With revoke-superseded = yes a renewal revokes the subject's earlier
    certificates of that label as superseded, and none of other labels."""
    labels = config(SUPERSEDING_LABELS).labels
    pair, neighbour = device(0), device(1)

    def renew(label: str, client: Pair, minutes: int) -> int:
        result = enroll(
            labels[label],
            renewal(device_identity(client)),
            NOW + minutes * MINUTE,
            ledger,
        )
        return result.issued.certificate.serial_number

    plain = renew("", pair, 0)
    plain_again = renew("", pair, 1)
    neighbours = renew("fleet", neighbour, 2)
    fleet_first = renew("fleet", pair, 3)
    assert ledger.revocation_revision() == 0
    fleet_second = renew("fleet", pair, 4)
    lab = renew("lab", pair, 5)

    def revocation(serial: int) -> tuple[datetime.datetime | None, str | None]:
        row = ledger.certificate(serial)
        assert row is not None
        return row.revoked_at, row.revocation_reason

    assert revocation(fleet_first) == (NOW + 4 * MINUTE, "superseded")
    for serial in (plain, plain_again, neighbours, fleet_second, lab):
        assert revocation(serial) == (None, None)
    assert ledger.revocation_revision() == 1
    assert serials(ledger.certificates(revoked=True)) == [fleet_first]


# --- Overlapping requests ----------------------------------------------------------
#
# Two requests overlap deterministically: while the first is being signed
# (inside CertificateAuthority.issue), the second runs to its end through
# another ledger connection, as another estd instance would.


def overlapping(
    monkeypatch: pytest.MonkeyPatch, second: Callable[[], Enrollment]
) -> list[Enrollment | Exception]:
    """Make ``second`` run while the next certificate is being signed; what it
    returned or raised ends up in the returned list."""
    outcomes: list[Enrollment | Exception] = []
    signing: list[bool] = []
    original = CertificateAuthority.issue

    def issue(self: CertificateAuthority, *args: Any, **kwargs: Any) -> Any:
        if not signing:
            signing.append(True)  # only the first signing is overlapped
            try:
                outcomes.append(second())
            except Exception as error:
                outcomes.append(error)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(CertificateAuthority, "issue", issue)
    return outcomes


def test_overlapping_polls_of_an_approved_request(
    ledger: Ledger, reader: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two overlapping polls of an approved CSR end without an internal error,
    and every certificate sent is the one the request records."""
    pair = device()
    csr = fioconfig_csr(pair.certificate.subject)[1]
    with pytest.raises(PendingApproval):
        enroll(manual(), renewal(device_identity(pair), csr), NOW, ledger)
    ledger.pending_decide(1, approve=True, by="operator", now=NOW)
    second = overlapping(
        monkeypatch,
        lambda: enroll(
            manual(), renewal(device_identity(pair), csr), NOW + MINUTE, reader
        ),
    )
    outcomes: list[Enrollment | Exception] = []
    try:
        outcomes.append(
            enroll(manual(), renewal(device_identity(pair), csr), NOW + MINUTE, ledger)
        )
    except Exception as error:
        outcomes.append(error)
    outcomes += second
    (request,) = ledger.pending_list()
    assert request.status == "issued"
    sent = [
        o.issued.certificate.serial_number
        for o in outcomes
        if not isinstance(o, Exception)
    ]
    # An EstError (202, say) is an answer; anything else is a 500.
    internal = [o for o in outcomes if isinstance(o, Exception)]
    assert [o for o in internal if not isinstance(o, EstError)] == []
    assert sent
    assert set(sent) == {request.certificate_serial}


def test_overlapping_requests_respect_the_daily_limit(
    ledger: Ledger, reader: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With max-issuance-per-day = 1, of two overlapping renewals of one subject
    only one gets a certificate and the other gets 429."""
    limited = settings(max_issuance_per_day="1")
    pair = device()
    second = overlapping(
        monkeypatch,
        lambda: enroll(limited, renewal(device_identity(pair)), NOW, reader),
    )
    outcomes: list[Enrollment | Exception] = []
    try:
        outcomes.append(enroll(limited, renewal(device_identity(pair)), NOW, ledger))
    except TooManyRequests as error:
        outcomes.append(error)
    outcomes += second
    assert len(ledger.certificates()) == 1
    assert [type(outcome) for outcome in outcomes].count(TooManyRequests) == 1
