"""The EST resources and HTTP plumbing of estd.web, driven in memory.

Resource tests use treq's ``StubTreq`` (a real Agent against a real Site);
the wire tests feed bytes to an ``EstChannel`` over a ``StringTransport`` and
look at exactly what it writes.  Signing runs in a synchronous thread pool,
time comes from a ``Clock``; no socket, no thread, no global reactor.
"""

from __future__ import annotations

import base64
import functools
from collections.abc import Callable
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import ExtendedKeyUsageOID
from treq.testing import StubTreq
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogEvent, capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

import estd.site
import estd.web
from estd.ca import serial_hex
from estd.config import Config
from estd.demo import Pair
from estd.identity import ClientIdentity
from estd.site import EstSite
from estd.web import build_site
from estd.wire import raw_subject_of_certificate, raw_subject_of_csr
from tests.pki import demo_config, demo_pki, fioconfig_csr, one_line_base64

PKCS10 = "application/pkcs10"
REENROLL = "/.well-known/est/simplereenroll"
ENROLL = "/.well-known/est/simpleenroll"
CACERTS = "/.well-known/est/cacerts"
TEXT_PLAIN = [b"text/plain; charset=utf-8"]
DIGITAL_SIGNATURE_DER = b"\x03\x02\x07\x80"


# --- Fakes ---------------------------------------------------------------------


class SynchronousThreadPool:
    """The part of ``ThreadPool`` that ``deferToThreadPool`` uses, run inline."""

    def callInThread(self, f: Callable[..., object], *args: Any, **kwargs: Any) -> None:
        """Run ``f`` now, in this thread."""
        f(*args, **kwargs)

    def callInThreadWithCallback(
        self,
        on_result: Callable[[bool, object], object],
        f: Callable[..., object],
        *args: Any,
        **kwargs: Any,
    ) -> None:
        """Run ``f`` now and report its result or failure like a worker would."""
        try:
            result = f(*args, **kwargs)
        except BaseException:
            on_result(False, Failure())
        else:
            on_result(True, result)


class HeldThreadPool(SynchronousThreadPool):
    """A thread pool whose work waits until the test runs it."""

    def __init__(self) -> None:
        self.queued: list[Callable[[], None]] = []

    def callInThreadWithCallback(
        self,
        on_result: Callable[[bool, object], object],
        f: Callable[..., object],
        *args: Any,
        **kwargs: Any,
    ) -> None:
        """Queue the work; :meth:`run_all` runs it."""
        self.queued.append(
            lambda: SynchronousThreadPool.callInThreadWithCallback(
                self, on_result, f, *args, **kwargs
            )
        )

    def run_all(self) -> None:
        """Run every queued piece of work."""
        queued, self.queued = self.queued, []
        for work in queued:
            work()


class ThreadlessClock(Clock):
    """A ``Clock`` that also takes ``callFromThread`` (there are no threads)."""

    def callFromThread(
        self, f: Callable[..., object], *args: Any, **kwargs: Any
    ) -> None:
        """Run ``f`` now: the 'thread' is this one."""
        f(*args, **kwargs)


class WriteCountingTransport(StringTransport):
    """A ``StringTransport`` that remembers every single ``write`` call."""

    def __init__(self) -> None:
        super().__init__(peerAddress=IPv4Address("TCP", "192.0.2.7", 40123))
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        """Record the write, then buffer it as usual."""
        self.writes.append(data)
        super().write(data)


# --- Certificates and bodies ----------------------------------------------------


@functools.cache
def fioconfig_config() -> Config:
    """The demo configuration with the default (fioconfig) response profile."""
    return demo_config()


@functools.cache
def rfc7030_config() -> Config:
    """The demo configuration with the rfc7030 response profile."""
    return demo_config(response_profile="rfc7030")


def identity_of(device: Pair) -> ClientIdentity:
    """What the TLS layer reports for a demo device it verified."""
    pki = demo_pki()
    return ClientIdentity(
        certificate=device.certificate,
        chain=(device.certificate, pki.device_ca.certificate),
    )


def reenroll_csr(device: Pair) -> bytes:
    """A DER CSR like fioconfig's for renewing ``device``'s certificate."""
    _, der = fioconfig_csr(device.certificate.subject)
    return der


def pkcs7_certificates(body: bytes, line_length: int = 64) -> list[x509.Certificate]:
    """The certificates of a base64 PKCS#7 body, checking its exact line layout."""
    assert body.endswith(b"\r\n"), body[-10:]
    assert not body.endswith(b"\r\n\r\n")
    lines = body[:-2].split(b"\r\n")
    for line in lines:
        assert b"\n" not in line and b"\r" not in line
    if line_length:
        assert all(len(line) == line_length for line in lines[:-1]), lines
        assert 0 < len(lines[-1]) <= line_length
    else:
        assert len(lines) == 1
    der = base64.b64decode(b"".join(lines), validate=True)
    return pkcs7.load_der_pkcs7_certificates(der)


def header(response: Any, name: str) -> list[bytes] | None:
    """All raw values of a response header (None if absent)."""
    return response.headers.getRawHeaders(name.encode("ascii"))


def parse_raw_response(raw: bytes) -> tuple[bytes, list[tuple[bytes, bytes]], bytes]:
    """Split one raw HTTP/1.1 response into status line, headers (as sent), body."""
    head, separator, body = raw.partition(b"\r\n\r\n")
    assert separator, raw
    status_line, *header_lines = head.split(b"\r\n")
    headers = [tuple(line.split(b": ", 1)) for line in header_lines]
    return status_line, headers, body


def event_text(event: LogEvent) -> str:
    """Everything a log event could put in a log file: its text and its fields."""
    return formatEvent(event) + repr(event)


def estd_events(events: Any) -> list[LogEvent]:
    """The events of the ``estd`` namespace."""
    return [event for event in events if event.get("log_namespace") == "estd"]


# --- Resource tests through StubTreq ---------------------------------------------


class ResourceTestCase(SynchronousTestCase):
    """Serves the EST site in memory; subclasses pick config and client."""

    config: Config
    identity: ClientIdentity | None

    def setUp(self) -> None:
        self.config = fioconfig_config()
        self.identity = identity_of(demo_pki().devices[0])
        # StubTreq has no TLS: the seam is the one function that reads the
        # client certificate off the connection.
        self.patch(estd.site, "client_identity", lambda transport: self.identity)
        self.clock = ThreadlessClock()
        self.clock.advance(1_800_000_000)
        self.threadpool: SynchronousThreadPool = SynchronousThreadPool()

    def site(self) -> EstSite:
        """The EST site for the current config, clock and pool."""
        return build_site(lambda: self.config, self.clock, self.threadpool)

    def client(self) -> StubTreq:
        """A treq client whose requests reach our EstSite in memory."""
        site = self.site()
        stub = StubTreq(site.resource)
        # StubTreq serves through a plain twisted.web Site; the EST resources
        # need EstSite's request class (client identity, issuance, log line).
        stub._agent._serverFactory = site
        return stub

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        content_type: str | None = PKCS10,
        headers: dict[str, str] | None = None,
    ) -> tuple[Any, bytes]:
        """Make one request; return the response and its body."""
        all_headers = dict(headers or {})
        if content_type is not None and body is not None:
            all_headers["Content-Type"] = content_type
        stub = self.client()
        pending = stub.request(
            method, "http://est.test" + path, data=body, headers=all_headers
        )
        stub.flush()
        response = self.successResultOf(pending)
        content = self.successResultOf(response.content())
        return response, content

    def reenroll(
        self, body: bytes, content_type: str | None = PKCS10, path: str = REENROLL
    ) -> tuple[Any, bytes]:
        """POST ``body`` to simplereenroll (or ``path``)."""
        return self.request("POST", path, body, content_type)

    def assert_error(
        self, response: Any, body: bytes, status: int, reason: str
    ) -> None:
        """The response is ``status`` with the one-line text/plain ``reason``."""
        self.assertEqual(
            (response.code, body), (status, reason.encode("utf-8") + b"\n")
        )
        self.assertEqual(header(response, "Content-Type"), TEXT_PLAIN)
        self.assertEqual(response.length, len(body))
        self.assertEqual(body.count(b"\n"), 1)
        self.assertIsNone(header(response, "Content-Transfer-Encoding"))

    def assert_issued(self, body: bytes, csr_der: bytes) -> x509.Certificate:
        """The body is a certs-only PKCS#7 with exactly the certificate for the CSR."""
        certificates = pkcs7_certificates(body)
        self.assertEqual(len(certificates), 1)
        issued = certificates[0]
        csr = x509.load_der_x509_csr(csr_der)
        # fioconfig compares the subject bytes and the exact KU / EKU.
        self.assertEqual(raw_subject_of_certificate(issued), raw_subject_of_csr(csr))
        self.assertEqual(raw_subject_of_certificate(issued), csr.subject.public_bytes())
        key_usage = issued.extensions.get_extension_for_class(x509.KeyUsage)
        self.assertTrue(key_usage.critical)
        self.assertEqual(key_usage.value.public_bytes(), DIGITAL_SIGNATURE_DER)
        self.assertEqual(
            list(
                issued.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
            ),
            [ExtendedKeyUsageOID.CLIENT_AUTH],
        )
        encoding = (
            serialization.Encoding.DER,
            serialization.PublicFormat.SubjectPublicKeyInfo,
        )
        self.assertEqual(
            issued.public_key().public_bytes(*encoding),
            csr.public_key().public_bytes(*encoding),
        )
        issued.verify_directly_issued_by(demo_pki().est_ca.certificate)
        return issued


class CACertsTests(ResourceTestCase):
    """``/cacerts``."""

    def test_get_returns_root_and_est_ca(self) -> None:
        """GET /cacerts answers 200: root and EST CA in 64-column base64 PKCS#7."""
        self.identity = None
        response, body = self.request("GET", CACERTS)
        self.assertEqual(response.code, 200)
        self.assertEqual(header(response, "Content-Type"), [b"application/pkcs7-mime"])
        self.assertEqual(header(response, "Content-Transfer-Encoding"), [b"base64"])
        self.assertEqual(response.length, len(body))
        pki = demo_pki()
        self.assertEqual(
            pkcs7_certificates(body), [pki.root.certificate, pki.est_ca.certificate]
        )

    def test_head_has_headers_and_no_body(self) -> None:
        """HEAD /cacerts answers 200 with GET's headers and no body."""
        response, body = self.request("HEAD", CACERTS)
        self.assertEqual(response.code, 200)
        self.assertEqual(body, b"")
        self.assertEqual(header(response, "Content-Type"), [b"application/pkcs7-mime"])
        self.assertEqual(header(response, "Content-Transfer-Encoding"), [b"base64"])

    def test_trailing_slash(self) -> None:
        """GET /cacerts/ (trailing slash) is still /cacerts."""
        response, body = self.request("GET", CACERTS + "/")
        self.assertEqual(response.code, 200)
        self.assertEqual(len(pkcs7_certificates(body)), 2)

    def test_accept_header_never_406(self) -> None:
        """An Accept header that does not list pkcs7-mime still gets the bundle."""
        response, _ = self.request("GET", CACERTS, headers={"Accept": "text/html"})
        self.assertEqual(response.code, 200)

    def test_one_line_base64(self) -> None:
        """With base64-line-length 0 the bundle is one base64 line plus CRLF."""
        self.config = demo_config(base64_line_length="0")
        _, body = self.request("GET", CACERTS)
        self.assertEqual(body.count(b"\r\n"), 1)
        self.assertEqual(len(pkcs7_certificates(body, line_length=0)), 2)


class EnrollmentSuccessTests(ResourceTestCase):
    """Successful ``simplereenroll`` / ``simpleenroll``."""

    def test_fioconfig_profile(self) -> None:
        """The fioconfig profile answers 201 and exactly application/pkcs7-mime."""
        csr = reenroll_csr(demo_pki().devices[0])
        response, body = self.reenroll(one_line_base64(csr))
        self.assertEqual(response.code, 201)
        self.assertEqual(header(response, "Content-Type"), [b"application/pkcs7-mime"])
        self.assertEqual(header(response, "Content-Transfer-Encoding"), [b"base64"])
        self.assertEqual(response.length, len(body))
        self.assert_issued(body, csr)

    def test_rfc7030_profile(self) -> None:
        """The rfc7030 profile answers 200 with smime-type=certs-only."""
        self.config = rfc7030_config()
        csr = reenroll_csr(demo_pki().devices[0])
        response, body = self.reenroll(one_line_base64(csr))
        self.assertEqual(response.code, 200)
        self.assertEqual(
            header(response, "Content-Type"),
            [b"application/pkcs7-mime; smime-type=certs-only"],
        )
        self.assertEqual(header(response, "Content-Transfer-Encoding"), [b"base64"])
        self.assertEqual(response.length, len(body))
        self.assert_issued(body, csr)

    def test_simpleenroll_with_matching_subject(self) -> None:
        """simpleenroll issues to a client whose CSR subject is its own."""
        csr = reenroll_csr(demo_pki().devices[0])
        response, body = self.reenroll(one_line_base64(csr), path=ENROLL)
        self.assertEqual(response.code, 201)
        self.assert_issued(body, csr)

    def test_doubled_slash_before_operation(self) -> None:
        """A base URL with a trailing slash (…/est//simplereenroll) still renews."""
        csr = reenroll_csr(demo_pki().devices[0])
        response, body = self.reenroll(
            one_line_base64(csr), path="/.well-known/est//simplereenroll"
        )
        self.assertEqual(response.code, 201)
        self.assert_issued(body, csr)

    def test_tolerant_bodies(self) -> None:
        """CSR bodies wrapped any way, PEM-armoured or unpadded are all accepted."""
        csr = reenroll_csr(demo_pki().devices[0])
        while len(csr) % 3 == 0:  # we need a CSR whose base64 has padding
            csr = reenroll_csr(demo_pki().devices[0])
        text = base64.b64encode(csr)
        pem = x509.load_der_x509_csr(csr).public_bytes(serialization.Encoding.PEM)
        bodies = {
            "crlf-64": b"\r\n".join(text[i : i + 64] for i in range(0, len(text), 64))
            + b"\r\n",
            "lf-76": b"\n".join(text[i : i + 76] for i in range(0, len(text), 76)),
            "blanks": b" \t" + text[:40] + b" \t\r\n" + text[40:] + b"\n\n",
            "pem": pem,
            "no-padding": text.rstrip(b"="),
        }
        for name, body in bodies.items():
            response, content = self.reenroll(body)
            self.assertEqual((name, response.code), (name, 201))
            self.assert_issued(content, csr)

    def test_content_type_case_and_parameters(self) -> None:
        """Content-Type 'Application/PKCS10; charset=utf-8' is application/pkcs10."""
        csr = reenroll_csr(demo_pki().devices[0])
        response, body = self.reenroll(
            one_line_base64(csr), content_type="Application/PKCS10; charset=utf-8"
        )
        self.assertEqual(response.code, 201)
        self.assert_issued(body, csr)

    def test_request_transfer_encoding_header_ignored(self) -> None:
        """A request's Content-Transfer-Encoding header does not change decoding."""
        csr = reenroll_csr(demo_pki().devices[0])
        response, _ = self.request(
            "POST",
            REENROLL,
            one_line_base64(csr),
            headers={"Content-Transfer-Encoding": "binary"},
        )
        self.assertEqual(response.code, 201)


class EnrollmentErrorTests(ResourceTestCase):
    """Every refusal of ``simplereenroll`` / ``simpleenroll``."""

    def test_malformed_body(self) -> None:
        """A body that is not base64 gets 400 saying so."""
        response, body = self.reenroll(b"this is not a CSR!")
        self.assert_error(
            response, body, 400, "the request body is not base64; expected a base64 CSR"
        )

    def test_empty_body(self) -> None:
        """An empty body gets 400 saying so."""
        response, body = self.reenroll(b"")
        self.assert_error(
            response, body, 400, "the request body is empty; expected a base64 CSR"
        )

    def test_bad_csr_signature(self) -> None:
        """A CSR whose signature does not verify gets 400 (no proof of possession)."""
        csr = bytearray(reenroll_csr(demo_pki().devices[0]))
        csr[-1] ^= 0x01  # the last byte belongs to the ECDSA signature
        self.assertIsNotNone(x509.load_der_x509_csr(bytes(csr)))  # still parses
        response, body = self.reenroll(one_line_base64(bytes(csr)))
        self.assert_error(
            response,
            body,
            400,
            "the CSR signature does not verify (no proof of possession)",
        )

    def test_csr_asking_for_ca(self) -> None:
        """A CSR asking for BasicConstraints CA:TRUE gets 400."""
        _, csr = fioconfig_csr(
            demo_pki().devices[0].certificate.subject,
            extensions=[(x509.BasicConstraints(ca=True, path_length=None), True)],
        )
        response, body = self.reenroll(one_line_base64(csr))
        self.assert_error(
            response,
            body,
            400,
            "the CSR asks for a CA certificate (BasicConstraints CA:TRUE)",
        )

    def test_anonymous_reenroll(self) -> None:
        """simplereenroll without a client certificate gets 401."""
        self.identity = None
        csr = reenroll_csr(demo_pki().devices[0])
        response, body = self.reenroll(one_line_base64(csr))
        reason = "re-enrollment needs the client certificate being renewed"
        self.assert_error(response, body, 401, reason)
        self.assertIsNone(header(response, "WWW-Authenticate"))

    def test_anonymous_enroll(self) -> None:
        """simpleenroll without a client certificate gets 401."""
        self.identity = None
        csr = reenroll_csr(demo_pki().devices[0])
        response, body = self.reenroll(one_line_base64(csr), path=ENROLL)
        self.assert_error(response, body, 401, "a client certificate is required")
        self.assertIsNone(header(response, "WWW-Authenticate"))

    def test_subject_mismatch(self) -> None:
        """Renewing with another device's subject gets 403."""
        csr = reenroll_csr(demo_pki().devices[1])
        response, body = self.reenroll(one_line_base64(csr))
        self.assert_error(
            response, body, 403, "CSR subject does not match the client certificate"
        )

    def test_subject_alt_name_mismatch(self) -> None:
        """Renewing with a SubjectAltName the certificate does not have gets 403."""
        device = demo_pki().devices[0]
        _, csr = fioconfig_csr(
            device.certificate.subject,
            extensions=[
                (x509.SubjectAlternativeName([x509.DNSName("evil.example")]), False)
            ],
        )
        response, body = self.reenroll(one_line_base64(csr))
        self.assert_error(
            response,
            body,
            403,
            "CSR SubjectAltName does not match the client certificate",
        )

    def test_enroll_subject_any(self) -> None:
        """With enroll-subject = any, simpleenroll takes any subject, reenroll not."""
        self.config = demo_config(enroll_subject="any")
        csr = reenroll_csr(demo_pki().devices[1])
        response, body = self.reenroll(one_line_base64(csr), path=ENROLL)
        self.assertEqual(response.code, 201)
        self.assert_issued(body, csr)
        response, body = self.reenroll(one_line_base64(csr))
        self.assert_error(
            response, body, 403, "CSR subject does not match the client certificate"
        )

    def test_missing_content_type(self) -> None:
        """A POST without Content-Type gets 415."""
        csr = reenroll_csr(demo_pki().devices[0])
        response, body = self.reenroll(one_line_base64(csr), content_type=None)
        self.assert_error(
            response, body, 415, "Content-Type must be application/pkcs10, not none"
        )

    def test_wrong_content_type(self) -> None:
        """A POST with a Content-Type other than application/pkcs10 gets 415."""
        csr = reenroll_csr(demo_pki().devices[0])
        response, body = self.reenroll(one_line_base64(csr), content_type="text/plain")
        self.assert_error(
            response,
            body,
            415,
            "Content-Type must be application/pkcs10, not text/plain",
        )

    def test_get_on_enroll(self) -> None:
        """GET on simplereenroll gets 405 with Allow: POST."""
        response, body = self.request("GET", REENROLL)
        self.assert_error(response, body, 405, "method not allowed; use POST")
        self.assertEqual(header(response, "Allow"), [b"POST"])

    def test_post_on_cacerts(self) -> None:
        """POST on cacerts gets 405 with Allow: GET, HEAD."""
        response, body = self.request("POST", CACERTS, b"x", content_type=PKCS10)
        self.assert_error(response, body, 405, "method not allowed; use GET or HEAD")
        self.assertEqual(header(response, "Allow"), [b"GET, HEAD"])

    def test_unexpected_exception_is_500_and_logged(self) -> None:
        """A bug while enrolling gets a bland 500; the traceback goes to the log."""
        secret = "the CA database is on fire at /srv/secret-path"

        def broken_enroll(*args: object) -> None:
            raise RuntimeError(secret)

        self.patch(estd.web, "enroll", broken_enroll)
        csr = reenroll_csr(demo_pki().devices[0])
        with capturedLogs() as events:
            response, body = self.reenroll(one_line_base64(csr))
        self.assert_error(
            response, body, 500, "internal server error; see the server log"
        )
        for leaked in (secret.encode(), b"Traceback", b"RuntimeError"):
            self.assertNotIn(leaked, body)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        failures = [event for event in events if "log_failure" in event]
        self.assertEqual(len(failures), 1)
        self.assertEqual(str(failures[0]["log_failure"].value), secret)
        self.assertEqual(failures[0]["path"], REENROLL)
        self.assertEqual(failures[0]["log_namespace"], "estd")
        lines = [event for event in estd_events(events) if "status" in event]
        self.assertEqual([event["status"] for event in lines], [500])

    def test_client_gone_while_signing(self) -> None:
        """A client hanging up during signing causes no write and no logged error."""
        self.threadpool = HeldThreadPool()
        site = self.site()
        channel = site.buildProtocol(None)
        transport = WriteCountingTransport()
        channel.makeConnection(transport)
        body = one_line_base64(reenroll_csr(demo_pki().devices[0]))
        channel.dataReceived(
            b"POST " + REENROLL.encode() + b" HTTP/1.1\r\nHost: est.test\r\n"
            b"Content-Type: application/pkcs10\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        self.assertEqual(len(self.threadpool.queued), 1)
        with capturedLogs() as events:
            channel.connectionLost(Failure(ConnectionResetError()))
            self.threadpool.run_all()
        self.assertEqual(transport.writes, [])
        self.assertEqual([e for e in events if "log_failure" in e], [])
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_client_gone_while_signing_is_logged(self) -> None:
        """A request whose client hangs up during signing still gets its log line."""
        self.threadpool = HeldThreadPool()
        channel = self.site().buildProtocol(None)
        channel.makeConnection(WriteCountingTransport())
        body = one_line_base64(reenroll_csr(demo_pki().devices[0]))
        with capturedLogs() as events:
            channel.dataReceived(
                b"POST " + REENROLL.encode() + b" HTTP/1.1\r\nHost: est.test\r\n"
                b"Content-Type: application/pkcs10\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            channel.connectionLost(Failure(ConnectionResetError()))
            self.threadpool.run_all()
        lines = [event for event in estd_events(events) if "method" in event]
        self.assertEqual(
            [(event["method"], event["path"]) for event in lines], [("POST", REENROLL)]
        )


class NotFoundTests(ResourceTestCase):
    """Paths that are no EST resource estd serves."""

    def assert_not_found(self, method: str, path: str, reason: str) -> None:
        """``method path`` gets 404 with ``reason``."""
        body = b"x" if method == "POST" else None
        response, content = self.request(method, path, body)
        self.assert_error(response, content, 404, reason)

    def test_unknown_operation(self) -> None:
        """An unknown operation name gets 404 naming it."""
        self.assert_not_found(
            "GET",
            "/.well-known/est/frobnicate",
            "unknown EST operation or CA label 'frobnicate'",
        )

    def test_unknown_label(self) -> None:
        """An unknown CA label before an operation gets 404 naming it."""
        self.assert_not_found(
            "GET",
            "/.well-known/est/nolabel/cacerts",
            "unknown EST operation or CA label 'nolabel'",
        )

    def test_unknown_path(self) -> None:
        """A path outside /.well-known/est gets 404."""
        reason = "not an EST path; EST lives under /.well-known/est/"
        self.assert_not_found("GET", "/index.html", reason)
        self.assert_not_found("GET", "/.well-known/acme-challenge/x", reason)
        self.assert_not_found("GET", "/.well-known", reason)

    def test_root(self) -> None:
        """The site root gets 404."""
        self.assert_not_found(
            "GET", "/", "not an EST path; EST lives under /.well-known/est/"
        )

    def test_est_directory_itself(self) -> None:
        """/.well-known/est itself (with or without slash) gets 404."""
        for path in ("/.well-known/est", "/.well-known/est/"):
            self.assert_not_found("GET", path, "no EST operation in the path")

    def test_serverkeygen_off_by_default(self) -> None:
        """/serverkeygen gets 404 saying how to turn it on, whatever the method."""
        for method in ("GET", "POST"):
            self.assert_not_found(
                method,
                "/.well-known/est/serverkeygen",
                "serverkeygen is not enabled here (serverkeygen = yes turns it on)",
            )

    def test_extra_segment_after_operation(self) -> None:
        """A path segment after the operation gets 404."""
        self.assert_not_found("GET", CACERTS + "/extra", "no such EST resource")
        self.assert_not_found("POST", REENROLL + "/extra", "no such EST resource")

    def test_encoded_newline_stays_one_line(self) -> None:
        """A path with an encoded line break still gets a one-line 404 body."""
        self.assert_not_found(
            "GET",
            "/.well-known/est/a%0D%0Ab",
            "unknown EST operation or CA label 'a\\r\\nb'",
        )


# --- The wire: EstChannel over a StringTransport -------------------------------------


class WireTests(SynchronousTestCase):
    """Bytes in, bytes out, on one ``EstChannel``."""

    def setUp(self) -> None:
        self.device = demo_pki().devices[0]
        self.identity: ClientIdentity | None = identity_of(self.device)
        self.patch(estd.site, "client_identity", lambda transport: self.identity)
        self.clock = ThreadlessClock()
        self.clock.advance(1_800_000_000)
        self.site = build_site(fioconfig_config, self.clock, SynchronousThreadPool())
        self.channel = self.site.buildProtocol(None)
        self.transport = WriteCountingTransport()
        self.channel.makeConnection(self.transport)

    def post_head(self, length: bytes | None, *extra: bytes) -> bytes:
        """The request line and headers of a simplereenroll POST."""
        lines = [
            b"POST " + REENROLL.encode() + b" HTTP/1.1",
            b"Host: est.test",
            b"Content-Type: application/pkcs10",
        ]
        if length is not None:
            lines.append(b"Content-Length: " + length)
        lines.extend(extra)
        return b"\r\n".join(lines) + b"\r\n\r\n"

    def csr_body(self) -> tuple[bytes, bytes]:
        """A fioconfig CSR for our device: (DER, body)."""
        csr = reenroll_csr(self.device)
        return csr, one_line_base64(csr)

    def assert_single_write_response(
        self, raw: bytes, status_line: bytes
    ) -> tuple[list[tuple[bytes, bytes]], bytes]:
        """``raw`` is one whole response with Content-Length and no chunking."""
        status, headers, body = parse_raw_response(raw)
        self.assertEqual(status, status_line)
        names = [name for name, _ in headers]
        self.assertIn(b"Content-Type", names)
        self.assertIn((b"Content-Length", b"%d" % len(body)), headers)
        self.assertNotIn(b"transfer-encoding", [name.lower() for name in names])
        # strongSwan's pki reads a response header of under 1 KiB.
        self.assertLess(len(raw) - len(body), 1024)
        return headers, body

    def test_cacerts_in_one_write(self) -> None:
        """The cacerts header block and body leave in one write with Content-Length."""
        self.channel.dataReceived(
            b"GET " + CACERTS.encode() + b" HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        self.assertEqual(len(self.transport.writes), 1)
        headers, body = self.assert_single_write_response(
            self.transport.writes[0], b"HTTP/1.1 200 OK"
        )
        self.assertIn((b"Content-Type", b"application/pkcs7-mime"), headers)
        self.assertIn((b"Content-Transfer-Encoding", b"base64"), headers)
        self.assertEqual(body, fioconfig_config().default.cacerts_body)

    def test_head_in_one_write(self) -> None:
        """A HEAD response is one write of headers with GET's Content-Length."""
        self.channel.dataReceived(
            b"HEAD " + CACERTS.encode() + b" HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        self.assertEqual(len(self.transport.writes), 1)
        status, headers, body = parse_raw_response(self.transport.writes[0])
        self.assertEqual((status, body), (b"HTTP/1.1 200 OK", b""))
        length = len(fioconfig_config().default.cacerts_body)
        self.assertIn((b"Content-Length", b"%d" % length), headers)

    def test_enrollment_in_one_write(self) -> None:
        """A renewal's 201 response leaves in one write with Content-Length."""
        _, body = self.csr_body()
        self.channel.dataReceived(self.post_head(b"%d" % len(body)) + body)
        self.assertEqual(len(self.transport.writes), 1)
        headers, payload = self.assert_single_write_response(
            self.transport.writes[0], b"HTTP/1.1 201 Created"
        )
        self.assertIn((b"Content-Type", b"application/pkcs7-mime"), headers)
        self.assertEqual(len(pkcs7_certificates(payload)), 1)

    def test_error_in_one_write(self) -> None:
        """An error response leaves in one write with Content-Length."""
        self.channel.dataReceived(b"GET /nothing HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(len(self.transport.writes), 1)
        headers, body = self.assert_single_write_response(
            self.transport.writes[0], b"HTTP/1.1 404 Not Found"
        )
        self.assertIn((b"Content-Type", b"text/plain; charset=utf-8"), headers)
        self.assertEqual(body, b"not an EST path; EST lives under /.well-known/est/\n")

    def test_oversized_body_refused_at_once(self) -> None:
        """A Content-Length over 64 KiB gets 413 at once, no 100 Continue, a close."""
        self.channel.dataReceived(self.post_head(b"65537", b"Expect: 100-continue"))
        body = b"the request body is over 65536 bytes\n"
        self.assertEqual(
            self.transport.writes,
            [
                b"HTTP/1.1 413 Payload Too Large\r\n"
                b"Server: estd\r\n"
                b"Content-Type: text/plain; charset=utf-8\r\n"
                b"Content-Length: %d\r\n"
                b"Connection: close\r\n\r\n" % len(body) + body
            ],
        )
        self.assertTrue(self.transport.disconnecting)

    def test_body_of_exactly_64_kib_is_read(self) -> None:
        """A Content-Length of exactly 64 KiB is not refused: 100 Continue is sent."""
        self.channel.dataReceived(self.post_head(b"65536", b"Expect: 100-continue"))
        self.assertEqual(self.transport.writes, [b"HTTP/1.1 100 Continue\r\n\r\n"])
        self.assertFalse(self.transport.disconnecting)

    def test_oversized_chunked_body_refused(self) -> None:
        """A chunked body that grows past 64 KiB gets 413 and a close."""
        self.channel.dataReceived(self.post_head(None, b"Transfer-Encoding: chunked"))
        chunk = b"A" * 0x8000
        for _ in range(2):
            self.channel.dataReceived(b"8000\r\n" + chunk + b"\r\n")
        self.assertEqual(self.transport.writes, [])
        self.channel.dataReceived(b"1\r\nA\r\n")
        self.assertEqual(len(self.transport.writes), 1)
        self.assertTrue(
            self.transport.writes[0].startswith(b"HTTP/1.1 413 Payload Too Large\r\n")
        )
        self.assertTrue(self.transport.disconnecting)

    def test_chunked_request_body(self) -> None:
        """A CSR sent with Transfer-Encoding: chunked is renewed."""
        _, body = self.csr_body()
        half = len(body) // 2
        chunks = b"".join(
            b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:half], body[half:])
        )
        self.channel.dataReceived(
            self.post_head(None, b"Transfer-Encoding: chunked") + chunks + b"0\r\n\r\n"
        )
        self.assertEqual(len(self.transport.writes), 1)
        _, payload = self.assert_single_write_response(
            self.transport.writes[0], b"HTTP/1.1 201 Created"
        )
        self.assertEqual(len(pkcs7_certificates(payload)), 1)

    def test_expect_continue(self) -> None:
        """With Expect: 100-continue the client is told to continue, then renewed."""
        _, body = self.csr_body()
        self.channel.dataReceived(
            self.post_head(b"%d" % len(body), b"Expect: 100-continue")
        )
        self.assertEqual(self.transport.writes, [b"HTTP/1.1 100 Continue\r\n\r\n"])
        self.channel.dataReceived(body)
        self.assertEqual(len(self.transport.writes), 2)
        self.assert_single_write_response(
            self.transport.writes[1], b"HTTP/1.1 201 Created"
        )

    def test_one_log_line_per_request(self) -> None:
        """Each request logs one line: who asked, what, the outcome, what was issued."""
        _, body = self.csr_body()
        with capturedLogs() as events:
            self.channel.dataReceived(
                b"GET " + CACERTS.encode() + b"?x=1 HTTP/1.1\r\nHost: x\r\n\r\n"
            )
            self.channel.dataReceived(self.post_head(b"%d" % len(body)) + body)
        cacerts_line, enroll_line = estd_events(events)
        lines = [enroll_line, cacerts_line]
        _, payload = self.assert_single_write_response(
            self.transport.writes[1], b"HTTP/1.1 201 Created"
        )
        issued = pkcs7_certificates(payload)[0]
        subject = self.device.certificate.subject.rfc4514_string()
        expected = {
            "client_address": "192.0.2.7",
            "method": "POST",
            "path": REENROLL,
            "status": 201,
            "bytes": len(payload),
            "client_subject": subject,
            "client_serial": serial_hex(self.device.certificate.serial_number),
            "issued_serial": serial_hex(issued.serial_number),
        }
        self.assertEqual({key: lines[0][key] for key in expected}, expected)
        self.assertEqual(lines[0]["log_level"].name, "info")
        self.assertIn(
            f"issued_serial={serial_hex(issued.serial_number)}", formatEvent(lines[0])
        )
        self.assertEqual(
            {
                key: lines[1][key]
                for key in ("method", "path", "status", "issued_serial")
            },
            {"method": "GET", "path": CACERTS, "status": 200, "issued_serial": None},
        )

    def test_delivered_certificate_closes_the_connection(self) -> None:
        """A 201 says Connection: close and closes; a refusal leaves it open."""
        _, body = self.csr_body()
        bad = b"MIIB" + b"Q" * 200 + b"!"
        self.channel.dataReceived(self.post_head(b"%d" % len(bad)) + bad)
        refused, _ = self.assert_single_write_response(
            self.transport.writes[0], b"HTTP/1.1 400 Bad Request"
        )
        self.assertNotIn(b"Connection", [name for name, _ in refused])
        self.assertFalse(self.transport.disconnecting)
        self.channel.dataReceived(self.post_head(b"%d" % len(body)) + body)
        delivered, _ = self.assert_single_write_response(
            self.transport.writes[1], b"HTTP/1.1 201 Created"
        )
        self.assertIn((b"Connection", b"close"), delivered)
        self.assertTrue(self.transport.disconnecting)

    def test_anonymous_log_line(self) -> None:
        """A request without a client certificate logs client_subject as None."""
        self.identity = None
        with capturedLogs() as events:
            self.channel.dataReceived(
                b"GET " + CACERTS.encode() + b" HTTP/1.1\r\nHost: x\r\n\r\n"
            )
        (line,) = estd_events(events)
        self.assertEqual(
            (line["client_subject"], line["issued_serial"], line["status"]),
            (None, None, 200),
        )

    def test_logs_hold_no_csr_or_key(self) -> None:
        """No log event carries the CSR body or any private key."""
        csr, body = self.csr_body()
        bad = b"MIIB" + b"Q" * 200 + b"!"
        with capturedLogs() as events:
            # The refused one first: a delivered certificate closes the connection.
            self.channel.dataReceived(self.post_head(b"%d" % len(bad)) + bad)
            self.channel.dataReceived(self.post_head(b"%d" % len(body)) + body)
        self.assertEqual(len(estd_events(events)), 2)
        pki = demo_pki()
        secrets = [body, body[20:60], bad[:40], csr[10:40]]
        for pair in (pki.est_ca, self.device, pki.tls):
            secrets.append(pair.key_pem().splitlines()[1])
        for event in events:
            text = event_text(event).encode()
            for secret in secrets:
                self.assertNotIn(secret, text)

    def test_refused_body_log_names_method_and_path(self) -> None:
        """The log line of a 413 names the request's method and path."""
        with capturedLogs() as events:
            self.channel.dataReceived(self.post_head(b"65537"))
        (line,) = estd_events(events)
        self.assertEqual(
            (line["method"], line["path"], line["status"]), ("POST", REENROLL, 413)
        )

    def test_idle_timeout_runs_on_the_site_clock(self) -> None:
        """An idle connection is dropped after the timeout on estd's own clock."""
        site = build_site(fioconfig_config, self.clock, SynchronousThreadPool())
        channel = site.buildProtocol(None)
        transport = WriteCountingTransport()
        channel.makeConnection(transport)
        self.addCleanup(channel.setTimeout, None)  # leave no call on a real reactor
        self.clock.advance(site.timeOut + 1)
        self.assertTrue(transport.disconnecting)
