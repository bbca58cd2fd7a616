"""End to end: the rest of RFC 7030 through the real ``twistd est``.

One server on loopback, with an est.ini whose ``[label NAME]`` sections
switch on one feature each (labels, csrattrs, serverkeygen, HTTP Basic,
proof-of-possession linking, re-enrollment grace), driven by curl with CSRs
from openssl (or cryptography where openssl has no flag for an attribute)
and by ``estctl``.  The server is stopped in teardown, even when a test
fails.
"""

from __future__ import annotations

import base64
import datetime
import itertools
import re
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import AttributeOID, ExtendedKeyUsageOID, NameOID

from estd.client import EstClient
from estd.demo import Pair, device_name, make_pair, write_demo
from estd.identity import ID_KP_CMC_RA
from tests.e2e_support import (
    EstServer,
    HttpResponse,
    certificate_subject_der,
    crlf_base64,
    curl,
    curl_response,
    fioconfig_csr,
    free_port,
    poll,
    run,
    subject_csr,
)

PKCS7_MIME = b"application/pkcs7-mime"
CERTS_ONLY = b"application/pkcs7-mime; smime-type=certs-only"
TEXT_PLAIN = b"text/plain; charset=utf-8"
RFC7030_CSRATTRS_ITEMS = (
    "challengePassword, ecPublicKey:secp384r1, extensionRequest:macAddress, "
    "ecdsa-with-SHA384"
)
RFC7030_CSRATTRS_BASE64 = (
    b"MEEGCSqGSIb3DQEJBzASBgcqhkjOPQIBMQcGBSuBBAAiMBYGCSqGSIb3DQEJDjEJ"
    b"BgcrBgEBAQEWBggqhkjOPQQDAw=="
)
"""The CsrAttrs example of RFC 7030 §4.5.2, verbatim."""
MAC_ADDRESS = x509.ObjectIdentifier("1.3.6.1.1.1.1.22")
REALM = "estd bootstrap"
ALICE_PASSWORD = "correct horse battery staple"
BOB_PASSWORD = "Tr0ub4dor-and-3"
REQUEST_LINE = re.compile(r'\[estd#info\] 127\.0\.0\.1 "(\S+) (\S+)" (\d{3}) ')

EST_INI = """\
[est]
listen = tcp:{port}:interface=127.0.0.1
tls-cert = local-tls.pem
tls-key = local-tls.key
root-cert = factory_ca.pem
ca-cert = est-ca.pem
ca-key = est-ca.key
client-cas = client-cas.pem

[label rfc]
response-profile = rfc7030

[label other]
client-cas = other-ca.pem
response-profile = rfc7030

[label attrs]
csrattrs = {csrattrs}
csrattrs-enforce = yes

[label attrs-oneline]
csrattrs = {csrattrs}
base64-line-length = 0

[label keygen]
serverkeygen = yes

[label keygen-p384]
serverkeygen = yes
serverkeygen-key-type = ec-p384

[label boot]
auth = basic
users-file = users.htpasswd
realm = {realm}

[label either]
auth = cert-or-basic
users-file = users.htpasswd

[label both]
auth = cert-and-basic
users-file = users.htpasswd

[label pop]
require-pop = yes
enroll-subject = match
response-profile = rfc7030

[label grace]
reenroll-grace = 30d
"""


# --- The deployment -------------------------------------------------------------------


@dataclass(frozen=True)
class Deployment:
    """The running server, its PKI directory and the tests' scratch directory."""

    server: EstServer
    pki: Path
    scratch: Path

    @property
    def base_url(self) -> str:
        """The EST base URL by host name, as estctl is given it."""
        return f"https://localhost:{self.server.port}/.well-known/est"

    @property
    def cacert(self) -> str:
        """The factory root, which issued the server's TLS certificate."""
        return str(self.pki / "factory_ca.pem")

    def identity(self, name: str) -> tuple[str, ...]:
        """curl options presenting PKI file ``name``.pem/.key as client certificate."""
        cert, key = self.pki / f"{name}.pem", self.pki / f"{name}.key"
        return ("--cert", str(cert), "--key", str(key))

    def certificate(self, name: str) -> x509.Certificate:
        """The certificate in PKI file ``name``.pem."""
        return x509.load_pem_x509_certificate((self.pki / f"{name}.pem").read_bytes())

    def post(self, operation: str, der: bytes, *args: str) -> HttpResponse:
        """POST a DER CSR as one-line base64 to ``operation`` (``label/op``, ``op``)."""
        body = self.scratch / f"body-{next(_BODY_NUMBERS)}.b64"
        body.write_bytes(base64.b64encode(der))
        self.server.posted_bodies.append(body.read_bytes())
        return curl_response(
            self.server, "--cacert", self.cacert,
            "-H", "Content-Type: application/pkcs10", "--data-binary", f"@{body}",
            *args, self.server.url(operation),
        )  # fmt: skip

    def get(self, operation: str, *args: str) -> HttpResponse:
        """GET ``operation`` with curl."""
        return curl_response(
            self.server, "--cacert", self.cacert, *args, self.server.url(operation)
        )

    def estctl(self, *args: str | Path) -> subprocess.CompletedProcess[bytes]:
        """Run ``estctl`` (this checkout's) and capture its output."""
        return run([sys.executable, "-m", "estd.estctl", *map(str, args)])


_BODY_NUMBERS = itertools.count()


def _client_pair(
    issuer: Pair,
    now: datetime.datetime,
    subject: x509.Name | None = None,
    *,
    expired_days_ago: int | None = None,
    usages: tuple[x509.ObjectIdentifier, ...] = (ExtendedKeyUsageOID.CLIENT_AUTH,),
) -> Pair:
    """A P-256 client certificate under ``issuer``, optionally expired some days ago."""
    not_before = None
    if expired_days_ago is not None:
        not_before = now - datetime.timedelta(days=365 + expired_days_ago)
    return make_pair(
        subject or device_name(str(uuid.uuid4())),
        issuer,
        ca=False,
        now=now,
        days=365,
        extended_usage=list(usages),
        not_before=not_before,
    )


def _write_pair(directory: Path, name: str, pair: Pair) -> None:
    (directory / f"{name}.pem").write_bytes(pair.cert_pem())
    key = directory / f"{name}.key"
    key.write_bytes(pair.key_pem())
    key.chmod(0o600)


def _make_pki(directory: Path, port: int) -> None:
    """The demo PKI plus another device CA, an RA and expired devices."""
    now = datetime.datetime.now(datetime.UTC)
    demo = write_demo(str(directory), now, devices=1, port=port)
    other_ca = make_pair(
        x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, "other-device-ca"),
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "other-factory"),
            ]
        ),
        None,
        ca=True,
        now=now,
    )
    (directory / "other-ca.pem").write_bytes(other_ca.cert_pem())
    other_device = _client_pair(
        other_ca, now, device_name(str(uuid.uuid4()), "other-factory")
    )
    _write_pair(directory, "other-device", other_device)
    ra_name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, "est-ra-1"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "demo-factory"),
        ]
    )
    ra_usages = (ExtendedKeyUsageOID.CLIENT_AUTH, ID_KP_CMC_RA)
    _write_pair(
        directory, "ra", _client_pair(demo.device_ca, now, ra_name, usages=ra_usages)
    )
    for days in (1, 31):
        _write_pair(
            directory,
            f"expired-{days}d",
            _client_pair(demo.device_ca, now, expired_days_ago=days),
        )
    ini = EST_INI.format(port=port, csrattrs=RFC7030_CSRATTRS_ITEMS, realm=REALM)
    (directory / "est.ini").write_text(ini)


def _make_users(directory: Path) -> None:
    """alice by ``estctl passwd``, bob appended by Apache's ``htpasswd -B``."""
    users, secret = directory / "users.htpasswd", directory / "alice.pass"
    secret.write_text(ALICE_PASSWORD + "\n")
    done = run(
        [sys.executable, "-m", "estd.estctl", "passwd", str(users), "alice",
         "--password-file", str(secret)]
    )  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()
    done = run(["htpasswd", "-B", "-b", str(users), "bob", BOB_PASSWORD])
    assert done.returncode == 0, done.stderr.decode()
    entries = [line.split(":", 1) for line in users.read_text().splitlines()]
    assert [(user, hashed[:4]) for user, hashed in entries] == [
        ("alice", "$2y$"),
        ("bob", "$2y$"),
    ]


@pytest.fixture(scope="module")
def est(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """One ``twistd -n est --config est.ini`` with a label per feature."""
    scratch = tmp_path_factory.mktemp("e2e-rfc7030")
    pki = scratch / "pki"
    port = free_port()
    _make_pki(pki, port)
    _make_users(pki)
    server = EstServer(scratch / "server", port, ["--config", str(pki / "est.ini")])
    try:
        server.start()
        server.wait_until_listening()
        (scratch / "work").mkdir()
        yield Deployment(server, pki, scratch / "work")
    finally:
        server.stop()


# --- Helpers --------------------------------------------------------------------------


def _der(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.DER)


def _public(key_or_certificate: object) -> bytes:
    public = key_or_certificate.public_key()  # type: ignore[attr-defined]
    return public.public_bytes(  # type: ignore[no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _issued(response: HttpResponse) -> x509.Certificate:
    """The one certificate of an enrollment response, whose body must be exact."""
    der = base64.b64decode(response.body)
    assert response.body == crlf_base64(der)
    assert response.header("Content-Length") == str(len(response.body)).encode()
    assert response.header("Content-Transfer-Encoding") == b"base64"
    certificates = pkcs7.load_der_pkcs7_certificates(der)
    assert len(certificates) == 1
    return certificates[0]


def _assert_error(response: HttpResponse, status_line: bytes, body: bytes) -> None:
    """An error answer: the status line and exactly one text/plain sentence."""
    assert response.status_line == status_line, response
    assert response.header("Content-Type") == TEXT_PLAIN
    assert response.header("Content-Length") == str(len(body)).encode()
    assert response.body == body


def _device_csr(est: Deployment, name: str, cert: str = "device") -> bytes:
    """A fioconfig-style CSR (openssl, fresh P-256 key) for PKI cert ``cert``."""
    return fioconfig_csr(est.pki / f"{cert}.pem", est.scratch / name, name).der


def _subject_csr(est: Deployment, subject: str, name: str) -> bytes:
    """A P-256 CSR made by openssl for an arbitrary ``-subj`` subject."""
    return subject_csr(subject, est.scratch / name, name).der


def _csr(
    subject: x509.Name,
    *,
    curve: ec.EllipticCurve | None = None,
    challenge_password: bytes | None = None,
    algorithm: hashes.HashAlgorithm | None = None,
    mac_address: bool = False,
) -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    """A CSR made with cryptography, for what openssl has no flag for."""
    key = ec.generate_private_key(curve or ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
    if mac_address:
        # RFC 2307 macAddress as an IA5String, the extension csrattrs asks for.
        value = b"02:00:5e:10:00:01"
        builder = builder.add_extension(
            x509.UnrecognizedExtension(
                MAC_ADDRESS, b"\x16" + bytes([len(value)]) + value
            ),
            critical=False,
        )
    if challenge_password is not None:
        builder = builder.add_attribute(
            AttributeOID.CHALLENGE_PASSWORD, challenge_password
        )
    csr = builder.sign(key, algorithm or hashes.SHA256())
    return key, csr.public_bytes(serialization.Encoding.DER)


def _request_lines(est: Deployment, path: str) -> list[str]:
    return [
        line
        for line in est.server.log_text().splitlines()
        if (match := REQUEST_LINE.search(line)) and match.group(2) == path
    ]


def _serial(certificate: x509.Certificate) -> str:
    digits = f"{certificate.serial_number:X}"
    return digits.zfill(len(digits) + len(digits) % 2)


def _estctl_ok(done: subprocess.CompletedProcess[bytes], prefix: Path) -> None:
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().startswith(f"wrote {prefix}.key and {prefix}.pem: ")
    assert done.stderr == b""


def _written(prefix: Path) -> tuple[object, x509.Certificate]:
    """The key and certificate estctl wrote to PREFIX.key and PREFIX.pem."""
    key_path = prefix.with_name(prefix.name + ".key")
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    pem = prefix.with_name(prefix.name + ".pem").read_bytes()
    certificates = x509.load_pem_x509_certificates(pem)
    assert len(certificates) == 1
    assert _public(key) == _public(certificates[0])
    return key, certificates[0]


# --- CA labels ------------------------------------------------------------------------


def test_rfc_label_answers_200_with_the_certs_only_type(est: Deployment) -> None:
    """simplereenroll under [label rfc] gives 200 OK and the exact certs-only type."""
    response = est.post(
        "rfc/simplereenroll", _device_csr(est, "rfc"), *est.identity("device")
    )
    assert response.status_line == b"HTTP/1.1 200 OK"
    assert response.header("Content-Type") == CERTS_ONLY
    issued = _issued(response)
    device = est.certificate("device")
    assert certificate_subject_der(_der(issued)) == certificate_subject_der(
        _der(device)
    )


def test_unlabelled_path_keeps_the_fioconfig_answer(est: Deployment) -> None:
    """The same request on the unlabelled path still gets 201 application/pkcs7-mime."""
    response = est.post(
        "simplereenroll", _device_csr(est, "plain"), *est.identity("device")
    )
    assert response.status_line == b"HTTP/1.1 201 Created"
    assert response.header("Content-Type") == PKCS7_MIME
    assert _issued(response).subject == est.certificate("device").subject


def test_label_serves_cacerts_anonymously(est: Deployment) -> None:
    """GET /rfc/cacerts without a client certificate is 200 with the same bundle."""
    labelled, plain = est.get("rfc/cacerts"), est.get("cacerts")
    assert labelled.status_line == b"HTTP/1.1 200 OK"
    assert labelled.header("Content-Type") == PKCS7_MIME
    assert labelled.body == plain.body


@pytest.mark.parametrize(
    ("operation", "body"),
    [
        ("nope/simplereenroll", b"unknown EST operation or CA label 'nope'\n"),
        ("a/b/simplereenroll", b"unknown EST operation or CA label 'a'\n"),
        ("rfc/b/simplereenroll", b"unknown EST operation 'b'\n"),
        ("cacerts/cacerts", b"no such EST resource\n"),
        ("simplereenroll/simplereenroll", b"no such EST resource\n"),
        ("rfc", b"no EST operation in the path\n"),
    ],
)
def test_wrong_labels_and_extra_segments_are_404(
    est: Deployment, operation: str, body: bytes
) -> None:
    """Unknown labels, two-segment labels and an op used as a label answer 404."""
    response = est.post(
        operation, _device_csr(est, "404-" + operation.replace("/", "-")),
        *est.identity("device"),
    )  # fmt: skip
    _assert_error(response, b"HTTP/1.1 404 Not Found", body)


def test_label_with_another_client_ca_refuses_the_demo_device(
    est: Deployment,
) -> None:
    """[label other] trusts only other-ca.pem: the demo device gets 403 there."""
    response = est.post(
        "other/simplereenroll", _device_csr(est, "other-demo"), *est.identity("device")
    )
    _assert_error(
        response,
        b"HTTP/1.1 403 Forbidden",
        b"the client certificate is not issued by a CA this label trusts\n",
    )


def test_label_with_another_client_ca_accepts_its_own_device(est: Deployment) -> None:
    """A device of the other CA renews under [label other] (200 OK) and nowhere else."""
    csr = _device_csr(est, "other-own", cert="other-device")
    accepted = est.post("other/simplereenroll", csr, *est.identity("other-device"))
    assert accepted.status_line == b"HTTP/1.1 200 OK"
    assert _issued(accepted).subject == est.certificate("other-device").subject
    # The handshake trusts the union of all labels' anchors; the unlabelled
    # path then refuses a client that does not chain to its own.
    refused = est.post("simplereenroll", csr, *est.identity("other-device"))
    _assert_error(
        refused,
        b"HTTP/1.1 403 Forbidden",
        b"the client certificate is not issued by a CA this label trusts\n",
    )


def test_estctl_reenroll_with_a_label(est: Deployment) -> None:
    """``estctl reenroll --label other`` renews the other CA's device."""
    prefix = est.scratch / "estctl-other"
    done = est.estctl(
        "reenroll", est.base_url, "--label", "other", "--cacert", est.cacert,
        "--cert", est.pki / "other-device.pem", "--key", est.pki / "other-device.key",
        "--out", prefix,
    )  # fmt: skip
    _estctl_ok(done, prefix)
    _, issued = _written(prefix)
    assert issued.subject == est.certificate("other-device").subject


def test_estctl_with_an_unknown_label_fails_with_404(est: Deployment) -> None:
    """``estctl reenroll --label nope`` exits 1 with one line naming the 404."""
    prefix = est.scratch / "estctl-nope"
    done = est.estctl(
        "reenroll", est.base_url, "--label", "nope", "--cacert", est.cacert,
        "--cert", est.pki / "device.pem", "--key", est.pki / "device.key",
        "--out", prefix,
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.decode().splitlines() == [
        "estctl: the server refused reenroll: 404 unknown EST operation or CA "
        "label 'nope'"
    ]
    assert not prefix.with_name("estctl-nope.key").exists()


# --- /csrattrs ------------------------------------------------------------------------


def test_csrattrs_without_attributes_is_204_with_an_empty_body(
    est: Deployment,
) -> None:
    """Unlabelled /csrattrs: 204 No Content, Content-Length: 0, nothing after."""
    response = est.get("csrattrs")
    assert response.status_line == b"HTTP/1.1 204 No Content"
    assert response.header("Content-Length") == b"0"
    assert response.body == b""


def test_csrattrs_label_serves_the_rfc_7030_example(est: Deployment) -> None:
    """[label attrs] answers the RFC 7030 §4.5.2 example DER, base64 in 64 columns."""
    response = est.get("attrs/csrattrs")
    assert response.status_line == b"HTTP/1.1 200 OK"
    assert response.header("Content-Type") == b"application/csrattrs"
    assert response.header("Content-Transfer-Encoding") == b"base64"
    # 92 base64 characters: one 64-column line, then the rest.
    expected = (
        RFC7030_CSRATTRS_BASE64[:64] + b"\r\n" + RFC7030_CSRATTRS_BASE64[64:] + b"\r\n"
    )
    assert response.body == expected
    assert response.header("Content-Length") == str(len(expected)).encode()


def test_csrattrs_on_one_line_is_the_rfc_text_and_crlf(est: Deployment) -> None:
    """With base64-line-length = 0 the body is the RFC's base64 verbatim plus CRLF."""
    response = est.get("attrs-oneline/csrattrs")
    assert response.status_line == b"HTTP/1.1 200 OK"
    assert response.header("Content-Type") == b"application/csrattrs"
    assert response.body == RFC7030_CSRATTRS_BASE64 + b"\r\n"


def _estctl_csrattrs(est: Deployment) -> list[str]:
    done = est.estctl(
        "csrattrs", est.base_url, "--label", "attrs", "--cacert", est.cacert
    )
    assert done.returncode == 0, done.stderr.decode()
    assert done.stderr == b""
    return done.stdout.decode().splitlines()


def test_estctl_csrattrs_reads_the_rfc_example(est: Deployment) -> None:
    """``estctl csrattrs --label attrs`` prints the four items of the example."""
    lines = _estctl_csrattrs(est)
    assert len(lines) == 4, lines
    assert lines[0] == "oid challengePassword (1.2.840.113549.1.9.7)"
    assert lines[1] == (
        "attribute ecPublicKey (1.2.840.10045.2.1): secp384r1 (1.3.132.0.34)"
    )
    assert lines[2].startswith("attribute ")
    assert "1.2.840.113549.1.9.14" in lines[2]  # extensionRequest: see below
    assert lines[2].endswith(": macAddress (1.3.6.1.1.1.1.22)")
    assert lines[3] == "oid ecdsa-with-SHA384 (1.2.840.10045.4.3.3)"


def test_estctl_csrattrs_names_extension_request(est: Deployment) -> None:
    """estctl names extensionRequest like the other OIDs of the RFC example."""
    assert _estctl_csrattrs(est)[2] == (
        "attribute extensionRequest (1.2.840.113549.1.9.14): "
        "macAddress (1.3.6.1.1.1.1.22)"
    )


def test_csrattrs_enforcement_refuses_a_p256_csr(est: Deployment) -> None:
    """A fioconfig P-256 CSR under enforcement gets 400 naming all it lacks."""
    response = est.post(
        "attrs/simpleenroll", _device_csr(est, "attrs-p256"), *est.identity("device")
    )
    _assert_error(
        response,
        b"HTTP/1.1 400 Bad Request",
        b"the CSR lacks what /csrattrs asks for: the challengePassword attribute; "
        b"a key on curve secp384r1; the extension macAddress; "
        b"signature ecdsa-with-SHA384\n",
    )


def test_csrattrs_enforcement_names_only_what_is_missing(est: Deployment) -> None:
    """A P-384 CSR with macAddress, SHA-256 and no challengePassword: 400 for those."""
    subject = est.certificate("device").subject
    _, csr = _csr(subject, curve=ec.SECP384R1(), mac_address=True)
    response = est.post("attrs/simpleenroll", csr, *est.identity("device"))
    _assert_error(
        response,
        b"HTTP/1.1 400 Bad Request",
        b"the CSR lacks what /csrattrs asks for: the challengePassword attribute; "
        b"signature ecdsa-with-SHA384\n",
    )


def test_csrattrs_enforcement_accepts_a_conforming_csr(est: Deployment) -> None:
    """P-384, ECDSA-SHA-384, macAddress and the challengePassword binding: issued."""
    device = est.certificate("device")
    client = EstClient(
        est.base_url, cacert=est.cacert, label="attrs",
        cert=str(est.pki / "device.pem"), key=str(est.pki / "device.key"),
    )  # fmt: skip
    keys = []

    def make_csr(channel_binding: bytes | None) -> bytes:
        assert channel_binding is not None
        key, der = _csr(
            device.subject,
            curve=ec.SECP384R1(),
            algorithm=hashes.SHA384(),
            mac_address=True,
            challenge_password=base64.b64encode(channel_binding),
        )
        keys.append(key)
        return der

    issued = client.simpleenroll(make_csr)
    assert client.last_response is not None
    assert client.last_response.status == 201
    assert issued.subject == device.subject
    assert _public(issued) == _public(keys[-1])


# --- /serverkeygen --------------------------------------------------------------------


@pytest.mark.parametrize("operation", ["serverkeygen", "rfc/serverkeygen"])
def test_serverkeygen_is_404_where_not_enabled(est: Deployment, operation: str) -> None:
    """Without serverkeygen = yes the path answers 404 saying how to turn it on."""
    response = est.post(
        operation, _device_csr(est, "nokeygen-" + operation.replace("/", "-")),
        *est.identity("device"),
    )  # fmt: skip
    _assert_error(
        response,
        b"HTTP/1.1 404 Not Found",
        b"serverkeygen is not enabled here (serverkeygen = yes turns it on)\n",
    )


@dataclass(frozen=True)
class KeygenResult:
    """One /serverkeygen answer taken apart."""

    csr_der: bytes
    response: HttpResponse
    boundary: bytes
    key_der: bytes
    key_base64: bytes
    certificate: x509.Certificate


MULTIPART = re.compile(
    rb"--(?P<b>estd-[0-9a-f]{24})\r\n"
    rb"Content-Type: application/pkcs8\r\n"
    rb"Content-Transfer-Encoding: base64\r\n"
    rb"\r\n"
    rb"(?P<key>[A-Za-z0-9+/=\r\n]+?)"
    rb"--(?P=b)\r\n"
    rb"Content-Type: application/pkcs7-mime; smime-type=certs-only\r\n"
    rb"Content-Transfer-Encoding: base64\r\n"
    rb"\r\n"
    rb"(?P<p7>[A-Za-z0-9+/=\r\n]+?)"
    rb"--(?P=b)--\r\n"
)
"""RFC 7030 §4.4.2 as estd sends it; only the boundary and base64 may vary."""


@pytest.fixture(scope="module")
def keygen(est: Deployment) -> KeygenResult:
    """The demo device's CSR posted to /keygen/serverkeygen with curl."""
    csr = _device_csr(est, "keygen")
    response = est.post("keygen/serverkeygen", csr, *est.identity("device"))
    assert response.status_line == b"HTTP/1.1 200 OK", response
    match = MULTIPART.fullmatch(response.body)
    assert match is not None, response.body
    key_der = base64.b64decode(match["key"])
    p7_der = base64.b64decode(match["p7"])
    assert match["key"] == crlf_base64(key_der)
    assert match["p7"] == crlf_base64(p7_der)
    certificates = pkcs7.load_der_pkcs7_certificates(p7_der)
    assert len(certificates) == 1
    return KeygenResult(
        csr, response, match["b"], key_der, match["key"], certificates[0]
    )


def test_serverkeygen_wire_bytes_are_exact(keygen: KeygenResult) -> None:
    """200 multipart/mixed with the boundary, a true length and no outer CTE."""
    response = keygen.response
    assert response.header("Content-Type") == (
        b"multipart/mixed; boundary=" + keygen.boundary
    )
    assert response.header("Content-Length") == str(len(response.body)).encode()
    assert response.header_values("Content-Transfer-Encoding") == []
    assert response.header_values("Transfer-Encoding") == []
    assert response.body.startswith(b"--" + keygen.boundary + b"\r\n")
    assert response.body.endswith(b"\r\n--" + keygen.boundary + b"--\r\n")


def test_serverkeygen_key_matches_the_certificate_not_the_csr(
    keygen: KeygenResult, est: Deployment
) -> None:
    """The PKCS#8 key is the certificate's, a fresh P-256 one, not the CSR's."""
    key = serialization.load_der_private_key(keygen.key_der, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.curve.name == "secp256r1"  # serverkeygen-key-type = csr
    csr = x509.load_der_x509_csr(keygen.csr_der)
    assert _public(key) == _public(keygen.certificate)
    assert _public(key) != _public(csr)
    assert certificate_subject_der(_der(keygen.certificate)) == (
        certificate_subject_der(_der(est.certificate("device")))
    )


def test_serverkeygen_applies_the_enrollment_policy(est: Deployment) -> None:
    """Another subject gets 403 and no client certificate 401, as for simpleenroll."""
    other = _subject_csr(est, "/CN=not-me/OU=demo-factory", "keygen-other")
    forbidden = est.post("keygen/serverkeygen", other, *est.identity("device"))
    _assert_error(
        forbidden,
        b"HTTP/1.1 403 Forbidden",
        b"CSR subject does not match the client certificate\n",
    )
    anonymous = est.post("keygen/serverkeygen", _device_csr(est, "keygen-anon"))
    _assert_error(
        anonymous,
        b"HTTP/1.1 401 Unauthorized",
        b"a client certificate is required\n",
    )


def test_serverkeygen_key_type_is_set_per_label(est: Deployment) -> None:
    """serverkeygen-key-type = ec-p384 answers a P-256 CSR with a P-384 key."""
    csr = _device_csr(est, "keygen-p384")
    response = est.post("keygen-p384/serverkeygen", csr, *est.identity("device"))
    assert response.status_line == b"HTTP/1.1 200 OK", response
    match = MULTIPART.fullmatch(response.body)
    assert match is not None, response.body
    key = serialization.load_der_private_key(base64.b64decode(match["key"]), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.curve.name == "secp384r1"
    certificates = pkcs7.load_der_pkcs7_certificates(base64.b64decode(match["p7"]))
    assert _public(certificates[0]) == _public(key)


@pytest.fixture(scope="module")
def estctl_keygen(est: Deployment) -> Path:
    """``estctl serverkeygen --label keygen`` for the demo device; the prefix."""
    prefix = est.scratch / "estctl-keygen"
    done = est.estctl(
        "serverkeygen", est.base_url, "--label", "keygen", "--cacert", est.cacert,
        "--cert", est.pki / "device.pem", "--key", est.pki / "device.key",
        "--out", prefix,
    )  # fmt: skip
    _estctl_ok(done, prefix)
    return prefix


def test_estctl_serverkeygen_writes_a_matching_pair(
    estctl_keygen: Path, est: Deployment
) -> None:
    """PREFIX.key (0600) and PREFIX.pem match and name the device."""
    key, issued = _written(estctl_keygen)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert issued.subject == est.certificate("device").subject


def test_generated_keys_never_reach_the_server_log(
    keygen: KeygenResult, estctl_keygen: Path, est: Deployment
) -> None:
    """Neither served key, nor any piece of it, is in the server log."""
    estctl_key = serialization.load_pem_private_key(
        estctl_keygen.with_name(estctl_keygen.name + ".key").read_bytes(), None
    )
    served = [serialization.load_der_private_key(keygen.key_der, None), estctl_key]
    poll(
        lambda: len(_request_lines(est, "/.well-known/est/keygen/serverkeygen")) >= 2,
        "the serverkeygen request lines",
    )
    log = est.server.log_text()
    assert "PRIVATE KEY" not in log
    for key in served:
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        pkcs8 = key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        text = base64.b64encode(pkcs8).decode()
        # The first 48 characters are the same for every P-256 key.
        for start in range(48, len(text) - 16, 16):
            assert text[start : start + 16] not in log
        secret = key.private_numbers().private_value
        assert f"{secret:x}" not in log.lower()
        assert str(secret) not in log


# --- /fullcmc -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "operation"),
    [("GET", "fullcmc"), ("POST", "fullcmc"), ("POST", "rfc/fullcmc")],
)
def test_fullcmc_is_501_with_one_line(
    est: Deployment, method: str, operation: str
) -> None:
    """/fullcmc answers 501 Not Implemented with one text/plain line."""
    response = curl_response(
        est.server, "--cacert", est.cacert, "-X", method, *est.identity("device"),
        est.server.url(operation),
    )  # fmt: skip
    _assert_error(
        response,
        b"HTTP/1.1 501 Not Implemented",
        "full CMC (RFC 7030 §4.3) is not supported by this server\n".encode(),
    )


# --- HTTP Basic -----------------------------------------------------------------------

CHALLENGE = f'Basic realm="{REALM}"'.encode()


def test_basic_label_without_credentials_is_401_with_a_challenge(
    est: Deployment,
) -> None:
    """No credentials and no certificate: 401 with WWW-Authenticate Basic realm."""
    response = est.post("boot/simpleenroll", _subject_csr(est, "/CN=alice", "b-none"))
    _assert_error(
        response,
        b"HTTP/1.1 401 Unauthorized",
        b"HTTP Basic credentials are required\n",
    )
    assert response.header("WWW-Authenticate") == CHALLENGE


@pytest.mark.parametrize("user", ["alice", "mallory"])
def test_basic_label_wrong_password_is_401(est: Deployment, user: str) -> None:
    """A wrong password, or an unknown user, is 401 with the challenge again."""
    csr = _subject_csr(est, f"/CN={user}", f"b-wrong-{user}")
    response = est.post("boot/simpleenroll", csr, "-u", f"{user}:not-the-password")
    _assert_error(
        response, b"HTTP/1.1 401 Unauthorized", b"wrong user name or password\n"
    )
    assert response.header("WWW-Authenticate") == CHALLENGE


@pytest.mark.parametrize(
    ("user", "password"),
    [("alice", ALICE_PASSWORD), ("bob", BOB_PASSWORD)],
    ids=["estctl-passwd", "htpasswd-B"],
)
def test_basic_label_right_password_enrolls_the_user(
    est: Deployment, user: str, password: str
) -> None:
    """Right password, no client certificate: a certificate for CN=<user>."""
    csr = _subject_csr(est, f"/CN={user}", f"b-right-{user}")
    response = est.post("boot/simpleenroll", csr, "-u", f"{user}:{password}")
    assert response.status_line == b"HTTP/1.1 201 Created", response
    issued = _issued(response)
    assert issued.subject.rfc4514_string() == f"CN={user}"
    serial = _serial(issued)
    lines = poll(
        lambda: [
            line
            for line in _request_lines(est, "/.well-known/est/boot/simpleenroll")
            if f"issued_serial={serial} " in line
        ],
        "the enrollment's log line",
    )
    assert f" user={user} " in lines[0]
    assert "client=" not in lines[0]


def test_estctl_enroll_with_a_user(est: Deployment) -> None:
    """``estctl enroll --user alice --password-file`` answers the challenge."""
    prefix = est.scratch / "estctl-alice"
    done = est.estctl(
        "enroll", est.base_url, "--label", "boot", "--cacert", est.cacert,
        "--user", "alice", "--password-file", est.pki / "alice.pass",
        "--subject", "CN=alice", "--out", prefix,
    )  # fmt: skip
    _estctl_ok(done, prefix)
    _, issued = _written(prefix)
    assert issued.subject.rfc4514_string() == "CN=alice"


def test_basic_label_refuses_a_common_name_other_than_the_user(
    est: Deployment,
) -> None:
    """alice with the right password cannot enroll CN=bob (403)."""
    csr = _subject_csr(est, "/CN=bob", "b-cn")
    response = est.post("boot/simpleenroll", csr, "-u", f"alice:{ALICE_PASSWORD}")
    _assert_error(
        response,
        b"HTTP/1.1 403 Forbidden",
        b"CSR common name does not match the user name\n",
    )


def _logged_duration_ms(est: Deployment, certificate: x509.Certificate) -> float:
    """The duration the server logged for the request that issued ``certificate``."""
    needle = f"issued_serial={_serial(certificate)} "
    line = poll(
        lambda: next(
            (x for x in est.server.log_text().splitlines() if needle in x), ""
        ),
        "the enrollment's log line",
    )
    match = re.search(r" (\d+(?:\.\d+)?)ms ", line)
    assert match is not None, line
    return float(match.group(1))


def test_repeated_wrong_passwords_are_slowed_down(est: Deployment) -> None:
    """Past the free failures the next answer waits a second; success resets it."""
    csr = _subject_csr(est, "/CN=bob", "b-throttle")
    # FailureThrottle(free_failures=3): four failures are answered at once
    # (tests/test_auth.py pins 0, 0, 0, 0, 1, 2, ...), the next answer waits.
    for _ in range(4):
        wrong = est.post("boot/simpleenroll", csr, "-u", "bob:guess")
        assert wrong.status_line == b"HTTP/1.1 401 Unauthorized", wrong
    started = time.monotonic()
    held = est.post("boot/simpleenroll", csr, "-u", f"bob:{BOB_PASSWORD}")
    elapsed = time.monotonic() - started
    assert held.status_line == b"HTTP/1.1 201 Created", held
    assert elapsed >= 0.95, elapsed
    assert _logged_duration_ms(est, _issued(held)) >= 1000
    # That success forgot the failures: the next answer is not held.
    again = est.post("boot/simpleenroll", csr, "-u", f"bob:{BOB_PASSWORD}")
    assert again.status_line == b"HTTP/1.1 201 Created", again
    assert _logged_duration_ms(est, _issued(again)) < 1000


def test_passwords_never_reach_the_server_log(est: Deployment) -> None:
    """Neither a right nor a wrong password, nor the Basic token, is logged."""
    csr = _subject_csr(est, "/CN=bob", "b-log")
    right = est.post("boot/simpleenroll", csr, "-u", f"bob:{BOB_PASSWORD}")
    serial = _serial(_issued(right))
    poll(
        lambda: f"issued_serial={serial} " in est.server.log_text(),
        "the enrollment's log line",
    )
    log = est.server.log_text()
    for secret in (ALICE_PASSWORD, BOB_PASSWORD, "not-the-password", "guess"):
        assert secret not in log
    token = base64.b64encode(f"bob:{BOB_PASSWORD}".encode()).decode()
    assert token not in log
    assert "Authorization" not in log


def test_cert_or_basic_takes_either(est: Deployment) -> None:
    """[label either]: the device certificate alone works, and so does bob alone."""
    by_cert = est.post(
        "either/simpleenroll", _device_csr(est, "either-cert"), *est.identity("device")
    )
    assert by_cert.status_line == b"HTTP/1.1 201 Created", by_cert
    assert _issued(by_cert).subject == est.certificate("device").subject
    by_user = est.post(
        "either/simpleenroll",
        _subject_csr(est, "/CN=bob", "either-bob"),
        "-u", f"bob:{BOB_PASSWORD}",
    )  # fmt: skip
    assert by_user.status_line == b"HTTP/1.1 201 Created", by_user


def test_cert_and_basic_needs_both(est: Deployment) -> None:
    """[label both]: the device certificate alone is 401; with alice's password 201."""
    csr = _device_csr(est, "both")
    alone = est.post("both/simpleenroll", csr, *est.identity("device"))
    _assert_error(
        alone,
        b"HTTP/1.1 401 Unauthorized",
        b"a client certificate and HTTP Basic credentials are required\n",
    )
    assert alone.header("WWW-Authenticate") == b'Basic realm="estd"'
    together = est.post(
        "both/simpleenroll", csr, *est.identity("device"),
        "-u", f"alice:{ALICE_PASSWORD}",
    )  # fmt: skip
    assert together.status_line == b"HTTP/1.1 201 Created", together
    assert _issued(together).subject == est.certificate("device").subject


# --- Proof of possession --------------------------------------------------------------


@pytest.mark.parametrize("tls_max", ["1.3", "1.2"])
@pytest.mark.parametrize("command", ["enroll", "reenroll"])
def test_estctl_pop_works_on_tls_1_3_and_1_2(
    est: Deployment, command: str, tls_max: str
) -> None:
    """``estctl enroll|reenroll --pop`` passes [label pop] with tls-exporter/unique."""
    prefix = est.scratch / f"pop-{command}-{tls_max}"
    done = est.estctl(
        command, est.base_url, "--label", "pop", "--pop", "--tls-max", tls_max,
        "--cacert", est.cacert,
        "--cert", est.pki / "device.pem", "--key", est.pki / "device.key",
        "--out", prefix,
    )  # fmt: skip
    _estctl_ok(done, prefix)
    _, issued = _written(prefix)
    assert issued.subject == est.certificate("device").subject


@pytest.mark.parametrize("operation", ["simpleenroll", "simplereenroll"])
def test_pop_label_refuses_a_csr_without_the_binding(
    est: Deployment, operation: str
) -> None:
    """A curl/openssl CSR without challengePassword on [label pop] is 401."""
    response = est.post(
        f"pop/{operation}", _device_csr(est, f"pop-none-{operation}"),
        *est.identity("device"),
    )  # fmt: skip
    _assert_error(
        response, b"HTTP/1.1 401 Unauthorized", b"Proof of possession mismatch\n"
    )


@pytest.mark.parametrize(
    "operation", ["simplereenroll", "rfc/simplereenroll", "pop/simplereenroll"]
)
def test_wrong_challenge_password_is_refused_everywhere(
    est: Deployment, operation: str
) -> None:
    """A challengePassword that is not this connection's binding is 401, pop or not."""
    subject = est.certificate("device").subject
    _, csr = _csr(subject, challenge_password=base64.b64encode(b"not the binding"))
    response = est.post(operation, csr, *est.identity("device"))
    _assert_error(
        response, b"HTTP/1.1 401 Unauthorized", b"Proof of possession mismatch\n"
    )


def test_a_present_binding_is_accepted_without_require_pop(est: Deployment) -> None:
    """Unlabelled (no require-pop) the right binding of ``estctl --pop`` passes."""
    prefix = est.scratch / "pop-unlabelled"
    done = est.estctl(
        "reenroll", est.base_url, "--pop", "--cacert", est.cacert,
        "--cert", est.pki / "device.pem", "--key", est.pki / "device.key",
        "--out", prefix,
    )  # fmt: skip
    _estctl_ok(done, prefix)


def test_registration_authority_enrolls_another_subject_without_binding(
    est: Deployment,
) -> None:
    """An id-kp-cmcRA client on [label pop] enrolls another subject, no binding."""
    csr = _subject_csr(est, "/CN=fleet-device-7/OU=demo-factory", "ra")
    response = est.post("pop/simpleenroll", csr, *est.identity("ra"))
    assert response.status_line == b"HTTP/1.1 200 OK", response
    assert response.header("Content-Type") == CERTS_ONLY
    issued = _issued(response)
    assert issued.subject.rfc4514_string() == "OU=demo-factory,CN=fleet-device-7"
    # A forwarded CSR may carry its device's binding for another connection.
    _, stale = _csr(issued.subject, challenge_password=base64.b64encode(b"x" * 32))
    forwarded = est.post("pop/simpleenroll", stale, *est.identity("ra"))
    assert forwarded.status_line == b"HTTP/1.1 200 OK", forwarded


def test_a_device_cannot_do_what_the_ra_does(est: Deployment) -> None:
    """The device gets 401 on [label pop] and 403 (enroll-subject) on [label rfc]."""
    csr = _subject_csr(est, "/CN=fleet-device-7/OU=demo-factory", "not-ra")
    on_pop = est.post("pop/simpleenroll", csr, *est.identity("device"))
    _assert_error(
        on_pop, b"HTTP/1.1 401 Unauthorized", b"Proof of possession mismatch\n"
    )
    on_rfc = est.post("rfc/simpleenroll", csr, *est.identity("device"))
    _assert_error(
        on_rfc,
        b"HTTP/1.1 403 Forbidden",
        b"CSR subject does not match the client certificate\n",
    )


# --- Re-enrollment grace --------------------------------------------------------------


def test_expired_certificate_within_grace_reenrolls(est: Deployment) -> None:
    """Expired a day ago: /grace/simplereenroll issues (201) and the log says why."""
    expired = est.certificate("expired-1d")
    csr = _device_csr(est, "grace-1d", cert="expired-1d")
    response = est.post("grace/simplereenroll", csr, *est.identity("expired-1d"))
    assert response.status_line == b"HTTP/1.1 201 Created", response
    issued = _issued(response)
    assert certificate_subject_der(_der(issued)) == certificate_subject_der(
        _der(expired)
    )
    assert issued.not_valid_after_utc > datetime.datetime.now(datetime.UTC)
    serial = _serial(issued)
    lines = poll(
        lambda: [
            line
            for line in _request_lines(est, "/.well-known/est/grace/simplereenroll")
            if f"issued_serial={serial} " in line
        ],
        "the grace renewal's log line",
    )
    assert "expired client certificate, within re-enrollment grace" in lines[0]
    assert f'client="{expired.subject.rfc4514_string()}"' in lines[0]


def test_estctl_reenrolls_an_expired_certificate_within_grace(
    est: Deployment,
) -> None:
    """``estctl reenroll --label grace`` renews the certificate expired a day ago."""
    prefix = est.scratch / "estctl-grace"
    done = est.estctl(
        "reenroll", est.base_url, "--label", "grace", "--cacert", est.cacert,
        "--cert", est.pki / "expired-1d.pem", "--key", est.pki / "expired-1d.key",
        "--out", prefix,
    )  # fmt: skip
    _estctl_ok(done, prefix)
    _, issued = _written(prefix)
    assert issued.subject == est.certificate("expired-1d").subject


def test_expired_certificate_cannot_simpleenroll(est: Deployment) -> None:
    """Within the grace an expired certificate still may not simpleenroll (403)."""
    expired = est.certificate("expired-1d")
    csr = _device_csr(est, "grace-enroll", cert="expired-1d")
    response = est.post("grace/simpleenroll", csr, *est.identity("expired-1d"))
    day = f"{expired.not_valid_after_utc:%Y-%m-%d}"
    _assert_error(
        response,
        b"HTTP/1.1 403 Forbidden",
        f"the client certificate expired on {day}; only simplereenroll accepts "
        "an expired certificate\n".encode(),
    )


def test_expired_certificate_keeps_its_subject(est: Deployment) -> None:
    """Within the grace, a re-enrollment for another subject is still 403."""
    csr = _subject_csr(est, "/CN=someone-else/OU=demo-factory", "grace-other")
    response = est.post("grace/simplereenroll", csr, *est.identity("expired-1d"))
    _assert_error(
        response,
        b"HTTP/1.1 403 Forbidden",
        b"CSR subject does not match the client certificate\n",
    )


def test_certificate_expired_beyond_every_grace_fails_the_handshake(
    est: Deployment,
) -> None:
    """Expired 31 days ago (grace 30d): no HTTP at all, and the log says 'expired'."""
    csr = _device_csr(est, "grace-31d", cert="expired-31d")
    body = est.scratch / "grace-31d.b64"
    body.write_bytes(base64.b64encode(csr))
    done = curl(
        est.server, "-i", "--cacert", est.cacert, *est.identity("expired-31d"),
        "-H", "Content-Type: application/pkcs10", "--data-binary", f"@{body}",
        est.server.url("grace/simplereenroll"),
    )  # fmt: skip
    assert done.returncode in (35, 56), done
    assert b"HTTP/" not in done.stdout
    subject = est.certificate("expired-31d").subject.rfc4514_string()
    poll(
        lambda: (
            (
                f"TLS handshake with 127.0.0.1 failed: client certificate {subject}: "
                "it has expired"
            )
            in est.server.log_text()
        ),
        "the handshake failure log line",
    )


def test_grace_is_per_label(est: Deployment) -> None:
    """The unlabelled path has no grace: the day-expired certificate gets 403 there."""
    expired = est.certificate("expired-1d")
    csr = _device_csr(est, "grace-none", cert="expired-1d")
    response = est.post("simplereenroll", csr, *est.identity("expired-1d"))
    day = f"{expired.not_valid_after_utc:%Y-%m-%d}"
    _assert_error(
        response,
        b"HTTP/1.1 403 Forbidden",
        f"the client certificate expired on {day}, beyond this label's "
        "re-enrollment grace\n".encode(),
    )
