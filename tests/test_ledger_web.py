"""The ledger over HTTP, in memory: /crl, 202, 429 and 503 as clients see them.

The site is the real one from :func:`estd.web.build_site` with a real
ledger (SQLite in the test's directory; a private PostgreSQL server for the
outage test), driven through treq's ``StubTreq`` or by bytes into an
``EstChannel`` where the exact wire matters.  Signing runs in a synchronous
thread pool and time comes from a ``Clock``, as in tests/test_web.py.
"""

from __future__ import annotations

import base64
import datetime
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from treq.testing import StubTreq
from twisted.internet import defer
from twisted.python.failure import Failure

import estd.site
from estd.config import Config
from estd.demo import Pair
from estd.identity import ClientIdentity
from estd.ledger import Ledger
from estd.site import EstSite
from estd.web import build_site
from tests.pki import NOW, demo_pki, fioconfig_csr
from tests.test_labels_web import load_ini, other_pki
from tests.test_web import (
    SynchronousThreadPool,
    ThreadlessClock,
    WriteCountingTransport,
    parse_raw_response,
    pkcs7_certificates,
)

if TYPE_CHECKING:
    from tests.pg_support import PrivatePostgreSQL

# Imported by pytest (not above) so that its fixtures register as a plugin.
pytest_plugins = ["tests.pg_support"]

EST = "/.well-known/est/"
PKCS10 = "application/pkcs10"
TEXT_PLAIN = [b"text/plain; charset=utf-8"]
PKIX_CRL = [b"application/pkix-crl"]
START = 1_800_000_000
"""The fake clock's time at the start of every test (2027-01-15 08:00 UTC)."""
STARTED = datetime.datetime.fromtimestamp(START, datetime.UTC)
DAY = datetime.timedelta(days=1)
UNAVAILABLE = b"the issuance ledger is unavailable; retry later\n"


def result_of(deferred: defer.Deferred[Any]) -> Any:
    """The result a Deferred already has (raising its failure)."""
    results: list[Any] = []
    deferred.addBoth(results.append)
    assert len(results) == 1, "the Deferred has no result yet"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def device_identity(pair: Pair, anchor: Pair | None = None) -> ClientIdentity:
    """What the TLS layer reports for a device verified against ``anchor``."""
    anchor = anchor or demo_pki().device_ca
    return ClientIdentity(pair.certificate, (pair.certificate, anchor.certificate))


def csr_body(subject: x509.Name) -> bytes:
    """A one-line base64 fioconfig CSR for ``subject``."""
    return base64.b64encode(fioconfig_csr(subject)[1])


def without_date(raw: bytes) -> bytes:
    """A raw response with its (wall-clock) Date header line removed."""
    stripped, count = re.subn(rb"\r\nDate: [^\r\n]+", b"", raw, count=1)
    assert count == 1, raw
    return stripped


def crl_number(crl: x509.CertificateRevocationList) -> int:
    """The CRLNumber of a CRL."""
    return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number


def entries(
    crl: x509.CertificateRevocationList,
) -> dict[int, tuple[datetime.datetime, x509.ReasonFlags | None]]:
    """Serial -> (revocation date, reason code or None) of every CRL entry."""
    listed: dict[int, tuple[datetime.datetime, x509.ReasonFlags | None]] = {}
    for entry in crl:
        try:
            reason: x509.ReasonFlags | None = entry.extensions.get_extension_for_class(
                x509.CRLReason
            ).value.reason
        except x509.ExtensionNotFound:
            reason = None
        listed[entry.serial_number] = (entry.revocation_date_utc, reason)
    return listed


class EstServer:
    """One EST site in memory with a ledger, a fake clock and a fake client."""

    def __init__(
        self,
        config: Config,
        ledger: Ledger | None,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        self.config = config
        self.identity: ClientIdentity | None = device_identity(demo_pki().devices[0])
        self.clock = ThreadlessClock()
        self.clock.advance(START)
        self.site: EstSite = build_site(
            lambda: self.config, self.clock, SynchronousThreadPool(), ledger=ledger
        )
        # StubTreq and StringTransport have no TLS: this is the one function
        # that reads the client certificate off the connection.
        monkeypatch.setattr(
            estd.site, "client_identity", lambda transport: self.identity
        )

    @property
    def now(self) -> datetime.datetime:
        """The fake clock's time."""
        return datetime.datetime.fromtimestamp(self.clock.seconds(), datetime.UTC)

    def request(
        self, method: str, path: str, body: bytes | None = None
    ) -> tuple[Any, bytes]:
        """One request through treq's StubTreq; the response and its body."""
        stub = StubTreq(self.site.resource)
        # The EST resources need EstSite's request class (client, log line).
        stub._agent._serverFactory = self.site
        headers = {"Content-Type": PKCS10} if body is not None else {}
        pending = stub.request(
            method, "http://est.test" + path, data=body, headers=headers
        )
        stub.flush()
        response = result_of(pending)
        return response, result_of(response.content())

    def renew(self, pair: Pair, path: str = EST + "simplereenroll") -> x509.Certificate:
        """Renew ``pair`` as that device; the certificate it gets (201 or 200)."""
        self.identity = device_identity(pair)
        response, body = self.request("POST", path, csr_body(pair.certificate.subject))
        assert response.code in (200, 201), body
        (certificate,) = pkcs7_certificates(body)
        return certificate

    def crl(self, path: str = EST + "crl") -> tuple[Any, bytes]:
        """GET a CRL; the response and its body."""
        return self.request("GET", path)

    def wire(self, raw: bytes) -> bytes:
        """Feed raw request bytes to a new EstChannel; the one write it makes."""
        channel = self.site.buildProtocol(None)
        transport = WriteCountingTransport()
        channel.makeConnection(transport)
        channel.dataReceived(raw)
        assert len(transport.writes) == 1, transport.writes
        return transport.writes[0]


def post_bytes(path: str, body: bytes) -> bytes:
    """A raw HTTP/1.1 POST of a CSR body."""
    return (
        b"POST %s HTTP/1.1\r\nHost: est.test\r\n"
        b"Content-Type: application/pkcs10\r\nContent-Length: %d\r\n\r\n%s"
        % (path.encode(), len(body), body)
    )


@pytest.fixture
def ledger_url(tmp_path: Path) -> str:
    """A SQLite ledger file in the test's directory."""
    return f"sqlite://{tmp_path / 'estd.sqlite3'}"


@pytest.fixture
def ledger(ledger_url: str) -> Iterator[Ledger]:
    """The ledger the site records into."""
    opened = Ledger.open(ledger_url)
    yield opened
    opened.close()


def server_for(
    config: Config, ledger: Ledger | None, monkeypatch: pytest.MonkeyPatch
) -> EstServer:
    """An in-memory EST server for ``config`` recording into ``ledger``."""
    return EstServer(config, ledger, monkeypatch)


def demo() -> Config:
    """The demo configuration."""
    return load_ini()


def assert_text_error(response: Any, body: bytes, status: int, reason: str) -> None:
    """``response`` is ``status`` with the one-line text/plain ``reason``."""
    assert (response.code, body) == (status, reason.encode() + b"\n")
    assert response.headers.getRawHeaders(b"Content-Type") == TEXT_PLAIN
    assert response.length == len(body)


# --- Enrollment is on record before the response ------------------------------------


def test_certificate_sent_is_the_one_on_record(
    ledger: Ledger, ledger_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The certificate a device receives over HTTP is already in the ledger,
    byte for byte, with the time of the request."""
    server = server_for(demo(), ledger, monkeypatch)
    certificate = server.renew(demo_pki().devices[0])
    other_instance = Ledger.open(ledger_url)
    try:
        row = other_instance.certificate(certificate.serial_number)
    finally:
        other_instance.close()
    assert row is not None
    assert row.der == certificate.public_bytes(serialization.Encoding.DER)
    assert (row.operation, row.issued_at) == ("simplereenroll", STARTED)


def test_revoked_client_is_403_over_http(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A device presenting a revoked certificate estd issued gets 403 and no
    certificate."""
    server = server_for(demo(), ledger, monkeypatch)
    certificate = server.renew(demo_pki().devices[0])
    ledger.revoke(serial=certificate.serial_number, reason="keyCompromise", at=NOW)
    server.identity = device_identity(
        Pair(certificate, demo_pki().devices[0].key), demo_pki().est_ca
    )
    response, body = server.request(
        "POST", EST + "simplereenroll", csr_body(certificate.subject)
    )
    assert_text_error(
        response, body, 403, f"the client certificate was revoked on {NOW:%Y-%m-%d}"
    )
    assert len(ledger.certificates()) == 1


# --- /crl -----------------------------------------------------------------------------


def test_crl_lists_revocations_signed_by_the_est_ca(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GET /crl answers a DER CRL signed by the EST CA that lists each revoked
    certificate with its reason code, and none for 'unspecified'."""
    server = server_for(demo(), ledger, monkeypatch)
    compromised, retired, valid = (server.renew(pair) for pair in demo_pki().devices)
    revoked_at = STARTED - datetime.timedelta(hours=2)
    ledger.revoke(
        serial=compromised.serial_number, reason="keyCompromise", at=revoked_at
    )
    ledger.revoke(serial=retired.serial_number, reason="unspecified", at=revoked_at)
    response, body = server.crl()
    assert response.code == 200
    assert response.headers.getRawHeaders(b"Content-Type") == PKIX_CRL
    assert response.length == len(body)
    assert response.headers.getRawHeaders(b"Content-Transfer-Encoding") is None
    crl = x509.load_der_x509_crl(body)
    est_ca = demo_pki().est_ca.certificate
    assert crl.is_signature_valid(est_ca.public_key())  # type: ignore[arg-type]
    assert crl.issuer == est_ca.subject
    assert (crl.last_update_utc, crl.next_update_utc) == (STARTED, STARTED + 7 * DAY)
    assert crl_number(crl) == 1  # the ledger's counter: first CRL of this CA
    assert entries(crl) == {
        compromised.serial_number: (revoked_at, x509.ReasonFlags.key_compromise),
        retired.serial_number: (revoked_at, None),
    }
    unspecified = crl.get_revoked_certificate_by_serial_number(retired.serial_number)
    assert unspecified is not None
    assert list(unspecified.extensions) == []
    assert crl.get_revoked_certificate_by_serial_number(valid.serial_number) is None
    authority_key_id = crl.extensions.get_extension_for_class(
        x509.AuthorityKeyIdentifier
    ).value.key_identifier
    assert (
        authority_key_id
        == est_ca.extensions.get_extension_for_class(
            x509.SubjectKeyIdentifier
        ).value.digest
    )
    head, head_body = server.request("HEAD", EST + "crl")
    assert (head.code, head_body) == (200, b"")
    assert head.headers.getRawHeaders(b"Content-Type") == PKIX_CRL


def test_crl_is_regenerated_when_revocations_change(
    ledger: Ledger, ledger_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CRL is reused until a revocation (by any instance) or a day passes;
    each new CRL has a larger CRLNumber."""
    server = server_for(demo(), ledger, monkeypatch)
    certificate = server.renew(demo_pki().devices[0])
    _, first = server.crl()
    server.clock.advance(60)
    _, reused = server.crl()
    assert reused == first
    assert entries(x509.load_der_x509_crl(first)) == {}
    # estctl (another connection to the ledger) revokes.
    operator = Ledger.open(ledger_url)
    try:
        operator.revoke(
            serial=certificate.serial_number, reason="superseded", at=server.now
        )
    finally:
        operator.close()
    revoked_at = server.now
    server.clock.advance(1)
    _, after_revocation = server.crl()
    crl = x509.load_der_x509_crl(after_revocation)
    assert crl_number(crl) == 2
    assert crl_number(crl) > crl_number(x509.load_der_x509_crl(first))
    assert entries(crl) == {
        certificate.serial_number: (revoked_at, x509.ReasonFlags.superseded)
    }
    # No change: the same CRL for a day, then a new one.
    server.clock.advance(DAY.total_seconds() - 1)
    _, within_a_day = server.crl()
    assert within_a_day == after_revocation
    server.clock.advance(1)
    _, next_day = server.crl()
    daily = x509.load_der_x509_crl(next_day)
    assert crl_number(daily) == 3
    assert daily.last_update_utc == server.now
    assert entries(daily) == entries(crl)


def test_newer_crl_has_larger_number_across_instances(
    ledger: Ledger, ledger_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Of two instances sharing a ledger, a CRL made after a revocation has a
    larger CRLNumber than one made before it, even if its clock is 2 s behind."""
    ahead = server_for(demo(), ledger, monkeypatch)
    ahead.clock.advance(2)
    behind_ledger = Ledger.open(ledger_url)
    try:
        behind = server_for(demo(), behind_ledger, monkeypatch)
        certificate = ahead.renew(demo_pki().devices[0])
        _, before = ahead.crl()
        ledger.revoke(
            serial=certificate.serial_number, reason="keyCompromise", at=STARTED
        )
        behind.clock.advance(1)
        _, after = behind.crl()
    finally:
        behind_ledger.close()
    older, newer = x509.load_der_x509_crl(before), x509.load_der_x509_crl(after)
    assert list(entries(newer)) == [certificate.serial_number]
    assert crl_number(newer) > crl_number(older)


def test_label_crl_is_signed_by_the_label_ca(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/<label>/crl is signed by that label's EST CA and lists only its
    certificates; a label sharing the default CA serves the default CRL."""
    other = other_pki()
    config = load_ini(
        "\n[label rfc]\nresponse-profile = rfc7030\n"
        "\n[label other]\nca-cert = other-est-ca.pem\nca-key = other-est-ca.key\n"
        "client-cas = other-device-ca.pem\n",
        {
            "other-est-ca.pem": other.est_ca.cert_pem(),
            "other-est-ca.key": other.est_ca.key_pem(),
            "other-device-ca.pem": other.device_ca.cert_pem(),
        },
    )
    server = server_for(config, ledger, monkeypatch)
    default_certificate = server.renew(demo_pki().devices[0])
    server.identity = device_identity(other.device, other.device_ca)
    response, body = server.request(
        "POST",
        EST + "other/simplereenroll",
        csr_body(other.device.certificate.subject),
    )
    assert response.code == 201, body
    (other_certificate,) = pkcs7_certificates(body)
    for certificate in (default_certificate, other_certificate):
        ledger.revoke(
            serial=certificate.serial_number, reason="cessationOfOperation", at=NOW
        )
    _, other_body = server.crl(EST + "other/crl")
    other_crl = x509.load_der_x509_crl(other_body)
    assert other_crl.is_signature_valid(
        other.est_ca.certificate.public_key()  # type: ignore[arg-type]
    )
    assert not other_crl.is_signature_valid(
        demo_pki().est_ca.certificate.public_key()  # type: ignore[arg-type]
    )
    assert other_crl.issuer == other.est_ca.certificate.subject
    assert list(entries(other_crl)) == [other_certificate.serial_number]
    _, default_body = server.crl()
    default_crl = x509.load_der_x509_crl(default_body)
    assert default_crl.is_signature_valid(
        demo_pki().est_ca.certificate.public_key()  # type: ignore[arg-type]
    )
    assert list(entries(default_crl)) == [default_certificate.serial_number]
    _, rfc_body = server.crl(EST + "rfc/crl")
    assert rfc_body == default_body


def ca_without_crl_sign() -> Pair:
    """An EST CA under the demo root whose KeyUsage has keyCertSign only."""
    root = demo_pki().root
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "no-crl-ca")])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(root.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - datetime.timedelta(hours=1))
        .not_valid_after(NOW + 3650 * DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False
        )
        .sign(root.key, hashes.SHA256())
    )
    return Pair(certificate, key)


def test_crl_without_crl_sign_is_404(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A label whose EST CA may not sign CRLs answers /crl with 404 saying why,
    while the other labels serve theirs."""
    ca = ca_without_crl_sign()
    config = load_ini(
        "\n[label nocrl]\nca-cert = nocrl.pem\nca-key = nocrl.key\n",
        {"nocrl.pem": ca.cert_pem(), "nocrl.key": ca.key_pem()},
    )
    server = server_for(config, ledger, monkeypatch)
    for method in ("GET", "HEAD"):
        response, body = server.request(method, EST + "nocrl/crl")
        assert response.code == 404
        assert response.headers.getRawHeaders(b"Content-Type") == TEXT_PLAIN
        if method == "GET":
            assert_text_error(
                response,
                body,
                404,
                "no CRL: the EST CA's KeyUsage does not allow cRLSign",
            )
    response, _ = server.crl()
    assert response.code == 200


def test_crl_without_ledger_is_404(monkeypatch: pytest.MonkeyPatch) -> None:
    """A site built without a ledger answers /crl with 404 saying why."""
    server = server_for(demo(), None, monkeypatch)
    response, body = server.crl()
    assert_text_error(response, body, 404, "no CRL: this server keeps no ledger")


# --- 202, 429 on the wire -------------------------------------------------------------


def test_pending_request_202_on_the_wire(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request waiting for approval is answered 'HTTP/1.1 202 Accepted' with an
    integer Retry-After and a text body; after approval the same CSR is issued."""
    server = server_for(
        load_ini(approval="manual", approval_retry_after="120"), ledger, monkeypatch
    )
    device = demo_pki().devices[0]
    body = csr_body(device.certificate.subject)
    reason = b"request 1 is waiting for an operator's approval\n"
    expected = (
        b"HTTP/1.1 202 Accepted\r\n"
        b"Server: estd\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: %d\r\n"
        b"Retry-After: 120\r\n"
        b"\r\n" % len(reason)
    ) + reason
    for _ in range(2):
        raw = server.wire(post_bytes(EST + "simplereenroll", body))
        assert without_date(raw) == expected
    ledger.pending_decide(1, approve=True, by="operator", now=NOW)
    raw = server.wire(post_bytes(EST + "simplereenroll", body))
    status, _, payload = parse_raw_response(raw)
    assert status == b"HTTP/1.1 201 Created"
    (certificate,) = pkcs7_certificates(payload)
    assert [
        (row.id, row.status, row.certificate_serial) for row in ledger.pending_list()
    ] == [(1, "issued", certificate.serial_number)]


def test_daily_limit_429_on_the_wire(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Beyond max-issuance-per-day the status line reads 'HTTP/1.1 429 Too Many
    Requests' with Retry-After."""
    server = server_for(load_ini(max_issuance_per_day="1"), ledger, monkeypatch)
    subject = demo_pki().devices[0].certificate.subject
    first = server.wire(post_bytes(EST + "simplereenroll", csr_body(subject)))
    assert parse_raw_response(first)[0] == b"HTTP/1.1 201 Created"
    reason = b"this subject reached the limit of certificates per 24 hours (1)\n"
    raw = server.wire(post_bytes(EST + "simplereenroll", csr_body(subject)))
    assert (
        without_date(raw)
        == (
            b"HTTP/1.1 429 Too Many Requests\r\n"
            b"Server: estd\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: %d\r\n"
            b"Retry-After: 3600\r\n"
            b"\r\n" % len(reason)
        )
        + reason
    )
    assert len(ledger.certificates()) == 1


# --- The database goes away -----------------------------------------------------------


def test_stopped_database_is_503(
    private_postgresql: PrivatePostgreSQL, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the PostgreSQL ledger is stopped, enrollment and /crl get 503 with
    Retry-After; when it is back both work again without a restart."""
    ledger = Ledger.open(private_postgresql.url, timeout=5)
    try:
        server = server_for(demo(), ledger, monkeypatch)
        device = demo_pki().devices[0]
        first = server.renew(device)
        private_postgresql.stop()
        for method, path, body in (
            ("POST", EST + "simplereenroll", csr_body(device.certificate.subject)),
            ("GET", EST + "crl", None),
        ):
            response, content = server.request(method, path, body)
            assert (response.code, content) == (503, UNAVAILABLE)
            assert response.headers.getRawHeaders(b"Retry-After") == [b"30"]
            assert response.headers.getRawHeaders(b"Content-Type") == TEXT_PLAIN
        private_postgresql.start()
        second = server.renew(device)
        response, crl = server.crl()
        assert response.code == 200
        assert entries(x509.load_der_x509_crl(crl)) == {}
        assert sorted(row.serial for row in ledger.certificates()) == sorted(
            [first.serial_number, second.serial_number]
        )
    finally:
        ledger.close()
