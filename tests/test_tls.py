"""estd.tls in memory: real TLS handshakes between two TLSMemoryBIOFactory sides.

The server side is ``TLSMemoryBIOFactory(ServerTLS(...), False, ...)``; the
client side is a small pyOpenSSL connection creator that presents whatever
certificate a test gives it.  ``iosim`` pumps the bytes; there is no socket
and no reactor.  OpenSSL checks validity against the wall clock, so every
certificate here is made relative to ``datetime.now()``.
"""

from __future__ import annotations

import base64
import datetime
import functools
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import AttributeOID, ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL, crypto
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import (
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IProtocolFactory,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test.iosim import FakeTransport, IOPump, connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from estd.config import Config
from estd.demo import DemoPKI, Pair, device_name, make_demo_pki, make_pair
from estd.identity import ClientIdentity
from estd.tls import (
    ServerTLS,
    channel_binding,
    client_identity,
    handshake_failure_reason,
)
from estd.web import build_site
from estd.wire import certs_only, encode_base64
from tests.pki import demo_config, fioconfig_csr, one_line_base64
from tests.test_labels_web import load_ini
from tests.test_web import (
    SynchronousThreadPool,
    ThreadlessClock,
    parse_raw_response,
    pkcs7_certificates,
)

WALL_NOW = datetime.datetime.now(datetime.UTC)
"""When this test module's PKI was made; OpenSSL verifies against real time."""

CLIENT_ADDRESS = IPv4Address("TCP", "192.0.2.44", 50123)
SSL_MODE_NO_AUTO_CHAIN = 0x00000008
"""OpenSSL's SSL_MODE_NO_AUTO_CHAIN, which pyOpenSSL does not name."""
NOT_TRUSTED = "it is not issued by a trusted CA (client-cas or the EST CA)"


# --- A PKI valid now, with a legacy device CA in client-cas -------------------------


@dataclass(frozen=True)
class TLSPKI:
    """The demo PKI plus a legacy device CA (with an intermediate) and its devices."""

    demo: DemoPKI
    legacy_ca: Pair
    legacy_intermediate: Pair
    config: Config


def device(issuer: Pair, **options: object) -> Pair:
    """A P-256 device certificate from ``issuer``: 30 days, clientAuth by default."""
    options.setdefault("extended_usage", [ExtendedKeyUsageOID.CLIENT_AUTH])
    options.setdefault("days", 30)
    return make_pair(
        device_name(str(uuid.uuid4())), issuer, ca=False, now=WALL_NOW, **options
    )


def expired_device(issuer: Pair) -> Pair:
    """A device certificate that expired yesterday."""
    return device(issuer, not_before=WALL_NOW - datetime.timedelta(days=30), days=29)


def ca_name(common_name: str) -> x509.Name:
    """A CA subject."""
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def config_with_files(demo: DemoPKI, **files: bytes) -> Config:
    """The demo configuration with some keys pointing at files holding ``files``."""
    directory = tempfile.mkdtemp(prefix="estd-tls-test-")
    try:
        paths = {}
        for key, data in files.items():
            paths[key] = os.path.join(directory, key + ".pem")
            with open(paths[key], "wb") as handle:
                handle.write(data)
        return demo_config(WALL_NOW, demo, **paths)
    finally:
        shutil.rmtree(directory)


@functools.cache
def tls_pki() -> TLSPKI:
    """One PKI for the whole module, valid around the real current time."""
    demo = make_demo_pki(WALL_NOW, devices=2)
    legacy_ca = make_pair(ca_name("ota-devices-CA"), None, ca=True, now=WALL_NOW)
    legacy_intermediate = make_pair(
        ca_name("ota-devices-intermediate"), legacy_ca, ca=True, now=WALL_NOW
    )
    config = config_with_files(
        demo, client_cas=demo.device_ca.cert_pem() + legacy_ca.cert_pem()
    )
    return TLSPKI(demo, legacy_ca, legacy_intermediate, config)


def renewed_device(pki: TLSPKI) -> Pair:
    """A device certificate as estd itself issues it (signed by the EST CA)."""
    subject = pki.demo.devices[1].certificate.subject
    key, der = fioconfig_csr(subject)
    issued = pki.config.default.ca.issue(
        x509.load_der_x509_csr(der), WALL_NOW, datetime.timedelta(days=1)
    )
    return Pair(issued.certificate, key)


# --- The two sides ---------------------------------------------------------------


@implementer(IOpenSSLClientConnectionCreator)
class ClientTLS:
    """A pyOpenSSL client that trusts ``trust_root`` and presents ``certificate``."""

    def __init__(
        self,
        trust_root: x509.Certificate,
        certificate: Pair | None = None,
        chain: tuple[x509.Certificate, ...] = (),
        *,
        min_version: int | None = None,
        max_version: int | None = None,
        ciphers: bytes | None = None,
    ) -> None:
        self.trust_root = trust_root
        self.certificate = certificate
        self.chain = chain
        self.min_version = min_version
        self.max_version = max_version
        self.ciphers = ciphers

    def clientConnectionForTLS(self, tls_protocol: object) -> SSL.Connection:
        """A client connection with this client's certificate and limits."""
        context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        store = context.get_cert_store()
        assert store is not None
        store.add_cert(crypto.X509.from_cryptography(self.trust_root))
        context.set_verify(
            SSL.VERIFY_PEER, lambda conn, cert, errno, depth, ok: bool(ok)
        )
        # Send exactly the certificates the test names: OpenSSL would otherwise
        # complete the chain from the trust store (the factory root).
        context.set_mode(SSL_MODE_NO_AUTO_CHAIN)
        if self.certificate is not None:
            context.use_certificate(self.certificate.certificate)
            context.use_privatekey(self.certificate.key)
            for extra in self.chain:
                context.add_extra_chain_cert(extra)
        if self.min_version is not None:
            context.set_min_proto_version(self.min_version)
        if self.max_version is not None:
            context.set_max_proto_version(self.max_version)
        if self.ciphers is not None:
            context.set_cipher_list(self.ciphers)
        connection = SSL.Connection(context, None)
        connection.set_tlsext_host_name(b"localhost")
        return connection


@implementer(IHandshakeListener)
class ServerSide(Protocol):
    """Records what the server learnt about the connection, while it still can."""

    handshook = False
    identity: ClientIdentity | None = None
    version: str | None = None
    cipher: str | None = None
    binding: bytes | None = None
    failure_reason: str | None = None
    lost: Failure | None = None

    def handshakeCompleted(self) -> None:
        """Note the verified identity, negotiated parameters and channel binding."""
        self.handshook = True
        self.identity = client_identity(self.transport)
        self.binding = channel_binding(self.transport)
        connection = self.transport.getHandle()
        self.version = connection.get_protocol_version_name()
        self.cipher = connection.get_cipher_name()

    def connectionLost(self, reason: Failure) -> None:
        """Note why the connection ended (the TLS handle is gone afterwards)."""
        self.lost = reason
        if not self.handshook:
            self.failure_reason = handshake_failure_reason(self.transport, reason)


@implementer(IHandshakeListener)
class ClientSide(Protocol):
    """Records the client's view: handshake, CA names asked for, bytes received."""

    handshook = False
    client_ca_names: list[crypto.X509Name] | None = None
    server_chain: list[x509.Certificate] | None = None
    lost: Failure | None = None

    binding: bytes | None = None

    def __init__(
        self,
        greeting: bytes = b"",
        make_greeting: Callable[[bytes], bytes] | None = None,
    ) -> None:
        self.greeting = greeting
        self.make_greeting = make_greeting
        self.received = b""

    def handshakeCompleted(self) -> None:
        """Note the CA names and the channel binding (client's view), then talk.

        ``make_greeting``, if given, makes the request from the binding: a
        CSR carrying it must be made after the handshake, as libest does.
        """
        self.handshook = True
        connection = self.transport.getHandle()
        self.client_ca_names = connection.get_client_ca_list()
        self.server_chain = connection.get_peer_cert_chain(as_cryptography=True)
        if connection.get_protocol_version_name() == "TLSv1.3":
            # RFC 9266 §2: tls-exporter, label EXPORTER-Channel-Binding, 32 bytes
            self.binding = connection.export_keying_material(
                b"EXPORTER-Channel-Binding", 32
            )
        else:
            # RFC 5929 §3.1: tls-unique is the first Finished message, which
            # in a full handshake is the one the client sent.
            self.binding = connection.get_finished()
        if self.make_greeting is not None:
            self.greeting = self.make_greeting(self.binding)
        if self.greeting:
            self.transport.write(self.greeting)

    def dataReceived(self, data: bytes) -> None:
        """Keep what the server sent."""
        self.received += data

    def connectionLost(self, reason: Failure) -> None:
        """Note that the connection ended."""
        self.lost = reason


class OneProtocolFactory(Factory):
    """Hands out one given protocol instance (so the test keeps a reference)."""

    def __init__(self, protocol: Protocol) -> None:
        self.protocol_instance = protocol

    def buildProtocol(self, addr: object) -> Protocol:
        """The protocol given at construction."""
        return self.protocol_instance


@dataclass
class Connection:
    """One in-memory TLS connection after the pump went quiet."""

    client: ClientSide
    server_tls: Protocol
    pump: IOPump
    server: ServerSide | None = None
    events: list[dict[str, object]] = field(default_factory=list)


def connect(
    client_tls: ClientTLS,
    config: Config | None = None,
    server_factory: IProtocolFactory | None = None,
    client: ClientSide | None = None,
    server_tls: ServerTLS | None = None,
) -> Connection:
    """Run a handshake (and whatever follows) between a client and estd's TLS."""
    config = config or tls_pki().config
    clock = Clock()
    server = None
    if server_factory is None:
        server = ServerSide()
        server_factory = OneProtocolFactory(server)
    client = client or ClientSide()
    server_side = TLSMemoryBIOFactory(
        server_tls or ServerTLS(lambda: config), False, server_factory, clock=clock
    )
    client_side = TLSMemoryBIOFactory(
        client_tls, True, OneProtocolFactory(client), clock=clock
    )
    with capturedLogs() as events:
        _, server_protocol, pump = connectedServerAndClient(
            lambda: server_side.buildProtocol(CLIENT_ADDRESS),
            lambda: client_side.buildProtocol(None),
            serverTransportFactory=lambda protocol: FakeTransport(
                protocol, isServer=True, peerAddress=CLIENT_ADDRESS
            ),
            greet=False,
            clock=clock,
        )
        pump.flush()
    return Connection(client, server_protocol, pump, server, list(events))


def client_for(
    certificate: Pair | None, *chain: x509.Certificate, **options: object
) -> ClientTLS:
    """A client that trusts the factory root and presents ``certificate``."""
    return ClientTLS(tls_pki().demo.root.certificate, certificate, chain, **options)


def subject_of(pair: Pair) -> str:
    """The subject as estd names it in reasons."""
    return pair.certificate.subject.rfc4514_string()


# --- Handshakes ----------------------------------------------------------------------


class ClientCertificateTests(SynchronousTestCase):
    """Which client certificates the verify callback accepts, and why not."""

    def assert_accepted(
        self, connection: Connection, chain: tuple[x509.Certificate, ...]
    ) -> None:
        """The handshake completed and the identity is ``chain[0]`` with ``chain``."""
        server = connection.server
        assert server is not None
        self.assertEqual((server.handshook, server.failure_reason), (True, None))
        self.assertTrue(connection.client.handshook)
        self.assertIsNone(connection.client.lost)
        assert server.identity is not None
        self.assertEqual(server.identity.certificate, chain[0])
        self.assertEqual(server.identity.chain, chain)

    def assert_refused(self, connection: Connection, reason: str) -> None:
        """The server ended the handshake with ``reason`` and learnt no identity."""
        server = connection.server
        assert server is not None
        self.assertFalse(server.handshook)
        self.assertIsNone(server.identity)
        self.assertIsNotNone(server.lost)
        self.assertEqual(server.failure_reason, reason)
        self.assertIsNotNone(connection.client.lost)

    def test_device_of_a_client_ca(self) -> None:
        """A device of a CA in client-cas is accepted, chained to that CA."""
        pki = tls_pki()
        device_pair = pki.demo.devices[0]
        connection = connect(client_for(device_pair))
        self.assert_accepted(
            connection, (device_pair.certificate, pki.demo.device_ca.certificate)
        )
        self.assertEqual(
            client_identity(connection.server_tls), connection.server.identity
        )
        # The anchor is the configured certificate object, not a re-parse.
        anchor = connection.server.identity.chain[-1]
        self.assertTrue(any(anchor is a for a in pki.config.trust_anchors))

    def test_device_renewed_by_the_est_ca(self) -> None:
        """A certificate issued by the EST CA is accepted: the EST CA is an anchor."""
        pki = tls_pki()
        renewed = renewed_device(pki)
        connection = connect(client_for(renewed))
        self.assert_accepted(
            connection, (renewed.certificate, pki.demo.est_ca.certificate)
        )

    def test_legacy_device_ca(self) -> None:
        """A device of an extra (legacy) CA listed in client-cas is accepted."""
        pki = tls_pki()
        legacy_device = device(pki.legacy_ca)
        connection = connect(client_for(legacy_device))
        self.assert_accepted(
            connection, (legacy_device.certificate, pki.legacy_ca.certificate)
        )

    def test_legacy_device_refused_without_client_cas(self) -> None:
        """The same legacy device is refused by a server that does not list its CA."""
        pki = tls_pki()
        legacy_device = device(pki.legacy_ca)
        config = demo_config(WALL_NOW, pki.demo)
        connection = connect(client_for(legacy_device), config=config)
        self.assert_refused(
            connection, f"client certificate {subject_of(legacy_device)}: {NOT_TRUSTED}"
        )

    def test_leaf_with_intermediate(self) -> None:
        """A leaf sent together with its intermediate is accepted, full chain known."""
        pki = tls_pki()
        leaf = device(pki.legacy_intermediate)
        connection = connect(client_for(leaf, pki.legacy_intermediate.certificate))
        self.assert_accepted(
            connection,
            (
                leaf.certificate,
                pki.legacy_intermediate.certificate,
                pki.legacy_ca.certificate,
            ),
        )

    def test_leaf_without_its_intermediate(self) -> None:
        """The same leaf sent without its intermediate is refused: issuer unknown."""
        pki = tls_pki()
        leaf = device(pki.legacy_intermediate)
        connection = connect(client_for(leaf))
        self.assert_refused(
            connection, f"client certificate {subject_of(leaf)}: {NOT_TRUSTED}"
        )

    def test_device_with_its_ca_appended(self) -> None:
        """A device sending its CA after its own certificate (fioconfig) is accepted."""
        pki = tls_pki()
        device_pair = pki.demo.devices[0]
        connection = connect(client_for(device_pair, pki.demo.device_ca.certificate))
        self.assert_accepted(
            connection, (device_pair.certificate, pki.demo.device_ca.certificate)
        )

    def test_signed_by_factory_root(self) -> None:
        """A certificate signed by the factory root is refused: it is no anchor."""
        pki = tls_pki()
        rooted = device(pki.demo.root)
        connection = connect(client_for(rooted))
        self.assert_refused(
            connection, f"client certificate {subject_of(rooted)}: {NOT_TRUSTED}"
        )

    def test_signed_by_factory_root_sent_with_root(self) -> None:
        """The same certificate sent with the factory root after it is refused too."""
        pki = tls_pki()
        rooted = device(pki.demo.root)
        connection = connect(client_for(rooted, pki.demo.root.certificate))
        self.assert_refused(
            connection,
            f"chain certificate {subject_of(pki.demo.root)}: its chain ends in a "
            "self-signed certificate that is not a trust anchor",
        )

    def test_expired(self) -> None:
        """An expired device certificate is refused, and the reason says it expired."""
        pki = tls_pki()
        expired = expired_device(pki.demo.device_ca)
        connection = connect(client_for(expired))
        self.assert_refused(
            connection, f"client certificate {subject_of(expired)}: it has expired"
        )

    def test_not_yet_valid(self) -> None:
        """A device certificate valid only from tomorrow is refused."""
        pki = tls_pki()
        future = device(
            pki.demo.device_ca, not_before=WALL_NOW + datetime.timedelta(days=1)
        )
        connection = connect(client_for(future))
        self.assert_refused(
            connection, f"client certificate {subject_of(future)}: it is not yet valid"
        )

    def test_server_auth_only(self) -> None:
        """A certificate whose ExtKeyUsage is serverAuth only is refused."""
        pki = tls_pki()
        server_only = device(
            pki.demo.device_ca, extended_usage=[ExtendedKeyUsageOID.SERVER_AUTH]
        )
        connection = connect(client_for(server_only))
        self.assert_refused(
            connection,
            f"client certificate {subject_of(server_only)}: "
            "it is not allowed for client authentication",
        )

    def test_ca_certificate_as_client(self) -> None:
        """A CA certificate presented as a client certificate is refused."""
        pki = tls_pki()
        connection = connect(client_for(pki.demo.device_ca))
        self.assert_refused(
            connection,
            f"client certificate {subject_of(pki.demo.device_ca)}: "
            "it is not allowed for client authentication",
        )

    def test_ca_with_client_auth_as_client(self) -> None:
        """A CA certificate whose ExtKeyUsage allows clientAuth is still refused."""
        pki = tls_pki()
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(ca_name("client-shaped-CA"))
            .issuer_name(pki.demo.device_ca.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(WALL_NOW - datetime.timedelta(hours=1))
            .not_valid_after(WALL_NOW + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False
            )
        )
        certificate = builder.sign(pki.demo.device_ca.key, hashes.SHA256())
        client_ca = Pair(certificate, key)
        connection = connect(client_for(client_ca))
        self.assert_refused(
            connection,
            f"client certificate {subject_of(client_ca)} is a CA certificate",
        )

    def test_no_client_certificate(self) -> None:
        """A client without a certificate completes the handshake, anonymously."""
        connection = connect(client_for(None))
        server = connection.server
        assert server is not None
        self.assertEqual((server.handshook, server.identity), (True, None))
        self.assertIsNone(client_identity(connection.server_tls))
        self.assertIsNone(connection.client.lost)

    def test_config_snapshot_per_connection(self) -> None:
        """A new connection uses the configuration current when it starts."""
        pki = tls_pki()
        legacy_device = device(pki.legacy_ca)
        configs = [demo_config(WALL_NOW, pki.demo)]
        server_tls = ServerTLS(lambda: configs[0])
        refused = connect(client_for(legacy_device), server_tls=server_tls)
        self.assertFalse(refused.server.handshook)
        configs[0] = pki.config
        accepted = connect(client_for(legacy_device), server_tls=server_tls)
        self.assertTrue(accepted.server.handshook)


class ProtocolTests(SynchronousTestCase):
    """TLS versions, cipher suites and the CertificateRequest."""

    def test_tls13(self) -> None:
        """A TLS 1.3 client with a device certificate is served over TLS 1.3."""
        connection = connect(
            client_for(tls_pki().demo.devices[0], min_version=SSL.TLS1_3_VERSION)
        )
        server = connection.server
        assert server is not None
        self.assertEqual((server.handshook, server.version), (True, "TLSv1.3"))
        self.assertIsNotNone(server.identity)

    def test_tls12(self) -> None:
        """A TLS 1.2-only client gets an ECDHE AEAD suite and is verified."""
        connection = connect(
            client_for(tls_pki().demo.devices[0], max_version=SSL.TLS1_2_VERSION)
        )
        server = connection.server
        assert server is not None
        self.assertEqual(
            (server.handshook, server.version, server.cipher),
            (True, "TLSv1.2", "ECDHE-ECDSA-AES256-GCM-SHA384"),
        )
        self.assertIsNotNone(server.identity)

    def test_tls12_chacha20(self) -> None:
        """A TLS 1.2 client offering only ChaCha20-Poly1305 is served."""
        connection = connect(
            client_for(
                tls_pki().demo.devices[0],
                max_version=SSL.TLS1_2_VERSION,
                ciphers=b"ECDHE-ECDSA-CHACHA20-POLY1305",
            )
        )
        server = connection.server
        assert server is not None
        self.assertEqual(
            (server.handshook, server.cipher), (True, "ECDHE-ECDSA-CHACHA20-POLY1305")
        )

    def test_old_versions_refused(self) -> None:
        """TLS 1.0 and TLS 1.1 clients are refused by the server (RFC 8996)."""
        for version in (SSL.TLS1_VERSION, SSL.TLS1_1_VERSION):
            connection = connect(
                client_for(
                    tls_pki().demo.devices[0],
                    min_version=version,
                    max_version=version,
                    # OpenSSL 3+ refuses these versions itself at the default
                    # security level; level 0 makes the refusal the server's.
                    ciphers=b"DEFAULT:@SECLEVEL=0",
                )
            )
            server = connection.server
            assert server is not None
            self.assertEqual(
                (version, server.handshook, server.failure_reason),
                (version, False, "TLS error: unsupported protocol"),
            )
            self.assertFalse(connection.client.handshook)

    def test_renegotiation_refused(self) -> None:
        """A TLS 1.2 client asking to renegotiate is refused and the connection ends."""
        connection = connect(
            client_for(tls_pki().demo.devices[0], max_version=SSL.TLS1_2_VERSION)
        )
        self.assertIsNone(connection.client.lost)
        handle = connection.client.transport.getHandle()
        self.assertTrue(handle.renegotiate())
        with self.assertRaises(SSL.WantReadError):
            handle.do_handshake()
        # Put the new ClientHello on the wire below the TLS layer.
        connection.client.transport.transport.write(handle.bio_read(65536))
        connection.pump.flush()
        lost = connection.client.lost
        assert lost is not None
        self.assertIsInstance(lost.value, SSL.Error)
        self.assertEqual(lost.value.args[0][0][2], "no renegotiation")

    def test_server_chain_from_tls_cert(self) -> None:
        """The server sends the intermediates listed after its leaf in tls-cert."""
        pki = tls_pki()
        intermediate = make_pair(
            ca_name("tls-intermediate"), pki.demo.root, ca=True, now=WALL_NOW
        )
        leaf = make_pair(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]),
            intermediate,
            ca=False,
            now=WALL_NOW,
            days=30,
            extended_usage=[ExtendedKeyUsageOID.SERVER_AUTH],
        )
        config = config_with_files(
            pki.demo,
            tls_cert=leaf.cert_pem() + intermediate.cert_pem(),
            tls_key=leaf.key_pem(),
        )
        connection = connect(client_for(pki.demo.devices[0]), config=config)
        self.assertTrue(connection.client.handshook)
        self.assertEqual(
            connection.client.server_chain,
            [leaf.certificate, intermediate.certificate],
        )

    def test_cbc_suites_refused(self) -> None:
        """A TLS 1.2 client offering only CBC suites finds no shared cipher."""
        connection = connect(
            client_for(
                tls_pki().demo.devices[0],
                max_version=SSL.TLS1_2_VERSION,
                ciphers=b"ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES256-SHA:"
                b"ECDHE-ECDSA-AES128-SHA:@SECLEVEL=0",
            )
        )
        server = connection.server
        assert server is not None
        self.assertEqual(
            (server.handshook, server.failure_reason),
            (False, "TLS error: no shared cipher"),
        )

    def test_tls12_suites_are_ecdhe_aead(self) -> None:
        """Every TLS 1.2 suite the server enables is ECDHE with AES-GCM or ChaCha20."""
        context = ServerTLS(lambda: tls_pki().config).context()
        names = SSL.Connection(context, None).get_cipher_list()
        tls12 = [name for name in names if not name.startswith("TLS_")]
        self.assertNotEqual(tls12, [])
        for name in tls12:
            self.assertTrue(name.startswith("ECDHE-"), name)
            self.assertTrue("-GCM-" in name or "CHACHA20" in name, name)

    def test_certificate_request_lists_no_ca_names(self) -> None:
        """The CertificateRequest carries no CA names, in TLS 1.2 and 1.3."""
        for version in (SSL.TLS1_2_VERSION, SSL.TLS1_3_VERSION):
            connection = connect(
                client_for(
                    tls_pki().demo.devices[0], min_version=version, max_version=version
                )
            )
            self.assertEqual(
                (version, connection.client.client_ca_names), (version, [])
            )

    def test_ca_names_would_be_seen(self) -> None:
        """Control for the test above: a server that names CAs is seen doing so."""
        pki = tls_pki()

        class NamingServerTLS(ServerTLS):
            def context(self) -> SSL.Context:
                context = super().context()
                context.add_client_ca(pki.demo.device_ca.certificate)
                return context

        connection = connect(
            client_for(pki.demo.devices[0]),
            server_tls=NamingServerTLS(lambda: pki.config),
        )
        names = connection.client.client_ca_names
        assert names is not None
        self.assertEqual([name.CN for name in names], ["fio-device-ca"])


# --- Channel bindings and the re-enrollment grace -----------------------------------


class ChannelBindingTests(SynchronousTestCase):
    """``estd.tls.channel_binding``: what the client must put in challengePassword."""

    def binding_pair(self, version: int) -> tuple[bytes | None, bytes | None, str]:
        """The server's and the client's binding of one handshake, and the version."""
        connection = connect(
            client_for(
                tls_pki().demo.devices[0], min_version=version, max_version=version
            )
        )
        server = connection.server
        assert server is not None and server.version is not None
        return server.binding, connection.client.binding, server.version

    def test_tls12_tls_unique(self) -> None:
        """On TLS 1.2 the server's binding is the client's own Finished (tls-unique)."""
        server, client, version = self.binding_pair(SSL.TLS1_2_VERSION)
        self.assertEqual(version, "TLSv1.2")
        assert client is not None
        self.assertEqual(len(client), 12)  # verify_data of TLS 1.2 suites
        self.assertEqual(server, client)

    def test_tls13_tls_exporter(self) -> None:
        """On TLS 1.3 the server's binding is the client's tls-exporter value."""
        server, client, version = self.binding_pair(SSL.TLS1_3_VERSION)
        self.assertEqual(version, "TLSv1.3")
        assert client is not None
        self.assertEqual(len(client), 32)
        self.assertEqual(server, client)

    def test_each_connection_has_its_own(self) -> None:
        """Two connections of the same client have different bindings."""
        for version in (SSL.TLS1_2_VERSION, SSL.TLS1_3_VERSION):
            first, _, _ = self.binding_pair(version)
            second, _, _ = self.binding_pair(version)
            self.assertNotEqual((version, first), (version, second))

    def test_no_tls_no_binding(self) -> None:
        """A transport without TLS has no channel binding."""
        self.assertIsNone(channel_binding(StringTransport()))
        self.assertIsNone(channel_binding(object()))


def grace_config(grace: str, **files: bytes) -> Config:
    """The module's demo configuration with ``reenroll-grace`` set to ``grace``."""
    directory = tempfile.mkdtemp(prefix="estd-tls-test-")
    try:
        paths = {}
        for key, data in files.items():
            paths[key] = os.path.join(directory, key + ".pem")
            with open(paths[key], "wb") as handle:
                handle.write(data)
        return demo_config(WALL_NOW, tls_pki().demo, reenroll_grace=grace, **paths)
    finally:
        shutil.rmtree(directory)


def expired_for(issuer: Pair, days: int) -> Pair:
    """A device certificate of ``issuer`` that expired ``days`` days ago."""
    return device(
        issuer,
        not_before=WALL_NOW - datetime.timedelta(days=days + 10),
        days=10,
    )


class ReenrollGraceTests(SynchronousTestCase):
    """``reenroll-grace``: expired client certificates at the handshake."""

    def test_within_grace(self) -> None:
        """An expired certificate within the grace completes the handshake, marked."""
        pki = tls_pki()
        expired = expired_for(pki.demo.device_ca, days=29)
        connection = connect(client_for(expired), config=grace_config("30d"))
        server = connection.server
        assert server is not None
        self.assertEqual((server.handshook, server.failure_reason), (True, None))
        assert server.identity is not None
        self.assertEqual(
            server.identity,
            ClientIdentity(
                certificate=expired.certificate,
                chain=(expired.certificate, pki.demo.device_ca.certificate),
                expired=True,
            ),
        )

    def test_valid_certificate_not_marked(self) -> None:
        """A certificate within its validity is not marked expired under a grace."""
        connection = connect(
            client_for(tls_pki().demo.devices[0]), config=grace_config("30d")
        )
        server = connection.server
        assert server is not None and server.identity is not None
        self.assertFalse(server.identity.expired)

    def test_beyond_grace(self) -> None:
        """An expired certificate beyond the grace is refused: it has expired."""
        expired = expired_for(tls_pki().demo.device_ca, days=31)
        connection = connect(client_for(expired), config=grace_config("30d"))
        server = connection.server
        assert server is not None
        self.assertFalse(server.handshook)
        self.assertIsNone(server.identity)
        self.assertEqual(
            server.failure_reason,
            f"client certificate {subject_of(expired)}: it has expired",
        )

    def test_no_grace(self) -> None:
        """With reenroll-grace 0 an expired certificate is refused as before."""
        expired = expired_for(tls_pki().demo.device_ca, days=1)
        connection = connect(client_for(expired), config=grace_config("0"))
        server = connection.server
        assert server is not None
        self.assertFalse(server.handshook)
        self.assertEqual(
            server.failure_reason,
            f"client certificate {subject_of(expired)}: it has expired",
        )

    def test_a_labels_grace_opens_the_handshake(self) -> None:
        """A grace set only on a label lets the expired certificate through TLS."""
        expired = expired_for(tls_pki().demo.device_ca, days=1)
        config = load_ini(
            "\n[label late]\nreenroll-grace = 30d\n", now=WALL_NOW, pki=tls_pki().demo
        )
        self.assertEqual(config.default.reenroll_grace, datetime.timedelta())
        connection = connect(client_for(expired), config=config)
        server = connection.server
        assert server is not None and server.identity is not None
        self.assertTrue(server.identity.expired)

    def test_expired_intermediate_refused(self) -> None:
        """The grace covers the client's own certificate, not an expired CA above it."""
        pki = tls_pki()
        old_intermediate = make_pair(
            ca_name("expired-intermediate"),
            pki.legacy_ca,
            ca=True,
            now=WALL_NOW,
            not_before=WALL_NOW - datetime.timedelta(days=30),
            days=29,
        )
        leaf = device(old_intermediate)
        connection = connect(
            client_for(leaf, old_intermediate.certificate),
            config=grace_config("30d", client_cas=pki.legacy_ca.cert_pem()),
        )
        server = connection.server
        assert server is not None
        self.assertFalse(server.handshook)
        self.assertEqual(
            server.failure_reason,
            f"chain certificate {subject_of(old_intermediate)}: it has expired",
        )


# --- EstChannel on top of TLS ---------------------------------------------------------


class ChannelOverTLSTests(SynchronousTestCase):
    """The EST site behind ``ServerTLS``: handshake logging and a real mTLS renewal."""

    def site_factory(self, config: Config | None = None) -> object:
        """The EST site for ``config`` (the module's), on a clock at WALL_NOW."""
        clock = ThreadlessClock()
        clock.advance(WALL_NOW.timestamp())
        served = config or tls_pki().config
        return build_site(lambda: served, clock, SynchronousThreadPool())

    def warnings(self, connection: Connection) -> list[dict[str, object]]:
        """The events at warn level or above."""
        serious = (LogLevel.warn, LogLevel.error, LogLevel.critical)
        return [
            event for event in connection.events if event.get("log_level") in serious
        ]

    def test_failed_handshake_logged_once(self) -> None:
        """A refused client certificate logs one warning: reason, no traceback."""
        pki = tls_pki()
        expired = expired_device(pki.demo.device_ca)
        connection = connect(client_for(expired), server_factory=self.site_factory())
        self.assertIsNotNone(connection.client.lost)
        (warning,) = self.warnings(connection)
        self.assertEqual(warning["log_level"], LogLevel.warn)
        self.assertEqual(warning["log_namespace"], "estd")
        self.assertEqual(warning["client_address"], "192.0.2.44")
        reason = f"client certificate {subject_of(expired)}: it has expired"
        self.assertEqual(warning["tls_failure"], reason)
        self.assertEqual(
            formatEvent(warning), f"TLS handshake with 192.0.2.44 failed: {reason}"
        )
        self.assertEqual([e for e in connection.events if "log_failure" in e], [])
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_old_version_logged_once(self) -> None:
        """A TLS 1.1 client gives one warning naming the protocol problem."""
        connection = connect(
            client_for(
                tls_pki().demo.devices[0],
                min_version=SSL.TLS1_1_VERSION,
                max_version=SSL.TLS1_1_VERSION,
                ciphers=b"DEFAULT:@SECLEVEL=0",
            ),
            server_factory=self.site_factory(),
        )
        (warning,) = self.warnings(connection)
        self.assertEqual(warning["tls_failure"], "TLS error: unsupported protocol")
        self.assertEqual([e for e in connection.events if "log_failure" in e], [])

    def test_successful_handshake_logs_no_warning(self) -> None:
        """A client that connects, handshakes and leaves gives no TLS warning."""
        connection = connect(
            client_for(tls_pki().demo.devices[0]),
            server_factory=self.site_factory(),
        )
        self.assertTrue(connection.client.handshook)
        with capturedLogs() as events:
            connection.client.transport.loseConnection()
            connection.pump.flush()
        self.assertIsNotNone(connection.client.lost)
        self.assertEqual(self.warnings(connection), [])
        self.assertEqual([e for e in events if e.get("log_level") == LogLevel.warn], [])

    def test_renewal_over_mutual_tls(self) -> None:
        """A device renews over mutual TLS: 201, its subject, a log line naming it."""
        pki = tls_pki()
        device_pair = pki.demo.devices[0]
        csr_key, csr = fioconfig_csr(device_pair.certificate.subject)
        body = one_line_base64(csr)
        request = (
            b"POST /.well-known/est/simplereenroll HTTP/1.1\r\n"
            b"Host: localhost\r\n"
            b"Content-Type: application/pkcs10\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        client = ClientSide(greeting=request)
        connection = connect(
            client_for(device_pair),
            server_factory=self.site_factory(),
            client=client,
        )
        status, _, payload = parse_raw_response(client.received)
        self.assertEqual(status, b"HTTP/1.1 201 Created")
        (issued,) = pkcs7_certificates(payload)
        self.assertEqual(issued.subject, device_pair.certificate.subject)
        self.assertEqual(issued.public_key(), csr_key.public_key())
        (line,) = [e for e in connection.events if e.get("status") is not None]
        self.assertEqual(
            (line["status"], line["client_subject"]), (201, subject_of(device_pair))
        )

    def test_anonymous_renewal_over_tls(self) -> None:
        """Without a client certificate, cacerts works but a renewal gets 401."""
        body = one_line_base64(
            fioconfig_csr(tls_pki().demo.devices[0].certificate.subject)[1]
        )
        request = (
            b"GET /.well-known/est/cacerts HTTP/1.1\r\nHost: localhost\r\n\r\n"
            b"POST /.well-known/est/simplereenroll HTTP/1.1\r\n"
            b"Host: localhost\r\n"
            b"Content-Type: application/pkcs10\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        client = ClientSide(greeting=request)
        connect(client_for(None), server_factory=self.site_factory(), client=client)
        expected_cacerts = encode_base64(
            certs_only(
                [tls_pki().demo.root.certificate, tls_pki().demo.est_ca.certificate]
            ),
            64,
        )
        self.assertIn(b"HTTP/1.1 200 OK\r\n", client.received)
        self.assertIn(b"\r\n\r\n" + expected_cacerts, client.received)
        self.assertTrue(
            client.received.endswith(
                b"\r\n\r\nre-enrollment needs the client certificate being renewed\n"
            )
        )
        self.assertIn(b"HTTP/1.1 401 Unauthorized\r\n", client.received)

    def pop_renewal(
        self, version: int, challenge: Callable[[bytes], bytes]
    ) -> tuple[bytes, Connection]:
        """Renew with require-pop on, challengePassword = ``challenge(binding)``."""
        device_pair = tls_pki().demo.devices[0]

        def request(binding: bytes) -> bytes:
            builder = x509.CertificateSigningRequestBuilder().subject_name(
                device_pair.certificate.subject
            )
            builder = builder.add_attribute(
                AttributeOID.CHALLENGE_PASSWORD, challenge(binding)
            )
            csr = builder.sign(ec.generate_private_key(ec.SECP256R1()), hashes.SHA256())
            body = one_line_base64(csr.public_bytes(serialization.Encoding.DER))
            return (
                b"POST /.well-known/est/simplereenroll HTTP/1.1\r\n"
                b"Host: localhost\r\n"
                b"Content-Type: application/pkcs10\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )

        client = ClientSide(make_greeting=request)
        config = demo_config(WALL_NOW, tls_pki().demo, require_pop="yes")
        connection = connect(
            client_for(device_pair, min_version=version, max_version=version),
            config=config,
            server_factory=self.site_factory(config),
            client=client,
        )
        return client.received, connection

    def test_proof_of_possession_over_tls(self) -> None:
        """A CSR carrying its connection's binding in base64 renews (TLS 1.2, 1.3)."""
        for version in (SSL.TLS1_2_VERSION, SSL.TLS1_3_VERSION):
            received, _ = self.pop_renewal(version, base64.b64encode)
            status, _, payload = parse_raw_response(received)
            self.assertEqual((version, status), (version, b"HTTP/1.1 201 Created"))
            self.assertEqual(len(pkcs7_certificates(payload)), 1)

    def test_proof_of_possession_wrong_binding_over_tls(self) -> None:
        """A CSR carrying another binding (here a changed one) gets 401 over TLS."""
        for version in (SSL.TLS1_2_VERSION, SSL.TLS1_3_VERSION):
            received, _ = self.pop_renewal(
                version, lambda binding: base64.b64encode(bytes(len(binding)))
            )
            status, _, body = parse_raw_response(received)
            self.assertEqual(
                (version, status, body),
                (
                    version,
                    b"HTTP/1.1 401 Unauthorized",
                    b"Proof of possession mismatch\n",
                ),
            )

    def test_expired_renewal_within_grace_over_tls(self) -> None:
        """An expired device within the grace renews over mutual TLS; logged as such."""
        pki = tls_pki()
        expired = expired_for(pki.demo.device_ca, days=2)
        _, csr = fioconfig_csr(expired.certificate.subject)
        body = one_line_base64(csr)
        client = ClientSide(
            greeting=b"POST /.well-known/est/simplereenroll HTTP/1.1\r\n"
            b"Host: localhost\r\n"
            b"Content-Type: application/pkcs10\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        config = grace_config("30d")
        connection = connect(
            client_for(expired),
            config=config,
            server_factory=self.site_factory(config),
            client=client,
        )
        status, _, payload = parse_raw_response(client.received)
        self.assertEqual(status, b"HTTP/1.1 201 Created")
        (issued,) = pkcs7_certificates(payload)
        self.assertEqual(issued.subject, expired.certificate.subject)
        self.assertGreater(issued.not_valid_after_utc, WALL_NOW)
        (line,) = [e for e in connection.events if e.get("status") is not None]
        self.assertEqual(
            (line["status"], line["client_subject"], line["client_expired"]),
            (201, subject_of(expired), True),
        )
        self.assertIn(
            "(expired client certificate, within re-enrollment grace)",
            formatEvent(line),
        )
