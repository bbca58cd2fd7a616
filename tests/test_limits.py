"""Overload and slow clients: max-pending, the phase timeouts, max-connections.

Everything runs in memory: ``EstChannel`` over a ``StringTransport`` for
the HTTP phases, real TLS between two ``TLSMemoryBIOFactory`` sides over
``iosim`` for the handshake and the connection limit, a ``Clock`` for time
and a thread pool that holds its work until the test lets it run.  The last
test starts the real ``twistd`` once to see refused sockets close.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import ssl
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.error import ConnectionAborted
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test.iosim import FakeTransport, IOPump, connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import providedBy

import estd.site
from estd.config import Config
from estd.ledger import Ledger
from estd.limits import ConnectionLimitedTLSFactory
from estd.metrics import Metrics
from estd.site import EstChannel, EstSite
from estd.tls import EstTLSProtocol, ServerTLS
from estd.web import build_site
from tests.e2e_support import EstServer, free_port, poll, run
from tests.pki import demo_config, demo_pki, one_line_base64
from tests.test_tls import (
    CLIENT_ADDRESS,
    WALL_NOW,
    ClientSide,
    OneProtocolFactory,
    client_for,
    tls_pki,
)
from tests.test_web import (
    CACERTS,
    ENROLL,
    REENROLL,
    HeldThreadPool,
    ThreadlessClock,
    WriteCountingTransport,
    fioconfig_config,
    identity_of,
    parse_raw_response,
    pkcs7_certificates,
    reenroll_csr,
)

SERVERKEYGEN = "/.well-known/est/serverkeygen"
CSRATTRS = "/.well-known/est/csrattrs"
CRL = "/.well-known/est/crl"
BUSY = b"the server is busy with other enrollments; retry later\n"


class AbortRecordingTransport(WriteCountingTransport):
    """A ``StringTransport`` that tells an abort from an orderly close."""

    aborted = False

    def abortConnection(self) -> None:
        """Note the abort, then close like ``StringTransport`` does."""
        self.aborted = True
        super().abortConnection()


def limited(config: Config, **limits: Any) -> Config:
    """``config`` with the given limit settings (max_pending=1, ...)."""
    return dataclasses.replace(config, **limits)


def get(path: str) -> bytes:
    """A complete GET request for ``path``."""
    return b"GET " + path.encode() + b" HTTP/1.1\r\nHost: est.test\r\n\r\n"


def post(path: str, body: bytes) -> bytes:
    """A complete POST of a base64 CSR ``body`` to ``path``."""
    return (
        b"POST " + path.encode() + b" HTTP/1.1\r\nHost: est.test\r\n"
        b"Content-Type: application/pkcs10\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )


def statuses(transport: StringTransport) -> list[bytes]:
    """The status lines of the responses written so far."""
    return [
        line
        for line in transport.value().split(b"\r\n")
        if line.startswith(b"HTTP/1.1 ")
    ]


def warnings(events: list[Any]) -> list[Any]:
    """The estd events at warn level."""
    return [
        event
        for event in events
        if event.get("log_namespace") == "estd"
        and event.get("log_level") == LogLevel.warn
    ]


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    """One sample of a metric, as /metrics would show it."""
    return metrics.registry.get_sample_value(name, labels)


class LimitsTestCase(SynchronousTestCase):
    """One EST site on a fake clock, with a thread pool that holds its work."""

    def setUp(self) -> None:
        self.identity = identity_of(demo_pki().devices[0])
        self.patch(estd.site, "client_identity", lambda transport: self.identity)
        self.clock = ThreadlessClock()
        self.clock.advance(1_800_000_000)
        self.config = limited(
            fioconfig_config(),
            max_pending=1,
            header_timeout=2.0,
            body_timeout=2.0,
            handshake_timeout=2.0,
        )
        self.threadpool = HeldThreadPool()
        self.metrics = Metrics(lambda: self.config, self.clock.seconds)
        self.ledger: Ledger | None = None
        self.site = self.build()

    def build(self) -> EstSite:
        """The EST site over the test's config, clock, pool, metrics and ledger."""
        return build_site(
            lambda: self.config,
            self.clock,
            self.threadpool,
            ledger=self.ledger,
            metrics=self.metrics,
        )

    def connect(self) -> tuple[EstChannel, AbortRecordingTransport]:
        """A new plain connection to the site."""
        channel = self.site.buildProtocol(None)
        transport = AbortRecordingTransport()
        channel.makeConnection(transport)
        return channel, transport

    def renewal(self) -> bytes:
        """A fioconfig renewal of the test's device."""
        return post(REENROLL, one_line_base64(reenroll_csr(demo_pki().devices[0])))


# --- max-pending ----------------------------------------------------------------------


class MaxPendingTests(LimitsTestCase):
    """Enrollments beyond max-pending get 503 at once; other operations go on."""

    def test_busy_enrollment_gets_503_with_retry_after(self) -> None:
        """With one enrollment signing and max-pending 1, the next gets 503 at once."""
        first, first_transport = self.connect()
        first.dataReceived(self.renewal())
        self.assertEqual(len(self.threadpool.queued), 1)
        second, second_transport = self.connect()
        second.dataReceived(self.renewal())
        self.assertEqual(len(self.threadpool.queued), 1)  # nothing queued
        (raw,) = second_transport.writes  # one write, at once
        status, headers, body = parse_raw_response(raw)
        self.assertEqual((status, body), (b"HTTP/1.1 503 Service Unavailable", BUSY))
        self.assertEqual(
            [header for header in headers if header[0] != b"Date"],
            [
                (b"Server", b"estd"),
                (b"Content-Type", b"text/plain; charset=utf-8"),
                (b"Content-Length", b"%d" % len(BUSY)),
                (b"Retry-After", b"5"),
            ],
        )
        self.assertFalse(second_transport.disconnecting)
        self.threadpool.run_all()
        status, _, payload = parse_raw_response(first_transport.value())
        self.assertEqual(status, b"HTTP/1.1 201 Created")
        self.assertEqual(len(pkcs7_certificates(payload)), 1)

    def test_cacerts_and_csrattrs_served_while_full(self) -> None:
        """While max-pending are in flight, cacerts and csrattrs are still answered."""
        busy, _ = self.connect()
        busy.dataReceived(self.renewal())
        channel, transport = self.connect()
        channel.dataReceived(get(CACERTS) + get(CSRATTRS))
        self.assertEqual(
            statuses(transport), [b"HTTP/1.1 200 OK", b"HTTP/1.1 204 No Content"]
        )

    def test_crl_is_not_refused(self) -> None:
        """While max-pending are in flight, a CRL request is queued and answered."""
        directory = tempfile.mkdtemp(prefix="estd-limits-")
        self.addCleanup(shutil.rmtree, directory)
        self.ledger = Ledger.open("sqlite:///" + os.path.join(directory, "l.db"))
        self.addCleanup(self.ledger.close)
        self.site = self.build()
        busy, _ = self.connect()
        busy.dataReceived(self.renewal())
        channel, transport = self.connect()
        channel.dataReceived(get(CRL))
        self.assertEqual((transport.value(), len(self.threadpool.queued)), (b"", 2))
        self.threadpool.run_all()
        self.assertEqual(statuses(transport), [b"HTTP/1.1 200 OK"])
        self.assertIn(b"Content-Type: application/pkix-crl\r\n", transport.value())

    def test_every_enrollment_operation_counts(self) -> None:
        """simpleenroll, simplereenroll and serverkeygen share the max-pending slots."""
        self.config = limited(demo_config(serverkeygen="yes"), max_pending=1)
        self.site = self.build()
        body = one_line_base64(reenroll_csr(demo_pki().devices[0]))
        busy, _ = self.connect()
        busy.dataReceived(post(SERVERKEYGEN, body))
        self.assertEqual(self.site.enrollments.in_flight, 1)
        for path in (ENROLL, REENROLL, SERVERKEYGEN):
            channel, transport = self.connect()
            channel.dataReceived(post(path, body))
            self.assertEqual(
                (path, statuses(transport)),
                (path, [b"HTTP/1.1 503 Service Unavailable"]),
            )

    def test_count_returns_to_zero_after_responses(self) -> None:
        """Once answered, enrollments free their slots and new ones are admitted."""
        channel, transport = self.connect()
        channel.dataReceived(self.renewal())
        self.assertEqual(self.site.enrollments.in_flight, 1)
        self.threadpool.run_all()
        self.assertEqual(self.site.enrollments.in_flight, 0)
        # A delivered certificate closes its connection: the next comes anew.
        again, again_transport = self.connect()
        again.dataReceived(self.renewal())
        self.threadpool.run_all()
        self.assertEqual(
            statuses(transport) + statuses(again_transport),
            [b"HTTP/1.1 201 Created", b"HTTP/1.1 201 Created"],
        )
        self.assertEqual(self.site.enrollments.in_flight, 0)

    def test_count_returns_to_zero_after_disconnect(self) -> None:
        """A client gone mid-signing frees its slot when the signing is done."""
        channel, transport = self.connect()
        channel.dataReceived(self.renewal())
        channel.connectionLost(Failure(ConnectionAborted()))
        # Its CSR is still queued for a thread: the slot stays taken.
        self.assertEqual(self.site.enrollments.in_flight, 1)
        self.threadpool.run_all()
        self.assertEqual((self.site.enrollments.in_flight, transport.writes), (0, []))
        again, again_transport = self.connect()
        again.dataReceived(self.renewal())
        self.threadpool.run_all()
        self.assertEqual(statuses(again_transport), [b"HTTP/1.1 201 Created"])

    def test_failed_enrollment_frees_its_slot(self) -> None:
        """An enrollment refused by policy frees its slot too."""
        self.identity = identity_of(demo_pki().devices[1])  # CSR of devices[0]
        channel, transport = self.connect()
        channel.dataReceived(self.renewal())
        self.threadpool.run_all()
        self.assertEqual(statuses(transport), [b"HTTP/1.1 403 Forbidden"])
        self.assertEqual(self.site.enrollments.in_flight, 0)

    def test_limit_read_from_the_current_config(self) -> None:
        """A reloaded max-pending applies to the next request."""
        busy, _ = self.connect()
        busy.dataReceived(self.renewal())
        self.config = limited(self.config, max_pending=2)
        channel, _ = self.connect()
        channel.dataReceived(self.renewal())
        self.assertEqual(
            (self.site.enrollments.in_flight, len(self.threadpool.queued)), (2, 2)
        )

    def test_refusals_counted_and_logged_sparingly(self) -> None:
        """Every refusal is counted; the log says so at most once per 5 seconds."""
        busy, _ = self.connect()
        busy.dataReceived(self.renewal())
        with capturedLogs() as events:
            for _ in range(3):
                channel, _ = self.connect()
                channel.dataReceived(self.renewal())
            self.clock.advance(5)
            channel, _ = self.connect()
            channel.dataReceived(self.renewal())
        lines = [event for event in warnings(events) if "max_pending" in event]
        self.assertEqual([event["refused"] for event in lines], [1, 3])
        self.assertEqual(
            formatEvent(lines[0]),
            "max-pending reached (1 enrollments in flight): new enrollments get "
            "503; 1 refused since the last such message",
        )
        self.assertEqual(
            sample(self.metrics, "estd_requests_rejected_total", reason="max_pending"),
            4,
        )
        self.assertEqual(sample(self.metrics, "estd_enrollments_in_flight"), 1)
        self.assertEqual(
            sample(
                self.metrics,
                "estd_requests_total",
                operation="simplereenroll",
                label="",
                status="503",
            ),
            4,
        )
        self.threadpool.run_all()
        self.assertEqual(sample(self.metrics, "estd_enrollments_in_flight"), 0)


# --- Header and body timeouts ------------------------------------------------------


class RequestTimeoutTests(LimitsTestCase):
    """Request line, headers and body each have a deadline (2 s here)."""

    def trickle(
        self, channel: EstChannel, data: bytes, every: float, count: int
    ) -> None:
        """Send ``count`` bytes of ``data``, one each ``every`` seconds."""
        for byte in data[:count]:
            channel.dataReceived(bytes([byte]))
            self.clock.advance(every)

    def test_trickled_headers_cut_off(self) -> None:
        """A client sending its headers a byte at a time is aborted after 2 s."""
        channel, transport = self.connect()
        self.assertGreater(self.site.timeOut, 0.5)  # each byte within the idle timeout
        with capturedLogs() as events:
            self.trickle(channel, get(CACERTS), every=0.5, count=3)
            self.clock.advance(0.4)
            self.assertFalse(transport.disconnecting)
            channel.dataReceived(b"T")
            self.clock.advance(0.1)
            self.assertTrue(transport.aborted)
            channel.connectionLost(Failure(ConnectionAborted()))
        (warning,) = warnings(events)
        self.assertEqual(
            formatEvent(warning),
            "connection from 192.0.2.7 aborted: the request line and headers did "
            "not complete within 2s (header-timeout)",
        )
        self.assertEqual(
            (warning["client_address"], warning["phase"], warning["timeout"]),
            ("192.0.2.7", "headers", 2.0),
        )
        self.assertEqual(transport.writes, [])
        self.assertEqual(
            sample(self.metrics, "estd_connection_timeouts_total", phase="headers"), 1
        )

    def test_trickled_body_cut_off_without_a_worker(self) -> None:
        """A body trickled after prompt headers is aborted 2 s after the headers."""
        channel, transport = self.connect()
        request = self.renewal()
        head, _, body = request.partition(b"\r\n\r\n")
        with capturedLogs() as events:
            channel.dataReceived(head + b"\r\n\r\n")
            self.trickle(channel, body, every=0.5, count=4)
            self.assertTrue(transport.aborted)
        self.assertEqual(self.threadpool.queued, [])
        self.assertEqual(self.site.enrollments.in_flight, 0)
        (warning,) = warnings(events)
        self.assertEqual(
            (warning["phase"], warning["setting"]), ("body", "body-timeout")
        )
        self.assertIn(
            "the request body did not complete within 2s", formatEvent(warning)
        )

    def test_phases_have_separate_deadlines(self) -> None:
        """Headers in 1.5 s and the body in 1.5 s more pass: each phase has 2 s."""
        channel, transport = self.connect()
        request = self.renewal()
        split = request.index(b"\r\n\r\n") + 4
        channel.dataReceived(request[:10])
        self.clock.advance(1.5)
        channel.dataReceived(request[10:split])
        channel.dataReceived(request[split : split + 10])
        self.clock.advance(1.5)
        channel.dataReceived(request[split + 10 :])
        self.threadpool.run_all()
        self.assertEqual(statuses(transport), [b"HTTP/1.1 201 Created"])
        # Closed because the certificate was delivered, not cut off.
        self.assertEqual((transport.aborted, channel._timed_out), (False, False))

    def test_keep_alive_requests_not_cut(self) -> None:
        """Each request on a keep-alive connection gets its own header deadline."""
        channel, transport = self.connect()
        for _ in range(3):
            channel.dataReceived(get(CACERTS))
            self.clock.advance(1.9)
        self.assertEqual(statuses(transport), [b"HTTP/1.1 200 OK"] * 3)
        self.assertFalse(transport.disconnecting)

    def test_pipelined_requests_not_cut(self) -> None:
        """Two requests sent at once, the second slow to sign, are both answered."""
        channel, transport = self.connect()
        channel.dataReceived(get(CACERTS) + self.renewal())
        self.clock.advance(30)
        self.threadpool.run_all()
        self.assertEqual(
            statuses(transport), [b"HTTP/1.1 200 OK", b"HTTP/1.1 201 Created"]
        )
        self.assertEqual((transport.aborted, channel._timed_out), (False, False))

    def test_slow_signing_is_not_a_slow_client(self) -> None:
        """No deadline runs while a complete request is being processed."""
        channel, transport = self.connect()
        channel.dataReceived(self.renewal())
        self.clock.advance(self.site.timeOut + 30)
        self.assertFalse(transport.disconnecting)
        self.threadpool.run_all()
        self.assertEqual(statuses(transport), [b"HTTP/1.1 201 Created"])

    def test_idle_keep_alive_closed_in_order(self) -> None:
        """After a response, a connection idle for 2 s is closed, not aborted."""
        channel, transport = self.connect()
        channel.dataReceived(get(CACERTS))
        with capturedLogs() as events:
            self.clock.advance(2)
        self.assertEqual((transport.disconnecting, transport.aborted), (True, False))
        self.assertEqual(warnings(events), [])
        (line,) = [e for e in events if e.get("log_namespace") == "estd"]
        self.assertEqual(
            formatEvent(line),
            "closing idle connection from 192.0.2.7: no request within 2s "
            "(header-timeout)",
        )
        # A client that does not even take the close is aborted 2 s later.
        self.clock.advance(2)
        self.assertTrue(transport.aborted)

    def test_response_not_read_is_aborted(self) -> None:
        """A connection closing after its response is aborted if not gone in 2 s."""
        channel, transport = self.connect()
        channel.dataReceived(
            b"GET " + CACERTS.encode() + b" HTTP/1.1\r\nConnection: close\r\n\r\n"
        )
        self.assertEqual((transport.disconnecting, transport.aborted), (True, False))
        with capturedLogs() as events:
            self.clock.advance(2)
        self.assertTrue(transport.aborted)
        self.assertEqual(warnings(events), [])

    def test_twisted_idle_timeout_still_applies(self) -> None:
        """With long phase deadlines, Twisted's idle timeout still drops a client."""
        self.config = limited(self.config, header_timeout=600.0, body_timeout=600.0)
        self.site.timeOut = 5
        channel, transport = self.connect()
        channel.dataReceived(b"GET / HT")
        self.clock.advance(4.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(transport.disconnecting)

    def test_timeouts_read_from_the_current_config(self) -> None:
        """A reloaded header-timeout applies to the next phase that starts."""
        self.config = limited(self.config, header_timeout=5.0)
        channel, transport = self.connect()
        channel.dataReceived(b"GET / HT")
        self.clock.advance(4.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(transport.aborted)


# --- The TLS handshake ----------------------------------------------------------------


class HandshakeTimeoutTests(SynchronousTestCase):
    """The TLS handshake has handshake-timeout from the TCP connection (2 s here)."""

    def setUp(self) -> None:
        self.clock = ThreadlessClock()
        self.clock.advance(WALL_NOW.timestamp())
        self.config = limited(
            tls_pki().config, handshake_timeout=2.0, header_timeout=2.0
        )
        self.metrics = Metrics(lambda: self.config, self.clock.seconds)
        self.site = build_site(
            lambda: self.config,
            self.clock,
            HeldThreadPool(),
            metrics=self.metrics,
        )

    def connect(self, client: ClientSide) -> IOPump:
        """A TLS connection from a device to the site, not yet pumped."""
        server_side = TLSMemoryBIOFactory(
            ServerTLS(lambda: self.config), False, self.site, clock=self.clock
        )
        client_side = TLSMemoryBIOFactory(
            client_for(tls_pki().demo.devices[0]),
            True,
            OneProtocolFactory(client),
            clock=self.clock,
        )
        _, _, pump = connectedServerAndClient(
            lambda: server_side.buildProtocol(CLIENT_ADDRESS),
            lambda: client_side.buildProtocol(None),
            serverTransportFactory=lambda protocol: FakeTransport(
                protocol, isServer=True, peerAddress=CLIENT_ADDRESS
            ),
            greet=False,
            clock=self.clock,
        )
        return pump

    def test_stalled_handshake_aborted_once_logged(self) -> None:
        """A client trickling its ClientHello is aborted at 2 s, logged once."""
        client = ClientSide()
        pump = self.connect(client)
        hello = pump.clientIO.getOutBuffer()
        self.assertGreater(len(hello), 20)
        with capturedLogs() as events:
            for offset in range(0, 20, 5):
                pump.serverIO.bufferReceived(hello[offset : offset + 5])
                self.clock.advance(0.5)
            self.assertTrue(pump.serverIO.disconnecting)
            pump.flush()
        self.assertFalse(client.handshook)
        self.assertIsNotNone(client.lost)
        (warning,) = warnings(events)
        self.assertEqual(
            formatEvent(warning),
            "connection from 192.0.2.44 aborted: the TLS handshake did not "
            "complete within 2s (handshake-timeout)",
        )
        self.assertEqual(
            sample(self.metrics, "estd_connection_timeouts_total", phase="handshake"),
            1,
        )
        self.assertEqual(
            sample(
                self.metrics, "estd_tls_handshake_failures_total", reason="closed_early"
            ),
            None,
        )

    def test_headers_due_after_the_handshake(self) -> None:
        """After the handshake, a client trickling its request is aborted at 2 s."""
        client = ClientSide(greeting=b"GET /.well")
        pump = self.connect(client)
        pump.flush()
        self.assertTrue(client.handshook)
        with capturedLogs() as events:
            for byte in b"-known/est/cacerts":
                client.transport.write(bytes([byte]))
                pump.flush()
                self.clock.advance(0.25)
                if client.lost is not None:
                    break
                pump.flush()
        self.assertIsNotNone(client.lost)
        self.assertEqual(client.received, b"")
        (warning,) = warnings(events)
        self.assertEqual(warning["phase"], "headers")

    def test_prompt_client_over_tls(self) -> None:
        """A handshake and a request, each within its deadline, get the answer."""
        client = ClientSide()
        pump = self.connect(client)
        self.clock.advance(1.5)
        pump.flush()
        self.clock.advance(1.5)
        client.transport.write(get(CACERTS))
        pump.flush()
        self.assertTrue(client.received.startswith(b"HTTP/1.1 200 OK\r\n"))
        self.assertIsNone(client.lost)


# --- max-connections ------------------------------------------------------------------


class MaxConnectionsTests(SynchronousTestCase):
    """Beyond max-connections (2 here), new connections are refused on arrival."""

    def setUp(self) -> None:
        self.clock = ThreadlessClock()
        self.clock.advance(WALL_NOW.timestamp())
        self.config = limited(tls_pki().config, max_connections=2)
        self.metrics = Metrics(lambda: self.config, self.clock.seconds)
        site = build_site(
            lambda: self.config, self.clock, HeldThreadPool(), metrics=self.metrics
        )
        self.factory = ConnectionLimitedTLSFactory(
            ServerTLS(lambda: self.config),
            site,
            max_connections=lambda: self.config.max_connections,
            clock=self.clock,
            metrics=self.metrics,
        )

    def connect(self) -> tuple[ClientSide, IOPump]:
        """A device's TLS connection through the limited factory, handshake done."""
        client = ClientSide()
        client_side = TLSMemoryBIOFactory(
            client_for(tls_pki().demo.devices[0]),
            True,
            OneProtocolFactory(client),
            clock=self.clock,
        )
        _, _, pump = connectedServerAndClient(
            lambda: self.factory.buildProtocol(CLIENT_ADDRESS),
            lambda: client_side.buildProtocol(None),
            serverTransportFactory=lambda protocol: FakeTransport(
                protocol, isServer=True, peerAddress=CLIENT_ADDRESS
            ),
            greet=False,
            clock=self.clock,
        )
        pump.flush()
        self.assertTrue(client.handshook)
        return client, pump

    def ask(self, client: ClientSide, pump: IOPump) -> bytes:
        """The status line of a cacerts request on an open connection."""
        client.received = b""
        client.transport.write(get(CACERTS))
        pump.flush()
        return client.received.split(b"\r\n", 1)[0]

    def test_third_connection_refused_first_two_served(self) -> None:
        """The third connection gets no protocol (closed); the first two get answers."""
        first, first_pump = self.connect()
        second, second_pump = self.connect()
        with capturedLogs() as events:
            self.assertIsNone(self.factory.buildProtocol(CLIENT_ADDRESS))
        self.assertEqual(self.ask(first, first_pump), b"HTTP/1.1 200 OK")
        self.assertEqual(self.ask(second, second_pump), b"HTTP/1.1 200 OK")
        (warning,) = warnings(events)
        self.assertEqual(
            formatEvent(warning),
            "max-connections reached (2 open): new connections are closed; "
            "1 refused since the last such message (latest from 192.0.2.44)",
        )
        self.assertEqual(
            sample(
                self.metrics,
                "estd_connections_rejected_total",
                reason="max_connections",
            ),
            1,
        )

    def test_tls_protocol_offers_the_transports_interfaces(self) -> None:
        """estd's TLS protocol declares every interface of the transport it
        wraps (Twisted's own loop left only the last one declared)."""
        client, pump = self.connect()
        self.assertEqual(self.ask(client, pump), b"HTTP/1.1 200 OK")
        (protocol,) = self.factory.protocols
        self.assertIsInstance(protocol, EstTLSProtocol)
        wrapped = list(providedBy(protocol.transport))
        self.assertGreater(len(wrapped), 1)
        for interface in wrapped:
            self.assertTrue(interface.providedBy(protocol), interface)
        self.assertTrue(ISSLTransport.providedBy(protocol))

    def test_closed_connection_frees_its_place(self) -> None:
        """Once a connection closes, a new one is accepted."""
        first, first_pump = self.connect()
        self.connect()
        self.assertIsNone(self.factory.buildProtocol(CLIENT_ADDRESS))
        first.transport.loseConnection()
        first_pump.flush()
        self.assertEqual(self.factory.open_connections, 1)
        third, third_pump = self.connect()
        self.assertEqual(self.ask(third, third_pump), b"HTTP/1.1 200 OK")

    def test_refusals_logged_at_most_every_five_seconds(self) -> None:
        """A flood of refused connections gives one log line per 5 s, with a count."""
        self.connect()
        self.connect()
        with capturedLogs() as events:
            for _ in range(100):
                self.assertIsNone(self.factory.buildProtocol(CLIENT_ADDRESS))
                self.clock.advance(0.01)
            self.clock.advance(5)
            self.assertIsNone(self.factory.buildProtocol(CLIENT_ADDRESS))
        self.assertEqual([event["refused"] for event in warnings(events)], [1, 100])
        self.assertEqual(
            sample(
                self.metrics,
                "estd_connections_rejected_total",
                reason="max_connections",
            ),
            101,
        )

    def test_limit_read_at_connection_time(self) -> None:
        """A reloaded max-connections applies to the next connection."""
        self.connect()
        self.connect()
        self.config = limited(self.config, max_connections=3)
        self.connect()
        self.assertEqual(self.factory.open_connections, 3)


# --- End to end: the real twistd ---------------------------------------------------


def tls_connection(port: int, ca_file: Path) -> ssl.SSLSocket:
    """A TLS connection to 127.0.0.1:``port`` (as localhost), handshake done."""
    context = ssl.create_default_context(cafile=str(ca_file))
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    return context.wrap_socket(raw, server_hostname="localhost")


def closed_by_server(sock: socket.socket, within: float) -> bool:
    """Whether the server closes ``sock`` (EOF or reset) within ``within`` seconds."""
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def cacerts_status(sock: ssl.SSLSocket) -> bytes:
    """The status line of a cacerts request on an open TLS connection."""
    sock.sendall(get(CACERTS))
    received = b""
    while b"\r\n" not in received:
        chunk = sock.recv(4096)
        assert chunk, received
        received += chunk
    return received.split(b"\r\n", 1)[0]


@pytest.fixture(scope="module")
def limited_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EstServer]:
    """``twistd est`` with max-connections 2 and a 1 s handshake-timeout."""
    scratch = tmp_path_factory.mktemp("limits")
    port = free_port()
    done = run(
        [sys.executable, "-m", "estd.estctl", "demo", str(scratch / "pki"),
         "--port", str(port), "--devices", "1"]
    )  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()
    server = EstServer(
        scratch / "server",
        port,
        [
            "--config", str(scratch / "pki" / "est.ini"),
            "--max-connections", "2",
            "--handshake-timeout", "1s",
        ],
    )  # fmt: skip
    try:
        server.start()
        server.wait_until_listening()
        yield server
    finally:
        server.stop()


def test_real_server_closes_connections_beyond_the_limit(
    limited_server: EstServer,
) -> None:
    """With max-connections 2, a third TCP connection is closed at once, unserved."""
    ca_file = limited_server.workdir.parent / "pki" / "factory_ca.pem"
    first = tls_connection(limited_server.port, ca_file)
    second = tls_connection(limited_server.port, ca_file)
    try:
        third = socket.create_connection(("127.0.0.1", limited_server.port), timeout=5)
        with third:
            assert closed_by_server(third, within=2.0)
        assert cacerts_status(first) == b"HTTP/1.1 200 OK"
        assert cacerts_status(second) == b"HTTP/1.1 200 OK"
        poll(
            lambda: "max-connections reached (2 open)" in limited_server.log_text(),
            "the max-connections log line",
        )
    finally:
        first.close()
        second.close()


def accepted(port: int) -> socket.socket | None:
    """A TCP connection the server kept open for 0.3 s, or None if it closed it."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    if closed_by_server(sock, within=0.3):
        sock.close()
        return None
    return sock


def test_real_server_aborts_a_silent_handshake(limited_server: EstServer) -> None:
    """A TCP client that never starts TLS is cut off after handshake-timeout (1 s)."""
    # Earlier tests' connections may take a moment to be closed server-side.
    silent = poll(lambda: accepted(limited_server.port), "a free connection slot")
    with silent:
        assert closed_by_server(silent, within=5.0)
    poll(
        lambda: (
            "the TLS handshake did not complete within 1s (handshake-timeout)"
            in limited_server.log_text()
        ),
        "the handshake-timeout log line",
    )
