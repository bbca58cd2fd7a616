"""The EST client and the ``estctl`` commands built on it.

The HTTP rules (Basic credentials only after a challenge, reading to
Content-Length, status handling, serverkeygen's multipart body) are tested
on bytes in memory; the rest runs against the real ``twistd est`` on a
loopback port, the way an operator smoke-tests a deployment.
"""

from __future__ import annotations

import base64
import datetime
import os
import stat
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import AttributeOID, ExtendedKeyUsageOID

from estd.client import (
    EST_PATH,
    BasicCredentials,
    EstClient,
    EstClientError,
    EstProtocolError,
    EstRetryLater,
    Exchange,
    HttpResponse,
    build_csr,
    encode_request,
    expect_success,
    expected_length,
    make_key,
    offers_basic,
    parse_response,
    parse_serverkeygen,
)
from estd.demo import device_name, make_pair
from estd.estctl import describe_csrattrs
from estd.wire import encode_base64
from tests.e2e_support import (
    EstServer,
    certificate_subject_der,
    csr_subject_der,
    free_port,
    run,
)

# --- HTTP on bytes --------------------------------------------------------------------

CHALLENGE = (
    b"HTTP/1.1 401 Unauthorized\r\n"
    b'WWW-Authenticate: Basic realm="estd"\r\n'
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: 23\r\n\r\n"
    b"credentials are needed\n"
)
CREATED = (
    b"HTTP/1.1 201 Created\r\n"
    b"Content-Type: application/pkcs7-mime\r\n"
    b"Content-Length: 4\r\n\r\n"
    b"MA==\r\n"  # two bytes past Content-Length, which must be ignored
)


def _exchange(*, preemptive: bool = False) -> tuple[Exchange, list[bytes | None]]:
    bindings: list[bytes | None] = []

    def make_body(channel_binding: bytes | None) -> bytes:
        bindings.append(channel_binding)
        return b"Q1NS"

    exchange = Exchange(
        "POST",
        f"{EST_PATH}/simpleenroll",
        "est.example:8443",
        content_type="application/pkcs10",
        make_body=make_body,
        credentials=BasicCredentials("alice", "s3cret", send=preemptive),
    )
    return exchange, bindings


AUTHORIZATION = b"Authorization: Basic YWxpY2U6czNjcmV0\r\n"  # alice:s3cret


def test_basic_credentials_are_sent_only_after_a_basic_challenge() -> None:
    """The first request carries no credentials; after a 401 Basic challenge
    the request is rebuilt for a new connection with them."""
    exchange, bindings = _exchange()
    first = exchange.request(b"binding-1")
    assert b"Authorization" not in first
    assert exchange.receive(CHALLENGE) is None
    second = exchange.request(b"binding-2")
    assert AUTHORIZATION in second
    assert bindings == [b"binding-1", b"binding-2"]
    response = exchange.receive(CREATED)
    assert response is not None and response.status == 201


def test_request_bytes_are_exact() -> None:
    """A request is HTTP/1.1 with Host, Content-Type, Content-Length, close."""
    exchange, _ = _exchange()
    assert exchange.request(None) == (
        b"POST /.well-known/est/simpleenroll HTTP/1.1\r\n"
        b"Host: est.example:8443\r\n"
        b"Content-Type: application/pkcs10\r\n"
        b"Content-Length: 4\r\n"
        b"Connection: close\r\n\r\n"
        b"Q1NS"
    )
    assert encode_request("GET", "/x", "h") == (
        b"GET /x HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
    )


def test_preemptive_credentials_go_with_the_first_request() -> None:
    """With preemptive auth the credentials are in the first request."""
    exchange, _ = _exchange(preemptive=True)
    assert AUTHORIZATION in exchange.request(None)


def test_a_second_401_is_final() -> None:
    """Credentials that were sent and refused are not retried forever."""
    exchange, _ = _exchange()
    exchange.request(None)
    assert exchange.receive(CHALLENGE) is None
    exchange.request(None)
    response = exchange.receive(CHALLENGE)
    assert response is not None and response.status == 401


def test_401_without_a_basic_challenge_is_final() -> None:
    """A 401 offering only Digest, or no challenge at all, is not retried."""
    for header in (b'WWW-Authenticate: Digest realm="a, Basic b"\r\n', b""):
        exchange, _ = _exchange()
        exchange.request(None)
        raw = b"HTTP/1.1 401 Unauthorized\r\n" + header + b"Content-Length: 0\r\n\r\n"
        response = exchange.receive(raw)
        assert response is not None and response.status == 401


def test_basic_is_found_among_several_challenges() -> None:
    """Basic offered after a Digest challenge with parameters is recognised."""
    response = parse_response(
        b"HTTP/1.1 401 Unauthorized\r\n"
        b'WWW-Authenticate: Digest realm="x", qop="auth", basic realm="y"\r\n'
        b"Content-Length: 0\r\n\r\n"
    )
    assert offers_basic(response)


def test_response_length_is_known_from_the_header() -> None:
    """A response is complete at its Content-Length; without one, at the close."""
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n"
    assert expected_length(head[:20]) is None
    assert expected_length(head) == len(head) + 4
    assert expected_length(b"HTTP/1.1 204 No Content\r\n\r\n") == 27
    assert expected_length(b"HTTP/1.1 200 OK\r\nX: y\r\n\r\nabc") is None
    continued = b"HTTP/1.1 100 Continue\r\n\r\n" + head
    assert expected_length(continued) == len(continued) + 4
    assert parse_response(continued + b"MA==").body == b"MA=="


def test_chunked_and_close_delimited_bodies_are_read() -> None:
    """A chunked body is reassembled; a body without a length runs to the close."""
    chunked = parse_response(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nMA\r\n2;x=y\r\n==\r\n0\r\n\r\n"
    )
    assert chunked.body == b"MA=="
    assert parse_response(b"HTTP/1.1 200 OK\r\n\r\nMA==\r\n").body == b"MA==\r\n"
    with pytest.raises(EstProtocolError, match="truncated"):
        parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nMA==")


def _response(status: int, body: bytes = b"", **headers: str) -> HttpResponse:
    return HttpResponse(status, "", list(headers.items()), body)


def test_statuses_map_to_results_and_errors() -> None:
    """200/201 succeed, 202 asks to retry, anything else names status and text."""
    assert expect_success(_response(201)).status == 201
    with pytest.raises(EstRetryLater) as later:
        expect_success(_response(202, **{"Retry-After": "30"}))
    assert later.value.retry_after == 30
    with pytest.raises(EstClientError) as refused:
        expect_success(_response(403, b"CSR subject does not match\nmore\n"))
    assert (refused.value.status, refused.value.message) == (
        403,
        "CSR subject does not match",
    )


# --- serverkeygen's multipart body ----------------------------------------------------


def _serverkeygen_body(
    key: ec.EllipticCurvePrivateKey, certificate: x509.Certificate
) -> bytes:
    """The multipart/mixed layout of RFC 7030 §4.4.2, boundary "est"."""
    pkcs8 = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    certs_only = pkcs7.serialize_certificates([certificate], serialization.Encoding.DER)
    return (
        b"--est\r\n"
        b"Content-Type: application/pkcs8\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n"
        + encode_base64(pkcs8, 64)
        + b"--est\r\n"
        b"Content-Type: application/pkcs7-mime; smime-type=certs-only\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n"
        + encode_base64(certs_only, 64)
        + b"--est--\r\n"
    )


def test_serverkeygen_body_gives_key_and_certificate() -> None:
    """The PKCS#8 part and the certs-only part come back as key and certificate."""
    now = datetime.datetime.now(datetime.UTC)
    pair = make_pair(device_name("skg"), None, ca=False, now=now)
    key, certificate = parse_serverkeygen(
        "multipart/mixed; boundary=est", _serverkeygen_body(pair.key, pair.certificate)
    )
    assert certificate == pair.certificate
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.private_numbers() == pair.key.private_numbers()


def test_serverkeygen_key_must_match_the_certificate() -> None:
    """A key that is not the certificate's is refused."""
    now = datetime.datetime.now(datetime.UTC)
    pair = make_pair(device_name("skg"), None, ca=False, now=now)
    other = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(EstProtocolError, match="does not match"):
        parse_serverkeygen(
            "multipart/mixed; boundary=est", _serverkeygen_body(other, pair.certificate)
        )


# --- CSRs and csrattrs ----------------------------------------------------------------


def test_csr_is_fioconfig_shaped_with_the_channel_binding() -> None:
    """KU and EKU are critical; the binding is the base64 challengePassword."""
    subject = device_name("csr-test")
    der = build_csr(make_key(), subject, channel_binding=b"\x01" * 32)
    csr = x509.load_der_x509_csr(der)
    assert csr.is_signature_valid and csr.subject == subject
    usage = csr.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature
    extended = csr.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert extended.critical
    assert list(extended.value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    password = csr.attributes.get_attribute_for_oid(AttributeOID.CHALLENGE_PASSWORD)
    assert base64.b64decode(password.value) == b"\x01" * 32


def test_csrattrs_are_described_line_by_line() -> None:
    """An OID and an attribute with values each get a readable line."""
    challenge = bytes.fromhex("06092a864886f70d010907")  # challengePassword
    secp384 = bytes.fromhex("06052b81040022")
    ec_key = bytes.fromhex("06072a8648ce3d0201")
    attribute = b"\x30\x12" + ec_key + b"\x31\x07" + secp384
    der = b"\x30" + bytes([len(challenge) + len(attribute)]) + challenge + attribute
    assert describe_csrattrs(der) == [
        "oid challengePassword (1.2.840.113549.1.9.7)",
        "attribute ecPublicKey (1.2.840.10045.2.1): secp384r1 (1.3.132.0.34)",
    ]


# --- Against the real server ----------------------------------------------------------


@dataclass(frozen=True)
class Deployment:
    """A running server on the demo PKI, and where to put estctl's output."""

    server: EstServer
    pki: Path
    out: Path

    @property
    def base_url(self) -> str:
        """The EST base URL by host name, as operators and devices use it."""
        return f"https://localhost:{self.server.port}{EST_PATH}"

    def estctl(self, *args: str | Path) -> tuple[int, str, str]:
        """Run ``estctl``; return its exit status, stdout and stderr."""
        done = run([sys.executable, "-m", "estd.estctl", *map(str, args)])
        return done.returncode, done.stdout.decode(), done.stderr.decode()


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """``estctl demo`` and ``twistd -n est --config est.ini`` on a free port."""
    scratch = tmp_path_factory.mktemp("client")
    port = free_port()
    done = run(
        [sys.executable, "-m", "estd.estctl", "demo", str(scratch / "pki"),
         "--port", str(port)]
    )  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()
    server = EstServer(
        scratch / "server", port, ["--config", str(scratch / "pki/est.ini")]
    )
    try:
        server.start()
        server.wait_until_listening()
        (scratch / "out").mkdir()
        yield Deployment(server, scratch / "pki", scratch / "out")
    finally:
        server.stop()


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _der(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.DER)


def _public(key_or_cert: object) -> bytes:
    public = key_or_cert.public_key()  # type: ignore[attr-defined]
    return public.public_bytes(  # type: ignore[no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _renew(
    deployment: Deployment, cert: Path, key: Path, name: str, *more: str
) -> Path:
    prefix = deployment.out / name
    status, stdout, stderr = deployment.estctl(
        "reenroll", deployment.base_url, "--cacert", deployment.pki / "factory_ca.pem",
        "--cert", cert, "--key", key, "--out", prefix, *more,
    )  # fmt: skip
    assert status == 0, stderr
    assert stdout.startswith(f"wrote {prefix}.key and {prefix}.pem: ")
    assert "PRIVATE KEY" not in stdout + stderr
    return prefix


@pytest.fixture(scope="module")
def renewed(deployment: Deployment) -> Path:
    """The demo device renewed once with ``estctl reenroll``; the output prefix."""
    pki = deployment.pki
    return _renew(deployment, pki / "device.pem", pki / "device.key", "renewed")


def test_cacerts_writes_root_and_est_ca(deployment: Deployment) -> None:
    """``estctl cacerts --out`` writes the factory root and the EST CA as PEM."""
    out = deployment.out / "cacerts.pem"
    status, _, stderr = deployment.estctl(
        "cacerts", deployment.base_url, "--cacert", deployment.pki / "factory_ca.pem",
        "--out", out,
    )  # fmt: skip
    assert status == 0, stderr
    written = {_der(c) for c in x509.load_pem_x509_certificates(out.read_bytes())}
    expected = {
        _der(_load(deployment.pki / n)) for n in ("factory_ca.pem", "est-ca.pem")
    }
    assert written == expected


def test_reenroll_renews_the_demo_device(deployment: Deployment, renewed: Path) -> None:
    """The renewed certificate has the old subject bytes and the new 0600 key."""
    old = _load(deployment.pki / "device.pem")
    new = _load(renewed.with_suffix(".pem"))
    assert certificate_subject_der(_der(new)) == certificate_subject_der(_der(old))
    assert new.serial_number != old.serial_number
    key_path = renewed.with_suffix(".key")
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.curve.name == "secp256r1"
    assert _public(key) == _public(new)
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600


def test_renewed_certificate_renews_again(
    deployment: Deployment, renewed: Path
) -> None:
    """The certificate estctl just got renews in its turn (with --pop this time)."""
    again = _renew(
        deployment,
        renewed.with_suffix(".pem"),
        renewed.with_suffix(".key"),
        "again",
        "--pop",
    )
    first, second = _load(renewed.with_suffix(".pem")), _load(again.with_suffix(".pem"))
    assert certificate_subject_der(_der(second)) == certificate_subject_der(_der(first))
    assert second.serial_number != first.serial_number


def test_enroll_with_the_device_certificate_and_its_subject(
    deployment: Deployment,
) -> None:
    """``estctl enroll`` with mTLS and the device's own subject gets a certificate."""
    pki = deployment.pki
    device = _load(pki / "device.pem")
    prefix = deployment.out / "enrolled"
    status, _, stderr = deployment.estctl(
        "enroll", deployment.base_url, "--cacert", pki / "factory_ca.pem",
        "--cert", pki / "device.pem", "--key", pki / "device.key",
        "--subject", device.subject.rfc4514_string(), "--out", prefix,
    )  # fmt: skip
    assert status == 0, stderr
    issued = _load(prefix.with_suffix(".pem"))
    assert issued.subject == device.subject
    key = serialization.load_pem_private_key(
        prefix.with_suffix(".key").read_bytes(), None
    )
    assert _public(key) == _public(issued)


def test_enroll_with_another_subject_is_refused_in_one_line(
    deployment: Deployment,
) -> None:
    """A subject the server will not issue gives exit 1 and one line naming 403."""
    pki = deployment.pki
    prefix = deployment.out / "refused"
    status, stdout, stderr = deployment.estctl(
        "enroll", deployment.base_url, "--cacert", pki / "factory_ca.pem",
        "--cert", pki / "device.pem", "--key", pki / "device.key",
        "--subject", "CN=someone-else,OU=demo-factory", "--out", prefix,
    )  # fmt: skip
    assert status == 1
    assert stdout == ""
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("estctl: "), stderr
    assert "403" in lines[0]
    assert not prefix.with_suffix(".key").exists()


def test_wrong_cacert_is_a_clear_verification_error(deployment: Deployment) -> None:
    """A --cacert that did not issue the server certificate says so in one line."""
    status, _, stderr = deployment.estctl(
        "cacerts", deployment.base_url, "--cacert", deployment.pki / "client-cas.pem"
    )
    assert status == 1
    assert stderr.splitlines() == [
        "estctl: TLS: the server certificate CN=localhost does not verify against "
        f"{deployment.pki / 'client-cas.pem'}: its issuer is not in the --cacert file"
    ]


def test_csrattrs_without_attributes_prints_none(deployment: Deployment) -> None:
    """With no CSR attributes configured ``estctl csrattrs`` prints 'none'."""
    status, stdout, stderr = deployment.estctl(
        "csrattrs", deployment.base_url, "--cacert", deployment.pki / "factory_ca.pem"
    )
    assert (status, stdout) == (0, "none\n"), stderr


@pytest.mark.parametrize(("tls_max", "version", "size"), [
    ("1.2", "TLSv1.2", 12),  # tls-unique: a TLS 1.2 Finished (RFC 5929)
    (None, "TLSv1.3", 32),  # tls-exporter (RFC 9266)
])  # fmt: skip
def test_channel_binding_reaches_make_csr(
    deployment: Deployment, tls_max: str | None, version: str, size: int
) -> None:
    """make_csr gets the live connection's channel binding, and the renewal works."""
    pki = deployment.pki
    device = _load(pki / "device.pem")
    client = EstClient(
        f"https://localhost:{deployment.server.port}",  # the path is added
        cacert=str(pki / "factory_ca.pem"),
        cert=str(pki / "device.pem"),
        key=str(pki / "device.key"),
        tls_max=tls_max,
    )
    key = make_key()
    bindings: list[bytes | None] = []

    def make_csr(channel_binding: bytes | None) -> bytes:
        bindings.append(channel_binding)
        return build_csr(key, device.subject, channel_binding=channel_binding)

    issued = client.simplereenroll(make_csr)
    assert client.last_tls_version == version
    assert len(bindings) == 1
    assert bindings[0] is not None and len(bindings[0]) == size
    assert client.last_response is not None and client.last_response.status == 201
    assert issued.subject == device.subject
    assert _public(issued) == _public(key)


def test_csr_for_a_certificate_subject_copies_its_bytes(
    deployment: Deployment,
) -> None:
    """A CSR built from a certificate's subject Name carries the same DER bytes."""
    device = _load(deployment.pki / "device.pem")
    der = build_csr(make_key(), device.subject)
    assert csr_subject_der(der) == certificate_subject_der(_der(device))


def test_passwd_writes_a_hashed_entry(tmp_path: Path) -> None:
    """``estctl passwd`` stores a hash for the user, never the password itself."""
    pytest.importorskip("estd.auth")
    users, secret = tmp_path / "users", tmp_path / "secret"
    secret.write_text("correct horse\n")
    done = run(
        [sys.executable, "-m", "estd.estctl", "passwd", str(users), "alice",
         "--password-file", str(secret)]
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    text = users.read_text()
    assert text.startswith("alice:$2")
    assert "correct horse" not in text + done.stdout.decode() + done.stderr.decode()


def test_operation_urls_follow_rfc_7030(deployment: Deployment) -> None:
    """The well-known path is added when missing and a label goes before the op."""
    cacert = str(deployment.pki / "factory_ca.pem")
    bare = EstClient("https://est.example/", cacert=cacert)
    assert bare.url("cacerts") == "https://est.example/.well-known/est/cacerts"
    labelled = EstClient(
        "https://[::1]:8443/.well-known/est", cacert=cacert, label="fleet-a"
    )
    assert labelled.host_header == "[::1]:8443"
    assert labelled.url("simpleenroll") == (
        "https://[::1]:8443/.well-known/est/fleet-a/simpleenroll"
    )


def test_user_without_a_password_source_is_an_error(
    deployment: Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--user with no password file, variable or terminal fails before connecting."""
    monkeypatch.delenv("ESTCTL_PASSWORD", raising=False)
    status, _, stderr = deployment.estctl(
        "enroll", deployment.base_url, "--cacert", deployment.pki / "factory_ca.pem",
        "--user", "alice", "--subject", "CN=alice", "--out", deployment.out / "alice",
    )  # fmt: skip
    assert status == 1
    assert stderr.splitlines() == [
        "estctl: no password: give --password-file, set ESTCTL_PASSWORD "
        "or run on a terminal"
    ]
