"""The TLS layer: the only module that touches pyOpenSSL.

Builds the server context (TLS 1.2+ per RFC 8996, ECDHE AEAD suites only)
and verifies client certificates in a verify callback.  Client certificates
are requested but not required: ``/cacerts`` is anonymous, and each
resource decides what identity it needs.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator, ITransport
from twisted.internet.protocol import Protocol
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import BufferingTLSTransport
from twisted.python.failure import Failure
from zope.interface import directlyProvides, implementer, providedBy

from estd.config import Config
from estd.identity import ClientIdentity, client_certificate_problem

TLS12_CIPHERS = b"ECDHE+AESGCM:ECDHE+CHACHA20"
"""RFC 8996 leaves TLS 1.2; of its suites we keep forward-secret AEAD ones."""

# OpenSSL's X509_V_ERR_* codes a device is likely to hit, in words.
_VERIFY_ERRORS = {
    2: "its issuer certificate is unknown",
    7: "its signature does not verify",
    9: "it is not yet valid",
    10: "it has expired",
    18: "it is self-signed and not a trust anchor",
    19: "its chain ends in a self-signed certificate that is not a trust anchor",
    20: "it is not issued by a trusted CA (client-cas or the EST CA)",
    21: "it is not issued by a trusted CA (client-cas or the EST CA)",
    24: "a certificate in its chain is not a CA",
    26: "it is not allowed for client authentication",
    79: "its chain is too long",
}


@dataclass
class HandshakeState:
    """What the verify callback learnt about one connection."""

    chain: dict[int, x509.Certificate] = field(default_factory=dict)
    identity: ClientIdentity | None = None
    failure: str | None = None
    leaf_expired: bool = False


_CERT_HAS_EXPIRED = 10


def make_verify_callback(
    reenroll_grace: datetime.timedelta,
    clock: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(
        datetime.UTC
    ),
    anchors: Sequence[x509.Certificate] = (),
) -> Callable[[SSL.Connection, crypto.X509, int, int, int], bool]:
    """The verify callback for a configuration.

    ``reenroll_grace`` is the longest re-enrollment grace of any label: an
    expired client certificate within it is let in, marked expired, and the
    label decides (only ``simplereenroll`` takes it).  ``anchors`` are the
    configured trust anchors, already parsed: a chain certificate that is
    one of them (by its DER) is not parsed again on every handshake.
    """
    known = {
        anchor.public_bytes(serialization.Encoding.DER): anchor for anchor in anchors
    }

    def parsed(certificate: crypto.X509) -> x509.Certificate:
        der = crypto.dump_certificate(crypto.FILETYPE_ASN1, certificate)
        return known.get(der) or x509.load_der_x509_certificate(der)

    def verify(
        connection: SSL.Connection,
        certificate: crypto.X509,
        errno: int,
        depth: int,
        ok: int,
    ) -> bool:
        state: HandshakeState = connection.estd_handshake  # type: ignore[attr-defined]
        try:
            cert: x509.Certificate | None = parsed(certificate)
        except Exception:  # never let a callback raise into OpenSSL
            cert = None

        def subject() -> str:
            # Only failures name the certificate; formatting costs time.
            if cert is None:
                return "(unparseable)"
            try:
                return cert.subject.rfc4514_string() or "(empty subject)"
            except Exception:
                return "(unprintable subject)"

        if not ok:
            if (
                depth == 0
                and errno == _CERT_HAS_EXPIRED
                and cert is not None
                and clock() - cert.not_valid_after_utc <= reenroll_grace
            ):
                state.leaf_expired = True
                return True
            why = _VERIFY_ERRORS.get(errno, f"verification error {errno}")
            kind = "client certificate" if depth == 0 else "chain certificate"
            state.failure = f"{kind} {subject()}: {why}"
            return False
        if cert is None:
            state.failure = "client certificate cannot be parsed"
            return False
        state.chain[depth] = cert
        if depth == 0:
            problem = client_certificate_problem(cert)
            if problem is not None:
                state.failure = f"client certificate {subject()} {problem}"
                return False
            chain = tuple(state.chain[d] for d in sorted(state.chain))
            state.identity = ClientIdentity(
                certificate=cert, chain=chain, expired=state.leaf_expired
            )
        return True

    return verify


def build_context(config: Config) -> SSL.Context:
    """A server context for one configuration snapshot."""
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.set_options(
        SSL.OP_NO_COMPRESSION
        | SSL.OP_NO_RENEGOTIATION
        | SSL.OP_CIPHER_SERVER_PREFERENCE
        | SSL.OP_NO_TICKET
    )
    context.set_cipher_list(TLS12_CIPHERS)
    context.use_certificate(config.tls_certificates[0])
    for intermediate in config.tls_certificates[1:]:
        context.add_extra_chain_cert(intermediate)
    context.use_privatekey(config.tls_key)
    context.check_privatekey()
    store = context.get_cert_store()
    assert store is not None
    for anchor in config.trust_anchors:
        store.add_cert(crypto.X509.from_cryptography(anchor))
    # Every configured anchor stands on its own: device CAs are usually
    # intermediates whose root we must not trust for client authentication.
    store.set_flags(crypto.X509StoreFlags.PARTIAL_CHAIN)
    # Request, do not require, a certificate; no CA names are sent (Go
    # clients then always send theirs).
    context.set_verify(
        SSL.VERIFY_PEER | SSL.VERIFY_CLIENT_ONCE,
        make_verify_callback(config.max_reenroll_grace, anchors=config.trust_anchors),
    )
    context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    context.set_session_id(b"estd")
    return context


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """Creates each connection's TLS state from the current configuration.

    Each new connection uses the snapshot ``config_source`` returns at that
    moment; established connections keep the context they started with.
    """

    def __init__(self, config_source: Callable[[], Config]) -> None:
        self._config_source = config_source
        self._config: Config | None = None
        self._context: SSL.Context | None = None

    def context(self) -> SSL.Context:
        """The context for the current configuration, built once per snapshot."""
        config = self._config_source()
        if config is not self._config or self._context is None:
            self._context = build_context(config)
            self._config = config
        return self._context

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        """A server-side TLS connection carrying its own handshake state."""
        connection = SSL.Connection(self.context(), None)
        # Twisted keeps the connection's app data for itself; ours rides along
        # as an attribute of the (plain Python) Connection object.
        connection.estd_handshake = HandshakeState()  # type: ignore[attr-defined]
        return connection


class EstTLSProtocol(BufferingTLSTransport):
    """Twisted's TLS transport, connected at less cost.

    ``TLSMemoryBIOProtocol.makeConnection`` declares the wrapped transport's
    interfaces with one ``directlyProvides`` call per interface (each call
    replacing the last); on every new connection that was about a tenth of
    the reactor's time under a fleet of renewals.  This declares them in
    one call, with the very argument ``ProtocolWrapper.makeConnection``
    declares them with again (the transport's own specification), so that
    both find zope.interface's cached declaration that live connections
    hold, instead of building one that nobody keeps; otherwise it connects
    exactly as Twisted does.
    """

    def makeConnection(self, transport: ITransport) -> None:
        """Create the TLS connection, declare interfaces once, start the handshake."""
        self._tlsConnection = self.factory._creatorCallable(self)
        self._appSendBuffer = []
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        if self._connectWrapped:
            ProtocolWrapper.makeConnection(self, transport)
        self._checkHandshakeStatus()


def handshake_state(transport: object) -> HandshakeState | None:
    """The verify callback's findings for a connection's transport, if TLS."""
    get_handle = getattr(transport, "getHandle", None)
    if get_handle is None:
        return None
    connection = get_handle()
    if not isinstance(connection, SSL.Connection):
        return None
    state = getattr(connection, "estd_handshake", None)
    return state if isinstance(state, HandshakeState) else None


def client_identity(transport: object) -> ClientIdentity | None:
    """The verified client certificate of a connection, or None."""
    state = handshake_state(transport)
    return state.identity if state is not None else None


def channel_binding(transport: object) -> bytes | None:
    """The TLS channel binding of a connection (RFC 7030 §3.5).

    tls-unique (RFC 5929) on TLS 1.2: the first Finished message of the
    handshake, which in a full handshake is the client's.  tls-exporter
    (RFC 9266) on TLS 1.3, where tls-unique is not defined.
    """
    get_handle = getattr(transport, "getHandle", None)
    connection = get_handle() if get_handle is not None else None
    if not isinstance(connection, SSL.Connection):
        return None
    version = connection.get_protocol_version_name()
    if version == "TLSv1.3":
        return connection.export_keying_material(b"EXPORTER-Channel-Binding", 32)
    if version == "TLSv1.2":
        return connection.get_peer_finished()
    return None


def protocol_version(transport: object) -> str | None:
    """The negotiated TLS version name (``TLSv1.3``) of a transport."""
    get_handle = getattr(transport, "getHandle", None)
    connection = get_handle() if get_handle is not None else None
    if isinstance(connection, SSL.Connection):
        return connection.get_protocol_version_name()
    return None


def handshake_failure_reason(transport: object, reason: Failure) -> str:
    """One line saying why a TLS handshake failed, without a traceback."""
    state = handshake_state(transport)
    if state is not None and state.failure:
        return state.failure
    error = reason.value
    if isinstance(error, SSL.Error) and error.args and isinstance(error.args[0], list):
        texts = [entry[-1] for entry in error.args[0] if entry and entry[-1]]
        if texts:
            return "TLS error: " + "; ".join(str(text) for text in texts)
    text = str(error) or type(error).__name__
    return f"connection closed before the TLS handshake completed ({text})"
