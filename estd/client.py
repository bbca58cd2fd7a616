"""A small blocking EST client (RFC 7030) for operators, tests and benchmarks.

Each operation opens its own TLS connection, because the CSR may carry the
channel binding of that connection (RFC 7030 §3.5): the CSR is built after
the handshake, by a ``make_csr(channel_binding)`` callback, and sent on the
same connection.  pyOpenSSL is used rather than :mod:`ssl` since the stdlib
exposes neither the TLS 1.2 Finished message (tls-unique, RFC 5929) nor the
TLS 1.3 exporter (tls-exporter, RFC 9266).

The HTTP side is sans-IO: :func:`encode_request`, :func:`parse_response`,
:func:`expected_length` and :class:`Exchange` work on bytes, so the rules
clients depend on (Basic credentials only after a challenge, reading to
Content-Length or to the close) are tested without sockets.
"""

from __future__ import annotations

import base64
import datetime
import email
import email.message
import email.utils
import functools
import ipaddress
import select
import socket
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import service_identity
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    PrivateKeyTypes,
)
from cryptography.hazmat.primitives.serialization import pkcs7
from OpenSSL import SSL, crypto
from service_identity.pyopenssl import verify_hostname, verify_ip_address

from estd.clienthttp import (
    MAX_RESPONSE_BYTES,
    BasicCredentials,
    EstClientError,
    EstConnectionError,
    EstFailure,
    EstProtocolError,
    EstRetryLater,
    Exchange,
    HttpResponse,
    encode_request,
    expected_length,
    offers_basic,
    parse_response,
)
from estd.csrs import KEY_TYPES, build_csr, make_key
from estd.errors import BadRequest
from estd.wire import decode_body, media_type

EST_PATH = "/.well-known/est"

MakeCsr = Callable[[bytes | None], bytes]
"""Builds the DER CSR, given the channel binding of the live connection."""

_T = TypeVar("_T")
_TLS_VERSIONS = {"1.2": SSL.TLS1_2_VERSION, "1.3": SSL.TLS1_3_VERSION}


# --- TLS ------------------------------------------------------------------------------

# OpenSSL's X509_V_ERR_* codes an operator is likely to meet, in words.
_VERIFY_ERRORS = {
    2: "its issuer is not in the --cacert file",
    9: "it is not yet valid",
    10: "it has expired",
    18: "it is self-signed and not in the --cacert file",
    19: "its chain ends in a self-signed certificate not in the --cacert file",
    20: "its issuer is not in the --cacert file",
    21: "its issuer is not in the --cacert file",
    7: "its signature does not verify",
}


def _ssl_reason(exc: SSL.Error) -> str:
    reasons = [
        str(item[2])
        for item in (exc.args[0] if exc.args and isinstance(exc.args[0], list) else [])
        if isinstance(item, tuple) and len(item) == 3
    ]
    return "; ".join(reasons) or str(exc) or type(exc).__name__


@dataclass
class _VerifyState:
    failure: tuple[int, int, str] | None = None


class _TlsConnection:
    """One TLS connection with a deadline: connect, verify, write, read, close."""

    def __init__(
        self, context: SSL.Context, host: str, port: int, cacert: str, timeout: float
    ) -> None:
        self.deadline = time.monotonic() + timeout
        self.host = host
        self.state = _VerifyState()
        try:
            self.sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            reason = exc.strerror or str(exc) or type(exc).__name__
            raise EstConnectionError(
                f"cannot connect to {host}:{port}: {reason}"
            ) from None
        self.connection = SSL.Connection(context, self.sock)
        self.connection.set_app_data(self.state)
        self.connection.set_connect_state()
        ip = _ip_or_none(host)
        if ip is None:
            # SNI carries host names only (RFC 6066 §3).
            self.connection.set_tlsext_host_name(host.encode("idna"))
        try:
            self._io(self.connection.do_handshake)
        except SSL.Error as exc:
            self.close()
            raise self._handshake_error(exc, cacert) from None
        except EstFailure:
            self.close()
            raise
        try:
            if ip is None:
                verify_hostname(self.connection, host)
            else:
                verify_ip_address(self.connection, ip)
        except (
            service_identity.VerificationError,
            service_identity.CertificateError,
        ) as exc:
            self.close()
            raise EstConnectionError(
                f"TLS: the server certificate is not valid for {host}: {exc}"
            ) from None

    def _handshake_error(self, exc: SSL.Error, cacert: str) -> EstConnectionError:
        if self.state.failure is not None:
            errno, depth, subject = self.state.failure
            why = _VERIFY_ERRORS.get(errno, f"OpenSSL verify error {errno}")
            which = "server certificate" if depth == 0 else "certificate"
            return EstConnectionError(
                f"TLS: the {which} {subject} does not verify against {cacert}: {why}"
            )
        return EstConnectionError(f"TLS handshake failed: {_ssl_reason(exc)}")

    @property
    def tls_version(self) -> str:
        """ "TLSv1.2" or "TLSv1.3"."""
        return self.connection.get_protocol_version_name()

    def channel_binding(self) -> bytes | None:
        """tls-unique on TLS 1.2 (RFC 5929), tls-exporter on TLS 1.3 (RFC 9266)."""
        version = self.tls_version
        if version == "TLSv1.3":
            return self.connection.export_keying_material(
                b"EXPORTER-Channel-Binding", 32
            )
        if version == "TLSv1.2":
            # The first Finished of a full handshake is the client's (we
            # never resume sessions, which would make it the server's).
            return self.connection.get_finished()
        return None

    def _io(self, operation: Callable[[], _T]) -> _T:
        # The socket has a timeout, so it is non-blocking underneath and
        # OpenSSL asks us to wait; we wait only as long as the deadline allows.
        while True:
            try:
                return operation()
            except (SSL.WantReadError, SSL.WantWriteError) as want:
                remaining = self.deadline - time.monotonic()
                if remaining <= 0:
                    raise EstConnectionError(
                        "timed out waiting for the server"
                    ) from None
                if isinstance(want, SSL.WantReadError):
                    ready = select.select([self.sock], [], [], remaining)[0]
                else:
                    ready = select.select([], [self.sock], [], remaining)[1]
                if not ready:
                    raise EstConnectionError(
                        "timed out waiting for the server"
                    ) from None

    def send(self, data: bytes) -> None:
        """Write all of ``data``."""
        view = memoryview(data)
        try:
            while view:
                sent = self._io(functools.partial(self.connection.send, view))
                view = view[sent:]
        except SSL.Error as exc:
            raise EstConnectionError(
                f"TLS: sending the request failed: {_ssl_reason(exc)}"
            ) from None

    def read_response(self) -> bytes:
        """Read one response: to its Content-Length, or until the server closes."""
        buffer = bytearray()
        while True:
            try:
                chunk = self._io(lambda: self.connection.recv(65536))
            except SSL.ZeroReturnError:
                break
            except SSL.SysCallError as exc:
                if exc.args and exc.args[0] == -1 and buffer:
                    break  # closed without close_notify after an answer
                raise EstConnectionError(
                    f"the connection broke: {_ssl_reason(exc)}"
                ) from None
            except SSL.Error as exc:
                raise EstConnectionError(
                    f"TLS: the server refused the connection: {_ssl_reason(exc)}"
                ) from None
            if not chunk:
                break
            buffer += chunk
            if len(buffer) > MAX_RESPONSE_BYTES:
                raise EstProtocolError("the response is larger than 1 MiB")
            length = expected_length(bytes(buffer))
            if length is not None and len(buffer) >= length:
                break
        return bytes(buffer)

    def close(self) -> None:
        """Send close_notify if possible and close the socket."""
        try:
            self.connection.shutdown()
        except (SSL.Error, OSError):
            pass
        self.sock.close()


def _verify_callback(
    connection: SSL.Connection, cert: crypto.X509, errno: int, depth: int, ok: int
) -> bool:
    state = connection.get_app_data()
    if not ok and isinstance(state, _VerifyState) and state.failure is None:
        subject = cert.to_cryptography().subject.rfc4514_string()
        state.failure = (errno, depth, subject)
    return bool(ok)


def _ip_or_none(host: str) -> str | None:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise EstFailure(f"cannot read {what} {path}: {exc.strerror}") from None


def load_certificates(
    path: str, what: str = "certificate file"
) -> list[x509.Certificate]:
    """Every PEM certificate in ``path`` (at least one)."""
    try:
        certificates = x509.load_pem_x509_certificates(_read(path, what))
    except ValueError:
        raise EstFailure(f"{path}: no PEM certificate in the {what}") from None
    return certificates


def load_private_key(path: str) -> PrivateKeyTypes:
    """An unencrypted PEM private key."""
    try:
        return serialization.load_pem_private_key(_read(path, "key"), None)
    except TypeError:
        raise EstFailure(
            f"{path}: the key is encrypted; give an unencrypted key"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise EstFailure(f"{path}: not a PEM private key") from None


def _client_context(
    cacert: str, cert: str | None, key: str | None, tls_max: str | None
) -> SSL.Context:
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)  # RFC 8996
    if tls_max is not None:
        if tls_max not in _TLS_VERSIONS:
            raise ValueError(f"tls_max must be one of {sorted(_TLS_VERSIONS)}")
        context.set_max_proto_version(_TLS_VERSIONS[tls_max])
    context.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION)
    load_certificates(cacert, "--cacert file")  # a clear error before OpenSSL's
    try:
        context.load_verify_locations(cacert)
    except SSL.Error:
        raise EstFailure(f"{cacert}: OpenSSL cannot load the --cacert file") from None
    context.set_verify(SSL.VERIFY_PEER, _verify_callback)
    if cert is not None:
        if key is None:
            raise EstFailure("a client certificate needs its key (--key)")
        # Like fioconfig: every certificate of the file is sent, leaf first.
        leaf, *chain = load_certificates(cert, "--cert file")
        context.use_certificate(leaf)
        for extra in chain:
            context.add_extra_chain_cert(extra)
        private_key = load_private_key(key)
        if not isinstance(private_key, _TLS_KEY_TYPES):
            raise EstFailure(f"{key}: unsupported key type for TLS")
        try:
            context.use_privatekey(private_key)
            context.check_privatekey()
        except SSL.Error:
            raise EstFailure(
                f"{key} is not the key of the certificate in {cert}"
            ) from None
    return context


_TLS_KEY_TYPES = (
    ec.EllipticCurvePrivateKey,
    rsa.RSAPrivateKey,
    ed25519.Ed25519PrivateKey,
)

# --- The EST client -------------------------------------------------------------------


def _split_url(base_url: str) -> tuple[str, int, str]:
    parts = urllib.parse.urlsplit(base_url)
    if parts.scheme.lower() != "https" or not parts.hostname:
        raise EstFailure(f"{base_url}: not an https:// URL")
    try:
        port = parts.port or 443
    except ValueError:
        raise EstFailure(f"{base_url}: bad port") from None
    path = parts.path.rstrip("/") or EST_PATH
    return parts.hostname, port, path


class EstClient:
    """A blocking EST client: one TLS connection per operation.

    ``base_url`` is ``https://host:port/.well-known/est`` (the path is
    added when missing); ``label`` selects a CA label (RFC 7030 §3.2.2).
    ``cert``/``key`` authenticate with TLS (every certificate in ``cert`` is
    sent, like fioconfig), ``user``/``password`` with HTTP Basic, sent only
    after the server challenges unless ``preemptive_auth``.
    """

    def __init__(
        self,
        base_url: str,
        *,
        cacert: str,
        cert: str | None = None,
        key: str | None = None,
        user: str | None = None,
        password: str | None = None,
        label: str | None = None,
        timeout: float = 30,
        tls_max: str | None = None,
        preemptive_auth: bool = False,
    ) -> None:
        self.host, self.port, path = _split_url(base_url)
        if label:
            if "/" in label:
                raise EstFailure(f"{label}: a CA label is one path segment")
            path = f"{path}/{urllib.parse.quote(label, safe='')}"
        self.path = path
        self.cacert = cacert
        self.timeout = timeout
        self.credentials: BasicCredentials | None = None
        if user is not None:
            if password is None:
                raise EstFailure(f"no password for user {user}")
            self.credentials = BasicCredentials(user, password, preemptive_auth)
        self.context = _client_context(cacert, cert, key, tls_max)
        self.last_response: HttpResponse | None = None
        self.last_tls_version: str | None = None
        self.last_channel_binding: bytes | None = None

    @property
    def host_header(self) -> str:
        """The Host header value: host, bracketed if IPv6, and port if not 443."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == 443 else f"{host}:{self.port}"

    def url(self, operation: str) -> str:
        """The full URL of an operation."""
        return f"https://{self.host_header}{self.path}/{operation}"

    def _perform(
        self,
        method: str,
        operation: str,
        content_type: str | None = None,
        make_body: Callable[[bytes | None], bytes] | None = None,
    ) -> HttpResponse:
        exchange = Exchange(
            method,
            f"{self.path}/{operation}",
            self.host_header,
            content_type=content_type,
            make_body=make_body,
            credentials=self.credentials,
        )
        while True:
            connection = _TlsConnection(
                self.context, self.host, self.port, self.cacert, self.timeout
            )
            try:
                binding = connection.channel_binding()
                self.last_tls_version = connection.tls_version
                self.last_channel_binding = binding
                connection.send(exchange.request(binding))
                raw = connection.read_response()
            finally:
                connection.close()
            response = exchange.receive(raw)
            if response is not None:
                self.last_response = response
                return response

    @staticmethod
    def _enroll_body(make_csr: MakeCsr) -> Callable[[bytes | None], bytes]:
        def body(channel_binding: bytes | None) -> bytes:
            # One line of padded base64, as fioconfig posts it.
            return base64.b64encode(make_csr(channel_binding))

        return body

    def cacerts(self) -> list[x509.Certificate]:
        """The CA certificates the server distributes (RFC 7030 §4.1)."""
        response = expect_success(self._perform("GET", "cacerts"))
        return _certificates(response, "cacerts")

    def csrattrs(self) -> bytes | None:
        """The DER CSR attributes (RFC 7030 §4.5), or None if there are none."""
        response = self._perform("GET", "csrattrs")
        if response.status in (204, 404):
            return None
        expect_success(response)
        if not response.body.strip():
            return None
        return _der(response.body, "csrattrs")

    def _enroll(self, operation: str, make_csr: MakeCsr) -> x509.Certificate:
        response = self._perform(
            "POST",
            operation,
            "application/pkcs10",
            self._enroll_body(make_csr),
        )
        expect_success(response)
        # RFC 7030 §4.2.3: the issued certificate; fioconfig takes the first.
        return _certificates(response, operation)[0]

    def simpleenroll(self, make_csr: MakeCsr) -> x509.Certificate:
        """Enroll (RFC 7030 §4.2.1) and return the issued certificate."""
        return self._enroll("simpleenroll", make_csr)

    def simplereenroll(self, make_csr: MakeCsr) -> x509.Certificate:
        """Re-enroll (RFC 7030 §4.2.2) and return the issued certificate."""
        return self._enroll("simplereenroll", make_csr)

    def serverkeygen(
        self, make_csr: MakeCsr
    ) -> tuple[PrivateKeyTypes, x509.Certificate]:
        """Have the server make the key (RFC 7030 §4.4); return key and certificate."""
        response = self._perform(
            "POST",
            "serverkeygen",
            "application/pkcs10",
            self._enroll_body(make_csr),
        )
        expect_success(response)
        return parse_serverkeygen(response.header("Content-Type") or "", response.body)


def _retry_after(value: str | None) -> int | None:
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return int(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    delta = when - datetime.datetime.now(datetime.UTC)
    return max(0, int(delta.total_seconds()))


def expect_success(response: HttpResponse) -> HttpResponse:
    """Return a 200/201 response; raise what any other status means in EST.

    202 is :class:`EstRetryLater` with the Retry-After seconds (RFC 7030
    §4.2.3); other statuses are :class:`EstClientError` with the first line
    of the server's text.
    """
    if response.status in (200, 201):
        return response
    if response.status == 202:
        raise EstRetryLater(_retry_after(response.header("Retry-After")))
    text = response.body.decode("utf-8", "replace").strip()
    first_line = text.splitlines()[0][:200] if text else response.reason
    raise EstClientError(response.status, first_line)


def _der(body: bytes, what: str) -> bytes:
    try:
        return decode_body(body, what)
    except BadRequest:
        raise EstProtocolError(f"the {what} response is not base64") from None


def _certificates(response: HttpResponse, operation: str) -> list[x509.Certificate]:
    der = _der(response.body, operation)
    try:
        certificates = pkcs7.load_der_pkcs7_certificates(der)
    except ValueError:
        kind = response.header("Content-Type") or "no Content-Type"
        raise EstProtocolError(
            f"the {operation} response is not a certs-only PKCS#7 ({kind})"
        ) from None
    if not certificates:
        raise EstProtocolError(f"the {operation} response holds no certificate")
    return certificates


def parse_serverkeygen(
    content_type: str, body: bytes
) -> tuple[PrivateKeyTypes, x509.Certificate]:
    """Split a serverkeygen answer (RFC 7030 §4.4.2) into key and certificate.

    The body is ``multipart/mixed``: an ``application/pkcs8`` part with the
    base64 PKCS#8 key, then an ``application/pkcs7-mime`` certs-only part.
    Parts are found by type, and their base64 is decoded liberally whatever
    their Content-Transfer-Encoding says (RFC 8951).
    """
    if media_type(content_type) != "multipart/mixed":
        raise EstProtocolError(
            f"serverkeygen: expected multipart/mixed, got {content_type or 'nothing'}"
        )
    message = email.message_from_bytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body
    )
    parts: dict[str, bytes] = {}
    if message.is_multipart():
        for part in message.get_payload():
            assert isinstance(part, email.message.Message)
            payload = part.get_payload()
            if isinstance(payload, str):
                data = payload.encode("ascii", "surrogateescape")
                parts.setdefault(part.get_content_type(), data)
    if "application/pkcs8" not in parts:
        if "application/pkcs7-mime" in parts and len(parts) > 1:
            raise EstProtocolError(
                "serverkeygen: the key is encrypted (CMS); only PKCS#8 is supported"
            )
        raise EstProtocolError("serverkeygen: no application/pkcs8 key part")
    if "application/pkcs7-mime" not in parts:
        raise EstProtocolError("serverkeygen: no application/pkcs7-mime part")
    try:
        key = serialization.load_der_private_key(
            _der(parts["application/pkcs8"], "serverkeygen key"), None
        )
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise EstProtocolError("serverkeygen: the key part is not PKCS#8") from None
    try:
        certificates = pkcs7.load_der_pkcs7_certificates(
            _der(parts["application/pkcs7-mime"], "serverkeygen certificate")
        )
    except ValueError:
        raise EstProtocolError(
            "serverkeygen: the certificate part is not a certs-only PKCS#7"
        ) from None
    if not certificates:
        raise EstProtocolError("serverkeygen: no certificate in the response")
    certificate = certificates[0]
    if _public_der(key) != _public_der_of_cert(certificate):
        raise EstProtocolError("serverkeygen: the key does not match the certificate")
    return key, certificate


def _public_der(key: PrivateKeyTypes) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _public_der_of_cert(certificate: x509.Certificate) -> bytes:
    return certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


__all__ = [
    "EST_PATH",
    "KEY_TYPES",
    "EstClient",
    "EstClientError",
    "EstConnectionError",
    "EstFailure",
    "EstProtocolError",
    "EstRetryLater",
    "Exchange",
    "HttpResponse",
    "MakeCsr",
    "build_csr",
    "encode_request",
    "expect_success",
    "expected_length",
    "load_certificates",
    "load_private_key",
    "make_key",
    "offers_basic",
    "parse_response",
    "parse_serverkeygen",
]
