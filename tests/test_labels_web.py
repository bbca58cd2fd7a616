"""The rest of RFC 7030 in memory: labels, csrattrs, serverkeygen, fullcmc,
HTTP Basic, proof-of-possession linking and the re-enrollment grace.

Same machinery as ``tests/test_web.py``: ``StubTreq`` against the real site,
or bytes into an ``EstChannel`` over a ``StringTransport`` where the exact
wire or the timing matters.  The client certificate and the TLS channel
binding come in through their two seams (``estd.site.client_identity`` and
``estd.web.channel_binding``); ``tests/test_tls.py`` checks both over real
TLS.
"""

from __future__ import annotations

import base64
import datetime
import functools
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import AttributeOID, ExtendedKeyUsageOID, NameOID
from twisted.internet.address import IPv4Address
from twisted.logger import capturedLogs, formatEvent

import estd.auth
import estd.web
from estd.config import OPERATION_NAMES, Config, load_config
from estd.csrattrs import RFC7030_EXAMPLE
from estd.demo import DemoPKI, Pair, device_name, make_pair
from estd.errors import ConfigError
from estd.identity import ID_KP_CMC_RA, ClientIdentity
from estd.site import EstSite
from estd.web import build_site
from estd.wire import certs_only, encode_base64
from tests.pki import NOW, demo_config, demo_pki, fioconfig_csr, write_pki
from tests.test_web import (
    TEXT_PLAIN,
    ResourceTestCase,
    SynchronousThreadPool,
    ThreadlessClock,
    WriteCountingTransport,
    estd_events,
    event_text,
    header,
    parse_raw_response,
    pkcs7_certificates,
    reenroll_csr,
)

EST = "/.well-known/est/"
PKCS7_CERTS_ONLY = [b"application/pkcs7-mime; smime-type=certs-only"]
PKCS7_MIME = [b"application/pkcs7-mime"]

RFC7030_CSRATTRS_BASE64 = (
    b"MEEGCSqGSIb3DQEJBzASBgcqhkjOPQIBMQcGBSuBBAAiMBYGCSqGSIb3DQEJDjEJ"
    b"BgcrBgEBAQEWBggqhkjOPQQDAw=="
)
"""The /csrattrs response body example of RFC 7030 §4.5.2, copied verbatim."""

MAC_ADDRESS = x509.ObjectIdentifier("1.3.6.1.1.1.1.22")
"""RFC 2307 macAddress, the extension the RFC 7030 §4.5.2 example asks for."""

BINDING = bytes(range(1, 13))
"""A stand-in TLS channel binding (12 bytes, the size of a TLS 1.2 tls-unique)."""


# --- Configurations -----------------------------------------------------------------


def load_ini(
    sections: str = "",
    files: Mapping[str, bytes] | None = None,
    now: datetime.datetime = NOW,
    pki: DemoPKI | None = None,
    **overrides: str,
) -> Config:
    """The demo configuration plus ``sections`` appended to its est.ini.

    ``files`` are written next to est.ini first (relative paths in the
    sections point at them); ``overrides`` are command-line options as in
    :func:`tests.pki.demo_config`; ``pki`` defaults to the shared demo PKI.
    """
    directory = tempfile.mkdtemp(prefix="estd-labels-test-")
    try:
        path = write_pki(directory, pki or demo_pki())
        for name, data in (files or {}).items():
            with open(os.path.join(directory, name), "wb") as handle:
                handle.write(data)
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(sections)
        options = {name.replace("_", "-"): value for name, value in overrides.items()}
        return load_config(path, options, now)
    finally:
        shutil.rmtree(directory)


@dataclass(frozen=True)
class OtherPKI:
    """A second EST CA and a second device CA under the demo root, and a device."""

    est_ca: Pair
    device_ca: Pair
    device: Pair


@functools.cache
def other_pki() -> OtherPKI:
    """The PKI of the ``other`` label: nothing in it is trusted by [est]."""
    root = demo_pki().root
    est_ca = make_pair(ca_name("other-est-ca"), root, ca=True, now=NOW)
    device_ca = make_pair(ca_name("other-device-ca"), root, ca=True, now=NOW)
    return OtherPKI(est_ca, device_ca, device_of(device_ca))


def ca_name(common_name: str) -> x509.Name:
    """A CA subject."""
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def device_of(issuer: Pair, *usages: x509.ObjectIdentifier) -> Pair:
    """A P-256 device certificate from ``issuer`` with clientAuth (and ``usages``)."""
    return make_pair(
        device_name(str(uuid.uuid4())),
        issuer,
        ca=False,
        now=NOW,
        days=365,
        extended_usage=[ExtendedKeyUsageOID.CLIENT_AUTH, *usages],
    )


LABELS_INI = """
[label rfc]
response-profile = rfc7030

[label other]
ca-cert = other-est-ca.pem
ca-key = other-est-ca.key
client-cas = other-device-ca.pem
"""


@functools.cache
def labelled_config() -> Config:
    """[est] as in the demo, label ``rfc`` (rfc7030 profile), label ``other``.

    ``other`` has its own EST CA and trusts only its own device CA.
    """
    other = other_pki()
    return load_ini(
        LABELS_INI,
        {
            "other-est-ca.pem": other.est_ca.cert_pem(),
            "other-est-ca.key": other.est_ca.key_pem(),
            "other-device-ca.pem": other.device_ca.cert_pem(),
        },
    )


def identity_from(device: Pair, anchor: Pair, expired: bool = False) -> ClientIdentity:
    """What the TLS layer reports for ``device`` verified against ``anchor``."""
    return ClientIdentity(
        certificate=device.certificate,
        chain=(device.certificate, anchor.certificate),
        expired=expired,
    )


# --- CSRs and bodies --------------------------------------------------------------


def make_csr(
    subject: x509.Name,
    *,
    key: Any = None,
    challenge_password: bytes | None = None,
    extensions: Sequence[x509.ExtensionType] = (),
    algorithm: hashes.HashAlgorithm | None = None,
) -> bytes:
    """A DER CSR with the given subject, key, challengePassword and extensions."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    if challenge_password is not None:
        builder = builder.add_attribute(
            AttributeOID.CHALLENGE_PASSWORD, challenge_password
        )
    csr = builder.sign(key, algorithm or hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.DER)


def b64(der: bytes) -> bytes:
    """The one-line base64 body of a CSR."""
    return base64.b64encode(der)


def cn_name(common_name: str) -> x509.Name:
    """A subject holding only a common name."""
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def basic(user: str, password: str) -> str:
    """An HTTP Basic ``Authorization`` header value."""
    token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
    return "Basic " + token


def without_date(raw: bytes) -> bytes:
    """A raw response with its (wall-clock) Date header line removed, once."""
    stripped, count = re.subn(rb"\r\nDate: [^\r\n]+", b"", raw, count=1)
    assert count == 1, raw
    return stripped


def base64_block(block: bytes, line_length: int = 64) -> bytes:
    """The DER of an estd base64 block, checking its lines (CRLF, 64 columns)."""
    assert block.endswith(b"\r\n"), block[-10:]
    lines = block[:-2].split(b"\r\n")
    assert all(len(line) == line_length for line in lines[:-1]), lines
    assert 0 < len(lines[-1]) <= line_length, lines
    return base64.b64decode(b"".join(lines), validate=True)


def spki(key: Any) -> bytes:
    """The DER SubjectPublicKeyInfo of a public key."""
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


# --- Labels -------------------------------------------------------------------------


class LabelTests(ResourceTestCase):
    """``/.well-known/est/<label>/<op>`` with each label's own settings."""

    def setUp(self) -> None:
        super().setUp()
        self.config = labelled_config()

    def test_labelled_cacerts(self) -> None:
        """Each label's /cacerts serves the roots and that label's own EST CA."""
        pki, other = demo_pki(), other_pki()
        for path, expected in (
            (EST + "rfc/cacerts", [pki.root.certificate, pki.est_ca.certificate]),
            (EST + "other/cacerts", [pki.root.certificate, other.est_ca.certificate]),
            (EST + "cacerts", [pki.root.certificate, pki.est_ca.certificate]),
        ):
            response, body = self.request("GET", path)
            self.assertEqual((path, response.code), (path, 200))
            self.assertEqual(header(response, "Content-Type"), PKCS7_MIME)
            self.assertEqual(header(response, "Content-Transfer-Encoding"), [b"base64"])
            self.assertEqual(pkcs7_certificates(body), expected)

    def test_label_response_profile(self) -> None:
        """A label with response-profile rfc7030 answers 200; the plain path 201."""
        device = demo_pki().devices[0]
        for operation in ("simplereenroll", "simpleenroll"):
            csr = reenroll_csr(device)
            response, body = self.reenroll(b64(csr), path=EST + "rfc/" + operation)
            self.assertEqual((operation, response.code), (operation, 200))
            self.assertEqual(header(response, "Content-Type"), PKCS7_CERTS_ONLY)
            self.assertEqual(header(response, "Content-Transfer-Encoding"), [b"base64"])
            self.assertEqual(response.length, len(body))
            self.assert_issued(body, csr)
            csr = reenroll_csr(device)
            response, body = self.reenroll(b64(csr), path=EST + operation)
            self.assertEqual((operation, response.code), (operation, 201))
            self.assertEqual(header(response, "Content-Type"), PKCS7_MIME)
            self.assert_issued(body, csr)

    def test_label_with_its_own_ca(self) -> None:
        """A device of the label's client CA renews there, signed by the label's CA."""
        other = other_pki()
        self.identity = identity_from(other.device, other.device_ca)
        csr = reenroll_csr(other.device)
        response, body = self.reenroll(b64(csr), path=EST + "other/simplereenroll")
        self.assertEqual(response.code, 201)
        (issued,) = pkcs7_certificates(body)
        issued.verify_directly_issued_by(other.est_ca.certificate)
        self.assertEqual(issued.subject, other.device.certificate.subject)

    def test_client_of_another_label_is_forbidden(self) -> None:
        """A client chaining only to another label's anchor gets 403 on this one."""
        other = other_pki()
        forbidden = "the client certificate is not issued by a CA this label trusts"
        # A demo device (device CA in [est]'s client-cas) on label "other" ...
        csr = reenroll_csr(demo_pki().devices[0])
        response, body = self.reenroll(b64(csr), path=EST + "other/simplereenroll")
        self.assert_error(response, body, 403, forbidden)
        # ... and a device of "other"'s CA on the plain path and on "rfc".
        self.identity = identity_from(other.device, other.device_ca)
        csr = reenroll_csr(other.device)
        for path in (EST + "simplereenroll", EST + "rfc/simpleenroll"):
            response, body = self.reenroll(b64(csr), path=path)
            self.assert_error(response, body, 403, forbidden)

    def test_unknown_label(self) -> None:
        """An operation under a label that is not configured gets 404."""
        for method, path in (
            ("GET", EST + "nolabel/cacerts"),
            ("POST", EST + "nolabel/simpleenroll"),
            ("POST", EST + "RFC/simpleenroll"),
        ):
            response, body = self.request(method, path, b"x")
            label = path.split("/")[3]
            self.assert_error(
                response, body, 404, f"unknown EST operation or CA label {label!r}"
            )

    def test_two_segment_label(self) -> None:
        """A two-segment label (est/a/b/simpleenroll) gets 404."""
        csr = b64(reenroll_csr(demo_pki().devices[0]))
        response, body = self.reenroll(csr, path=EST + "rfc/other/simpleenroll")
        self.assert_error(response, body, 404, "unknown EST operation 'other'")
        response, body = self.reenroll(csr, path=EST + "a/b/simpleenroll")
        self.assert_error(response, body, 404, "unknown EST operation or CA label 'a'")
        response, body = self.reenroll(csr, path=EST + "rfc/simpleenroll/x")
        self.assert_error(response, body, 404, "no such EST resource")

    def test_operation_under_an_operation(self) -> None:
        """/est/cacerts/cacerts is no label path: 404."""
        response, body = self.request("GET", EST + "cacerts/cacerts")
        self.assert_error(response, body, 404, "no such EST resource")
        response, body = self.request("POST", EST + "simpleenroll/simpleenroll", b"x")
        self.assert_error(response, body, 404, "no such EST resource")

    def test_label_alone(self) -> None:
        """A label without an operation gets 404, with or without a slash."""
        response, body = self.request("GET", EST + "rfc")
        self.assert_error(response, body, 404, "no EST operation in the path")
        # With a slash the reason is not pinned: it changes with the fix of
        # the trailing-slash bug below (either way, 404 with a text reason).
        response, body = self.request("GET", EST + "rfc/")
        self.assertEqual(response.code, 404)
        self.assertEqual(header(response, "Content-Type"), TEXT_PLAIN)

    def test_unknown_operation_under_a_label(self) -> None:
        """An unknown operation under a known label gets 404 naming it."""
        response, body = self.request("GET", EST + "rfc/frobnicate")
        self.assert_error(response, body, 404, "unknown EST operation 'frobnicate'")

    def test_longest_label(self) -> None:
        """A label of 128 characters of [A-Za-z0-9._-] is served."""
        name = ("Ab9._-" * 22)[:128]
        self.config = load_ini(f"\n[label {name}]\nresponse-profile = rfc7030\n")
        response, body = self.request("GET", EST + name + "/cacerts")
        self.assertEqual(response.code, 200)
        self.assertEqual(len(pkcs7_certificates(body)), 2)

    def test_label_named_like_an_operation_is_a_config_error(self) -> None:
        """A [label NAME] whose NAME is an operation name is refused at load time."""
        for name in sorted(OPERATION_NAMES):
            with self.assertRaises(ConfigError) as caught:
                load_ini(f"\n[label {name}]\nresponse-profile = rfc7030\n")
            message = str(caught.exception)
            self.assertTrue(
                message.endswith(
                    f"est.ini: [label {name}]: {name} is an EST operation, not a label"
                ),
                message,
            )

    def test_labels_share_one_ca(self) -> None:
        """Labels that inherit the CA files share one CA object with [est]."""
        config = labelled_config()
        self.assertIs(config.labels["rfc"].ca, config.default.ca)
        self.assertIsNot(config.labels["other"].ca, config.default.ca)

    def test_labelled_base_url_with_trailing_slash_renews(self) -> None:
        """A labelled base URL with a trailing slash (rfc//simplereenroll) renews."""
        csr = reenroll_csr(demo_pki().devices[0])
        response, body = self.reenroll(b64(csr), path=EST + "rfc//simplereenroll")
        self.assertEqual(response.code, 200, body)
        self.assert_issued(body, csr)


# --- /csrattrs ------------------------------------------------------------------------


class CsrAttrsTests(ResourceTestCase):
    """``/csrattrs`` (RFC 7030 §4.5, RFC 9908) and its enforcement."""

    def test_nothing_configured_is_204(self) -> None:
        """Without csrattrs, GET /csrattrs is 204, empty, Content-Length 0, no type."""
        for method in ("GET", "HEAD"):
            response, body = self.request(method, EST + "csrattrs")
            self.assertEqual((method, response.code, body), (method, 204, b""))
            self.assertEqual(response.length, 0)
            self.assertIsNone(header(response, "Content-Type"))
            self.assertIsNone(header(response, "Content-Transfer-Encoding"))

    def test_nothing_configured_on_the_wire(self) -> None:
        """The 204 is exactly status line, Server, Date and Content-Length: 0."""
        raw = wire_exchange(
            self.config, b"GET /.well-known/est/csrattrs HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        self.assertEqual(
            without_date(raw),
            b"HTTP/1.1 204 No Content\r\nServer: estd\r\nContent-Length: 0\r\n\r\n",
        )

    def test_rfc7030_example(self) -> None:
        """The RFC 7030 §4.5.2 example config gives exactly the RFC's base64 body."""
        self.config = demo_config(csrattrs=RFC7030_EXAMPLE)
        self.assertEqual(
            RFC7030_EXAMPLE,
            "challengePassword, ecPublicKey:secp384r1, extensionRequest:macAddress, "
            "ecdsa-with-SHA384",
        )
        expected = RFC7030_CSRATTRS_BASE64[:64] + b"\r\n"
        expected += RFC7030_CSRATTRS_BASE64[64:] + b"\r\n"
        response, body = self.request("GET", EST + "csrattrs")
        self.assertEqual((response.code, body), (200, expected))
        self.assertEqual(header(response, "Content-Type"), [b"application/csrattrs"])
        self.assertEqual(header(response, "Content-Transfer-Encoding"), [b"base64"])
        self.assertEqual(response.length, len(expected))
        raw = wire_exchange(
            self.config, b"GET /.well-known/est/csrattrs HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        self.assertEqual(
            without_date(raw),
            b"HTTP/1.1 200 OK\r\nServer: estd\r\n"
            b"Content-Type: application/csrattrs\r\n"
            b"Content-Length: %d\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\n" % len(expected) + expected,
        )

    def test_one_line(self) -> None:
        """With base64-line-length 0 the csrattrs body is one line plus CRLF."""
        self.config = demo_config(csrattrs=RFC7030_EXAMPLE, base64_line_length="0")
        _, body = self.request("GET", EST + "csrattrs")
        self.assertEqual(body, RFC7030_CSRATTRS_BASE64 + b"\r\n")

    def test_per_label(self) -> None:
        """A label's csrattrs are served under it; the plain path keeps 204."""
        self.config = load_ini(
            "\n[label csr]\ncsrattrs = challengePassword\n"
            "\n[label bare]\nresponse-profile = rfc7030\n"
        )
        response, body = self.request("GET", EST + "csr/csrattrs")
        # SEQUENCE { OID 1.2.840.113549.1.9.7 }
        der = bytes.fromhex("300b06092a864886f70d010907")
        self.assertEqual((response.code, body), (200, base64.b64encode(der) + b"\r\n"))
        self.assertEqual(header(response, "Content-Type"), [b"application/csrattrs"])
        for path in (EST + "csrattrs", EST + "bare/csrattrs"):
            response, body = self.request("GET", path)
            self.assertEqual((path, response.code, body), (path, 204, b""))

    def test_post_is_405(self) -> None:
        """POST /csrattrs gets 405 with Allow: GET, HEAD."""
        response, body = self.request("POST", EST + "csrattrs", b"x")
        self.assert_error(response, body, 405, "method not allowed; use GET or HEAD")
        self.assertEqual(header(response, "Allow"), [b"GET, HEAD"])

    def test_enforce_names_what_is_missing(self) -> None:
        """With csrattrs-enforce, a CSR lacking requested items gets 400 naming them."""
        self.config = demo_config(csrattrs=RFC7030_EXAMPLE, csrattrs_enforce="yes")
        csr = reenroll_csr(demo_pki().devices[0])
        response, body = self.reenroll(b64(csr))
        self.assert_error(
            response,
            body,
            400,
            "the CSR lacks what /csrattrs asks for: the challengePassword attribute; "
            "a key on curve secp384r1; the extension macAddress; "
            "signature ecdsa-with-SHA384",
        )

    def test_enforce_accepts_a_complete_csr(self) -> None:
        """With csrattrs-enforce, a CSR with everything csrattrs asks for is issued."""
        self.config = demo_config(csrattrs=RFC7030_EXAMPLE, csrattrs_enforce="yes")
        self.patch(estd.web, "channel_binding", lambda transport: BINDING)
        device = demo_pki().devices[0]
        csr = make_csr(
            device.certificate.subject,
            key=ec.generate_private_key(ec.SECP384R1()),
            challenge_password=base64.b64encode(BINDING),
            extensions=[x509.UnrecognizedExtension(MAC_ADDRESS, b"\x04\x06abcdef")],
            algorithm=hashes.SHA384(),
        )
        response, body = self.reenroll(b64(csr))
        self.assertEqual(response.code, 201, body)
        (issued,) = pkcs7_certificates(body)
        self.assertEqual(issued.subject, device.certificate.subject)

    def test_enforce_off_by_default(self) -> None:
        """Without csrattrs-enforce, a CSR ignoring csrattrs is still issued."""
        self.config = demo_config(csrattrs=RFC7030_EXAMPLE)
        csr = reenroll_csr(demo_pki().devices[0])
        response, body = self.reenroll(b64(csr))
        self.assertEqual(response.code, 201)
        self.assert_issued(body, csr)

    def test_enforce_per_label(self) -> None:
        """csrattrs-enforce on a label refuses there and not on the plain path."""
        self.config = load_ini(
            "\n[label strict]\ncsrattrs = ecPublicKey:secp384r1\n"
            "csrattrs-enforce = yes\n"
        )
        csr = b64(reenroll_csr(demo_pki().devices[0]))
        response, body = self.reenroll(csr, path=EST + "strict/simplereenroll")
        self.assert_error(
            response,
            body,
            400,
            "the CSR lacks what /csrattrs asks for: a key on curve secp384r1",
        )
        response, _ = self.reenroll(csr)
        self.assertEqual(response.code, 201)


def wire_exchange(config: Config, request: bytes) -> bytes:
    """Feed ``request`` to a fresh EstChannel; return the one write it makes."""
    site = build_site(lambda: config, ThreadlessClock(), SynchronousThreadPool())
    channel = site.buildProtocol(None)
    transport = WriteCountingTransport()
    channel.makeConnection(transport)
    channel.dataReceived(request)
    assert len(transport.writes) == 1, transport.writes
    return transport.writes[0]


# --- /serverkeygen --------------------------------------------------------------------


MULTIPART_BODY = re.compile(
    rb"--(?P<boundary>estd-[0-9a-f]{24})\r\n"
    rb"Content-Type: application/pkcs8\r\n"
    rb"Content-Transfer-Encoding: base64\r\n"
    rb"\r\n"
    rb"(?P<key>(?:[A-Za-z0-9+/=]+\r\n)+)"
    rb"--(?P=boundary)\r\n"
    rb"Content-Type: application/pkcs7-mime; smime-type=certs-only\r\n"
    rb"Content-Transfer-Encoding: base64\r\n"
    rb"\r\n"
    rb"(?P<certs>(?:[A-Za-z0-9+/=]+\r\n)+)"
    rb"--(?P=boundary)--\r\n"
)
"""RFC 7030 §4.4.2 as estd writes it: key part, certificate part, CRLF lines."""


class ServerKeygenTests(ResourceTestCase):
    """``/serverkeygen`` (RFC 7030 §4.4)."""

    def setUp(self) -> None:
        super().setUp()
        self.config = serverkeygen_config()

    def keygen(self, csr: bytes, path: str = EST + "serverkeygen") -> tuple[Any, bytes]:
        """POST a CSR to /serverkeygen."""
        return self.reenroll(b64(csr), path=path)

    def parts(self, response: Any, body: bytes) -> tuple[Any, x509.Certificate]:
        """The private key and certificate of a 200 multipart answer, checked."""
        self.assertEqual(response.code, 200, body)
        (content_type,) = header(response, "Content-Type")
        match = MULTIPART_BODY.fullmatch(body)
        assert match is not None, body
        self.assertEqual(
            content_type, b"multipart/mixed; boundary=" + match["boundary"]
        )
        self.assertEqual(response.length, len(body))
        # Each part carries its own encoding; the whole body is not base64.
        self.assertIsNone(header(response, "Content-Transfer-Encoding"))
        key_der = base64_block(match["key"])
        key = serialization.load_der_private_key(key_der, None)
        (certificate,) = pkcs7_certificates(match["certs"])
        # Nothing but the two parts: the body rebuilt from them is identical.
        delimiter = b"--" + match["boundary"]
        self.assertEqual(
            body,
            delimiter + b"\r\nContent-Type: application/pkcs8\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\n"
            + encode_base64(key_der, 64)
            + delimiter
            + b"\r\nContent-Type: application/pkcs7-mime; smime-type=certs-only\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\n"
            + encode_base64(certs_only([certificate]), 64)
            + delimiter
            + b"--\r\n",
        )
        return key, certificate

    def test_off_by_default(self) -> None:
        """Without serverkeygen = yes, /serverkeygen is 404."""
        self.config = demo_config()
        response, body = self.keygen(reenroll_csr(demo_pki().devices[0]))
        self.assert_error(
            response,
            body,
            404,
            "serverkeygen is not enabled here (serverkeygen = yes turns it on)",
        )

    def test_key_and_certificate(self) -> None:
        """The answer holds a PKCS#8 key and a certificate for it, not the CSR's key."""
        device = demo_pki().devices[0]
        csr_key, csr = fioconfig_csr(device.certificate.subject)
        key, certificate = self.parts(*self.keygen(csr))
        self.assertIsInstance(key, ec.EllipticCurvePrivateKey)
        self.assertEqual(key.curve.name, "secp256r1")  # like the CSR's key
        self.assertEqual(spki(certificate.public_key()), spki(key.public_key()))
        self.assertNotEqual(spki(key.public_key()), spki(csr_key.public_key()))
        self.assertEqual(certificate.subject, device.certificate.subject)
        certificate.verify_directly_issued_by(demo_pki().est_ca.certificate)
        usages = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
        self.assertEqual(list(usages.value), [ExtendedKeyUsageOID.CLIENT_AUTH])

    def test_each_answer_has_a_fresh_key_and_boundary(self) -> None:
        """Two requests get two different keys and two different boundaries."""
        csr = reenroll_csr(demo_pki().devices[0])
        first, second = self.keygen(csr), self.keygen(csr)
        key_one, _ = self.parts(*first)
        key_two, _ = self.parts(*second)
        self.assertNotEqual(spki(key_one.public_key()), spki(key_two.public_key()))
        self.assertNotEqual(
            header(first[0], "Content-Type"), header(second[0], "Content-Type")
        )

    def test_configured_key_type(self) -> None:
        """serverkeygen-key-type = ec-p384 makes a P-384 key whatever the CSR's."""
        self.config = demo_config(serverkeygen="yes", serverkeygen_key_type="ec-p384")
        key, certificate = self.parts(*self.keygen(reenroll_csr(demo_pki().devices[0])))
        self.assertEqual(key.curve.name, "secp384r1")
        self.assertEqual(spki(certificate.public_key()), spki(key.public_key()))

    def test_same_policy_as_simpleenroll(self) -> None:
        """/serverkeygen refuses like simpleenroll: anonymous 401, other subject 403."""
        response, body = self.keygen(reenroll_csr(demo_pki().devices[1]))
        self.assert_error(
            response, body, 403, "CSR subject does not match the client certificate"
        )
        self.identity = None
        response, body = self.keygen(reenroll_csr(demo_pki().devices[0]))
        self.assert_error(response, body, 401, "a client certificate is required")

    def test_get_is_405(self) -> None:
        """GET /serverkeygen gets 405 with Allow: POST."""
        response, body = self.request("GET", EST + "serverkeygen")
        self.assert_error(response, body, 405, "method not allowed; use POST")
        self.assertEqual(header(response, "Allow"), [b"POST"])

    def test_per_label(self) -> None:
        """serverkeygen = yes on a label turns it on there only."""
        self.config = load_ini("\n[label keys]\nserverkeygen = yes\n")
        csr = reenroll_csr(demo_pki().devices[0])
        self.parts(*self.keygen(csr, path=EST + "keys/serverkeygen"))
        response, _ = self.keygen(csr)
        self.assertEqual(response.code, 404)

    def test_key_never_logged(self) -> None:
        """The generated private key appears in no log event."""
        csr = reenroll_csr(demo_pki().devices[0])
        with capturedLogs() as events:
            response, body = self.keygen(csr)
        key, _ = self.parts(response, body)
        match = MULTIPART_BODY.fullmatch(body)
        assert match is not None
        der = key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        secrets = [
            *match["key"].split(b"\r\n")[:-1],
            base64.b64encode(der),
            der.hex().encode(),
            repr(der)[2:60].encode(),
            b"%x" % key.private_numbers().private_value,
            b"%d" % key.private_numbers().private_value,
        ]
        (line,) = [event for event in estd_events(events) if "status" in event]
        self.assertEqual(line["status"], 200)
        for event in events:
            text = event_text(event).encode()
            for secret in secrets:
                self.assertNotIn(secret, text)


@functools.cache
def serverkeygen_config() -> Config:
    """The demo configuration with serverkeygen = yes."""
    return demo_config(serverkeygen="yes")


# --- /fullcmc -------------------------------------------------------------------------


class FullCmcTests(ResourceTestCase):
    """``/fullcmc`` (RFC 7030 §4.3) is not implemented, and says so."""

    def test_any_method_is_501(self) -> None:
        """GET, POST, PUT and DELETE on /fullcmc all get 501 with a text reason."""
        for method in ("GET", "POST", "PUT", "DELETE"):
            response, body = self.request(method, EST + "fullcmc", b"x")
            self.assert_error(
                response,
                body,
                501,
                "full CMC (RFC 7030 §4.3) is not supported by this server",
            )

    def test_labelled(self) -> None:
        """/<label>/fullcmc is 501 too."""
        self.config = labelled_config()
        response, body = self.request("POST", EST + "rfc/fullcmc", b"x")
        self.assert_error(
            response,
            body,
            501,
            "full CMC (RFC 7030 §4.3) is not supported by this server",
        )

    def test_on_the_wire(self) -> None:
        """The 501 is one write with Content-Length and the UTF-8 text."""
        raw = wire_exchange(
            demo_config(),
            b"PUT /.well-known/est/fullcmc HTTP/1.1\r\nHost: x\r\n"
            b"Content-Length: 0\r\n\r\n",
        )
        text = "full CMC (RFC 7030 §4.3) is not supported by this server\n".encode()
        self.assertEqual(
            without_date(raw),
            b"HTTP/1.1 501 Not Implemented\r\nServer: estd\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: %d\r\n\r\n" % len(text) + text,
        )


# --- HTTP Basic -----------------------------------------------------------------------


USER, PASSWORD = "factory-line-1", "correct horse battery staple"


class BasicAuthTestCase(ResourceTestCase):
    """A users file with one user; configurations using it."""

    def setUp(self) -> None:
        super().setUp()
        self.patch(estd.auth, "BCRYPT_ROUNDS", 4)  # the minimum; tests need speed
        directory = tempfile.mkdtemp(prefix="estd-users-test-")
        self.addCleanup(shutil.rmtree, directory)
        self.users_file = os.path.join(directory, "users.htpasswd")
        estd.auth.set_password(self.users_file, USER, PASSWORD)

    def auth_config(self, auth: str, **options: str) -> Config:
        """The demo configuration with ``auth`` and our users file."""
        return demo_config(auth=auth, users_file=self.users_file, **options)

    def enroll(
        self,
        csr: bytes,
        authorization: str | None = None,
        path: str = EST + "simpleenroll",
    ) -> tuple[Any, bytes]:
        """POST a CSR, with an Authorization header if given."""
        headers = {"Authorization": authorization} if authorization else None
        return self.request("POST", path, b64(csr), headers=headers)

    def assert_challenge(self, response: Any, realm: str = "estd") -> None:
        """The response asks for HTTP Basic credentials in ``realm``."""
        self.assertEqual(
            header(response, "WWW-Authenticate"), [f'Basic realm="{realm}"'.encode()]
        )


class BasicAuthTests(BasicAuthTestCase):
    """``auth = basic | cert-or-basic | cert-and-basic`` against a users file."""

    def test_no_credentials(self) -> None:
        """Without credentials the answer is 401 with a Basic challenge."""
        self.config = self.auth_config("basic")
        self.identity = None
        response, body = self.enroll(make_csr(cn_name(USER)))
        self.assert_error(response, body, 401, "HTTP Basic credentials are required")
        self.assert_challenge(response)

    def test_wrong_password(self) -> None:
        """A wrong password, or an unknown user, gets 401 with a Basic challenge."""
        self.config = self.auth_config("basic")
        self.identity = None
        for user, password in ((USER, "wrong"), ("nobody", PASSWORD), (USER, "")):
            response, body = self.enroll(make_csr(cn_name(USER)), basic(user, password))
            self.assert_error(response, body, 401, "wrong user name or password")
            self.assert_challenge(response)

    def test_right_password(self) -> None:
        """The right password enrolls a client without a certificate, CN = user."""
        self.config = self.auth_config("basic")
        self.identity = None
        csr = make_csr(cn_name(USER))
        with capturedLogs() as events:
            response, body = self.enroll(csr, basic(USER, PASSWORD))
        self.assertEqual(response.code, 201, body)
        self.assertIsNone(header(response, "WWW-Authenticate"))
        (issued,) = pkcs7_certificates(body)
        self.assertEqual(issued.subject, cn_name(USER))
        (line,) = [event for event in estd_events(events) if "status" in event]
        self.assertEqual((line["status"], line["user"]), (201, USER))
        self.assertIn(f" user={USER} ", formatEvent(line))
        for event in events:
            self.assertNotIn(PASSWORD, event_text(event))

    def test_common_name_must_be_the_user(self) -> None:
        """Under enroll-subject = match, a CSR for another CN than the user gets 403."""
        self.config = self.auth_config("basic")
        self.identity = None
        response, body = self.enroll(
            make_csr(cn_name("someone-else")), basic(USER, PASSWORD)
        )
        self.assert_error(
            response, body, 403, "CSR common name does not match the user name"
        )

    def test_refusal_after_authentication_names_the_user(self) -> None:
        """A 403 to an authenticated user logs who it was; a 401 names nobody."""
        self.config = self.auth_config("basic")
        self.identity = None
        with capturedLogs() as events:
            refused, _ = self.enroll(
                make_csr(cn_name("someone-else")), basic(USER, PASSWORD)
            )
            unknown, _ = self.enroll(make_csr(cn_name(USER)), basic("nobody", "x"))
        self.assertEqual((refused.code, unknown.code), (403, 401))
        forbidden, unauthorized = [e for e in estd_events(events) if "status" in e]
        self.assertEqual((forbidden["status"], forbidden["user"]), (403, USER))
        self.assertIn(f" user={USER}", formatEvent(forbidden))
        self.assertEqual(unauthorized["status"], 401)
        self.assertNotIn("user", unauthorized)
        self.assertNotIn("user=", formatEvent(unauthorized))

    def test_unprintable_user_name_is_escaped_in_the_log(self) -> None:
        """A hand-edited users file's odd name is logged quoted, never raw."""
        odd = "line\x1b[31m-1"
        with open(self.users_file, encoding="utf-8") as handle:
            text = handle.read()
        with open(self.users_file, "w", encoding="utf-8") as handle:
            handle.write(text.replace(f"{USER}:", f"{odd}:", 1))
        self.config = self.auth_config("basic")
        self.identity = None
        with capturedLogs() as events:
            response, _ = self.enroll(
                make_csr(cn_name("someone-else")), basic(odd, PASSWORD)
            )
        self.assertEqual(response.code, 403)
        (line,) = [event for event in estd_events(events) if "status" in event]
        self.assertEqual(line["user"], odd)
        text = formatEvent(line)
        self.assertIn(f" user={odd!r}", text)
        self.assertNotIn("\x1b", text)

    def test_basic_label_ignores_the_certificate_for_enroll(self) -> None:
        """Under auth = basic a client certificate alone does not enroll."""
        self.config = self.auth_config("basic")
        response, body = self.enroll(reenroll_csr(demo_pki().devices[0]))
        self.assert_error(response, body, 401, "HTTP Basic credentials are required")
        self.assert_challenge(response)

    def test_basic_label_reenroll_needs_the_certificate(self) -> None:
        """Under auth = basic, simplereenroll without a certificate gets 401."""
        self.config = self.auth_config("basic")
        self.identity = None
        response, body = self.enroll(
            make_csr(cn_name(USER)),
            basic(USER, PASSWORD),
            path=EST + "simplereenroll",
        )
        self.assert_error(
            response,
            body,
            401,
            "re-enrollment needs the client certificate being renewed",
        )
        self.assert_challenge(response)

    def test_cert_or_basic(self) -> None:
        """Under cert-or-basic a certificate or a password enrolls; neither gets 401."""
        self.config = self.auth_config("cert-or-basic")
        device_csr = reenroll_csr(demo_pki().devices[0])
        response, body = self.enroll(device_csr)
        self.assertEqual(response.code, 201, body)
        self.identity = None
        response, body = self.enroll(make_csr(cn_name(USER)), basic(USER, PASSWORD))
        self.assertEqual(response.code, 201, body)
        response, body = self.enroll(make_csr(cn_name(USER)))
        self.assert_error(
            response,
            body,
            401,
            "a client certificate or HTTP Basic credentials are required",
        )
        self.assert_challenge(response)

    def test_cert_and_basic(self) -> None:
        """Under cert-and-basic only a certificate plus the password enrolls."""
        self.config = self.auth_config("cert-and-basic")
        missing = "a client certificate and HTTP Basic credentials are required"
        device_csr = reenroll_csr(demo_pki().devices[0])
        response, body = self.enroll(device_csr)
        self.assert_error(response, body, 401, missing)
        self.assert_challenge(response)
        response, body = self.enroll(device_csr, basic(USER, PASSWORD))
        self.assertEqual(response.code, 201, body)
        self.assert_issued(body, device_csr)
        self.identity = None
        response, body = self.enroll(make_csr(cn_name(USER)), basic(USER, PASSWORD))
        self.assert_error(response, body, 401, missing)
        self.assert_challenge(response)

    def test_realm(self) -> None:
        """The challenge names the configured realm."""
        self.config = self.auth_config("basic", realm="factory EST")
        self.identity = None
        response, _ = self.enroll(make_csr(cn_name(USER)))
        self.assert_challenge(response, "factory EST")

    def test_cert_mode_never_challenges(self) -> None:
        """Under auth = cert no 401 carries WWW-Authenticate, credentials or not."""
        self.config = self.auth_config("cert", serverkeygen="yes")
        self.identity = None
        csr = make_csr(cn_name(USER))
        for authorization in (None, basic(USER, PASSWORD), basic(USER, "wrong")):
            for operation, reason in (
                ("simpleenroll", "a client certificate is required"),
                ("serverkeygen", "a client certificate is required"),
                (
                    "simplereenroll",
                    "re-enrollment needs the client certificate being renewed",
                ),
            ):
                response, body = self.enroll(csr, authorization, path=EST + operation)
                self.assert_error(response, body, 401, reason)
                self.assertIsNone(header(response, "WWW-Authenticate"))

    def test_basic_per_label(self) -> None:
        """A label with auth = basic takes the password; the plain path does not."""
        self.config = load_ini(
            f"\n[label bootstrap]\nauth = basic\nusers-file = {self.users_file}\n"
        )
        self.identity = None
        csr = make_csr(cn_name(USER))
        response, body = self.enroll(
            csr, basic(USER, PASSWORD), path=EST + "bootstrap/simpleenroll"
        )
        self.assertEqual(response.code, 201, body)
        response, body = self.enroll(csr, basic(USER, PASSWORD))
        self.assert_error(response, body, 401, "a client certificate is required")
        self.assertIsNone(header(response, "WWW-Authenticate"))


class ThrottleTests(BasicAuthTestCase):
    """Repeated wrong passwords from one address are answered ever more slowly."""

    def setUp(self) -> None:
        super().setUp()
        self.config = self.auth_config("basic")
        self.identity = None
        self.site: EstSite = self.site()

    def attempt(
        self, password: str, address: str = "192.0.2.7"
    ) -> WriteCountingTransport:
        """Send simpleenroll with ``password`` on a new connection from ``address``."""
        body = b64(make_csr(cn_name(USER)))
        transport = WriteCountingTransport()
        transport.peerAddr = IPv4Address("TCP", address, 40123)
        channel = self.site.buildProtocol(None)
        channel.makeConnection(transport)
        channel.dataReceived(
            b"POST /.well-known/est/simpleenroll HTTP/1.1\r\nHost: est.test\r\n"
            b"Content-Type: application/pkcs10\r\n"
            b"Authorization: " + basic(USER, password).encode() + b"\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        return transport

    def status(self, transport: WriteCountingTransport) -> bytes:
        """The status line of the one response written, if any (else b'')."""
        if not transport.writes:
            return b""
        (raw,) = transport.writes
        status, _, _ = parse_raw_response(raw)
        return status

    def test_failures_are_slowed_down(self) -> None:
        """Four wrong passwords are answered at once; the next waits 1 s, then 2 s."""
        unauthorized = b"HTTP/1.1 401 Unauthorized"
        for _ in range(4):
            self.assertEqual(self.status(self.attempt("wrong")), unauthorized)
        for delay in (1.0, 2.0):
            held = self.attempt("wrong")
            self.clock.advance(delay - 0.001)
            self.assertEqual(held.writes, [])
            self.clock.advance(0.001)
            self.assertEqual(self.status(held), unauthorized)

    def test_site_uses_the_given_throttle(self) -> None:
        """build_site's throttle decides: with no free failures the 2nd answer waits."""
        self.site = build_site(
            lambda: self.config,
            self.clock,
            self.threadpool,
            throttle=estd.auth.FailureThrottle(
                self.clock.seconds, free_failures=0, base_delay=5.0
            ),
        )
        self.assertEqual(
            self.status(self.attempt("wrong")), b"HTTP/1.1 401 Unauthorized"
        )
        held = self.attempt(PASSWORD)
        self.clock.advance(4.999)
        self.assertEqual(held.writes, [])
        self.clock.advance(0.001)
        self.assertEqual(self.status(held), b"HTTP/1.1 201 Created")

    def test_no_credentials_not_slowed(self) -> None:
        """A throttled address asking without credentials gets its 401 at once."""
        for _ in range(6):
            self.attempt("wrong")
            self.clock.advance(60)
        transport = WriteCountingTransport()
        channel = self.site.buildProtocol(None)
        channel.makeConnection(transport)
        channel.dataReceived(
            b"POST /.well-known/est/simpleenroll HTTP/1.1\r\nHost: est.test\r\n"
            b"Content-Type: application/pkcs10\r\nContent-Length: 1\r\n\r\nx"
        )
        self.assertEqual(self.status(transport), b"HTTP/1.1 401 Unauthorized")

    def test_right_password_waits_too_then_resets(self) -> None:
        """A throttled address waits even with the right password; success resets it."""
        for _ in range(4):
            self.attempt("wrong")
            self.clock.advance(60)
        held = self.attempt(PASSWORD)
        self.assertEqual(held.writes, [])
        self.clock.advance(2)
        self.assertEqual(self.status(held), b"HTTP/1.1 201 Created")
        self.assertEqual(
            self.status(self.attempt("wrong")), b"HTTP/1.1 401 Unauthorized"
        )

    def test_other_addresses_are_not_slowed(self) -> None:
        """Failures from one address do not delay another address."""
        for _ in range(5):
            self.attempt("wrong")
            self.clock.advance(60)
        self.assertEqual(
            self.status(self.attempt(PASSWORD, address="198.51.100.9")),
            b"HTTP/1.1 201 Created",
        )
        self.assertEqual(self.attempt(PASSWORD).writes, [])


# --- Proof of possession linking ------------------------------------------------------


class ProofOfPossessionTests(ResourceTestCase):
    """``require-pop``: the CSR's challengePassword carries the TLS channel binding."""

    def setUp(self) -> None:
        super().setUp()
        self.config = pop_config()
        self.binding: bytes | None = BINDING
        self.patch(estd.web, "channel_binding", lambda transport: self.binding)
        self.device = demo_pki().devices[0]

    def csr(
        self, challenge_password: bytes | None, subject: x509.Name | None = None
    ) -> bytes:
        """A CSR for our device with the given challengePassword."""
        return make_csr(
            subject or self.device.certificate.subject,
            challenge_password=challenge_password,
        )

    def test_missing_binding(self) -> None:
        """With require-pop, a CSR without challengePassword gets 401."""
        response, body = self.reenroll(b64(self.csr(None)))
        self.assert_error(response, body, 401, "Proof of possession mismatch")

    def test_right_binding(self) -> None:
        """A challengePassword holding the connection's binding in base64 is issued."""
        for operation in ("simplereenroll", "simpleenroll"):
            csr = self.csr(base64.b64encode(BINDING))
            response, body = self.reenroll(b64(csr), path=EST + operation)
            self.assertEqual((operation, response.code), (operation, 201))
            self.assertEqual(len(pkcs7_certificates(body)), 1)

    def test_wrong_binding(self) -> None:
        """Another connection's binding, raw bytes or garbage get 401."""
        for password in (
            base64.b64encode(bytes(12)),
            BINDING,
            base64.b64encode(BINDING)[:-1],
            b"secret",
        ):
            response, body = self.reenroll(b64(self.csr(password)))
            self.assert_error(response, body, 401, "Proof of possession mismatch")

    def test_no_binding_on_the_connection(self) -> None:
        """Without a TLS binding (no TLS) a challengePassword cannot match: 401."""
        self.binding = None
        response, body = self.reenroll(b64(self.csr(base64.b64encode(BINDING))))
        self.assert_error(response, body, 401, "Proof of possession mismatch")

    def test_present_password_always_checked(self) -> None:
        """Without require-pop a present challengePassword is still checked."""
        self.config = demo_config()
        response, body = self.reenroll(b64(self.csr(b"some password")))
        self.assert_error(response, body, 401, "Proof of possession mismatch")
        response, _ = self.reenroll(b64(self.csr(base64.b64encode(BINDING))))
        self.assertEqual(response.code, 201)
        response, _ = self.reenroll(b64(self.csr(None)))
        self.assertEqual(response.code, 201)

    def test_per_label(self) -> None:
        """require-pop on a label applies there and not on the plain path."""
        self.config = load_ini("\n[label pop]\nrequire-pop = yes\n")
        csr = b64(self.csr(None))
        response, body = self.reenroll(csr, path=EST + "pop/simplereenroll")
        self.assert_error(response, body, 401, "Proof of possession mismatch")
        response, _ = self.reenroll(csr)
        self.assertEqual(response.code, 201)

    def test_registration_authority_is_exempt(self) -> None:
        """An RA certificate (id-kp-cmcRA) enrolls others' CSRs without the binding."""
        pki = demo_pki()
        authority = device_of(pki.device_ca, ID_KP_CMC_RA)
        self.identity = identity_from(authority, pki.device_ca)
        other_subject = pki.devices[1].certificate.subject
        for password in (None, b"the device's own binding"):
            csr = self.csr(password, subject=other_subject)
            response, body = self.reenroll(b64(csr), path=EST + "simpleenroll")
            self.assertEqual(response.code, 201, body)
            (issued,) = pkcs7_certificates(body)
            self.assertEqual(issued.subject, other_subject)

    def test_registration_authority_cannot_reenroll_others(self) -> None:
        """An RA renewing someone else's subject through simplereenroll gets 403."""
        pki = demo_pki()
        authority = device_of(pki.device_ca, ID_KP_CMC_RA)
        self.identity = identity_from(authority, pki.device_ca)
        csr = self.csr(None, subject=pki.devices[1].certificate.subject)
        response, body = self.reenroll(b64(csr))
        self.assert_error(
            response, body, 403, "CSR subject does not match the client certificate"
        )

    def test_plain_device_cannot_enroll_others(self) -> None:
        """Control for the RA test: a plain device enrolling for another gets 403."""
        csr = self.csr(
            base64.b64encode(BINDING), subject=demo_pki().devices[1].certificate.subject
        )
        response, body = self.reenroll(b64(csr), path=EST + "simpleenroll")
        self.assert_error(
            response, body, 403, "CSR subject does not match the client certificate"
        )


class ProofOfPossessionWithBasicTests(BasicAuthTestCase):
    """``require-pop`` on a label that also takes HTTP Basic."""

    def test_mismatch_still_challenges(self) -> None:
        """A PoP 401 on a Basic label carries WWW-Authenticate, as every 401 must."""
        self.config = self.auth_config("basic", require_pop="yes")
        self.patch(estd.web, "channel_binding", lambda transport: BINDING)
        self.identity = None
        response, body = self.enroll(make_csr(cn_name(USER)), basic(USER, PASSWORD))
        self.assert_error(response, body, 401, "Proof of possession mismatch")
        self.assert_challenge(response)


@functools.cache
def pop_config() -> Config:
    """The demo configuration with require-pop = yes."""
    return demo_config(require_pop="yes")


# --- Re-enrolling an expired certificate ----------------------------------------------


class ExpiredCertificateTests(ResourceTestCase):
    """``reenroll-grace``: an expired certificate may renew a while after expiry."""

    def setUp(self) -> None:
        super().setUp()
        self.device = demo_pki().devices[0]
        self.identity = identity_from(self.device, demo_pki().device_ca, expired=True)
        self.expired_at = self.device.certificate.not_valid_after_utc

    def at(self, after_expiry: datetime.timedelta) -> None:
        """Set the clock to ``after_expiry`` past the device's notAfter."""
        self.clock = ThreadlessClock()
        self.clock.advance((self.expired_at + after_expiry).timestamp())

    def test_within_grace_renews_and_is_logged(self) -> None:
        """Within the grace simplereenroll renews; the log line says so."""
        self.config = grace_config()
        self.at(datetime.timedelta(days=29, hours=23))
        csr = reenroll_csr(self.device)
        with capturedLogs() as events:
            response, body = self.reenroll(b64(csr))
        self.assertEqual(response.code, 201)
        self.assert_issued(body, csr)
        (line,) = [event for event in estd_events(events) if "status" in event]
        self.assertIs(line["client_expired"], True)
        self.assertIn(
            "(expired client certificate, within re-enrollment grace)",
            formatEvent(line),
        )

    def test_at_the_edge(self) -> None:
        """Exactly 30 days after expiry still renews under a 30-day grace."""
        self.config = grace_config()
        self.at(datetime.timedelta(days=30))
        response, _ = self.reenroll(b64(reenroll_csr(self.device)))
        self.assertEqual(response.code, 201)

    def test_beyond_grace(self) -> None:
        """Past the grace simplereenroll gets 403 saying so."""
        self.config = grace_config()
        self.at(datetime.timedelta(days=30, seconds=1))
        response, body = self.reenroll(b64(reenroll_csr(self.device)))
        self.assert_error(
            response,
            body,
            403,
            f"the client certificate expired on {self.expired_at:%Y-%m-%d}, "
            "beyond this label's re-enrollment grace",
        )

    def test_only_reenroll(self) -> None:
        """An expired certificate in the grace cannot simpleenroll or serverkeygen."""
        self.config = demo_config(reenroll_grace="30d", serverkeygen="yes")
        self.at(datetime.timedelta(days=1))
        for operation in ("simpleenroll", "serverkeygen"):
            response, body = self.reenroll(
                b64(reenroll_csr(self.device)), path=EST + operation
            )
            self.assert_error(
                response,
                body,
                403,
                f"the client certificate expired on {self.expired_at:%Y-%m-%d}; "
                "only simplereenroll accepts an expired certificate",
            )

    def test_subject_still_bound(self) -> None:
        """Within the grace, renewing another subject still gets 403."""
        self.config = grace_config()
        self.at(datetime.timedelta(days=1))
        response, body = self.reenroll(b64(reenroll_csr(demo_pki().devices[1])))
        self.assert_error(
            response, body, 403, "CSR subject does not match the client certificate"
        )

    def test_grace_per_label(self) -> None:
        """A label's grace applies there; the plain path (grace 0) refuses."""
        self.config = load_ini("\n[label late]\nreenroll-grace = 30d\n")
        self.at(datetime.timedelta(days=1))
        csr = b64(reenroll_csr(self.device))
        response, _ = self.reenroll(csr, path=EST + "late/simplereenroll")
        self.assertEqual(response.code, 201)
        response, body = self.reenroll(csr)
        self.assert_error(
            response,
            body,
            403,
            f"the client certificate expired on {self.expired_at:%Y-%m-%d}, "
            "beyond this label's re-enrollment grace",
        )


@functools.cache
def grace_config() -> Config:
    """The demo configuration with a 30-day re-enrollment grace."""
    return demo_config(reenroll_grace="30d")
