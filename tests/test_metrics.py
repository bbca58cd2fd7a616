"""Metrics and the admin listener: numbers after known traffic, probes, wiring.

Traffic is driven in memory as in ``tests/test_labels_web.py`` (``StubTreq``
against the real EST site) and ``tests/test_tls.py`` (real TLS handshakes
between two ``TLSMemoryBIOFactory`` sides); the metrics are then scraped
and parsed with prometheus_client's own text parser, so every assertion is
on what Prometheus would read.  One end-to-end test scrapes a real
``twistd est``.
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import json
import os
import re
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import MappingProxyType
from typing import Any
from unittest import mock

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from OpenSSL import SSL
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from estd.ca import CertificateAuthority
from estd.demo import Pair, make_pair
from estd.health import AdminSite, build_admin_site
from estd.ledger import Ledger
from estd.metrics import (
    HANDSHAKE_FAILURE_REASONS,
    TEXT_CONTENT_TYPE,
    Metrics,
    handshake_failure_category,
    request_operation,
)
from estd.pool import SigningThreadPool
from estd.reload import ConfigHolder
from estd.site import EstSite
from estd.tls import ServerTLS
from estd.web import build_site
from tests.e2e_support import (
    EstServer,
    fioconfig_csr,
    free_port,
    poll,
    reenroll,
    run,
)
from tests.pki import NOW, demo_config, demo_pki
from tests.test_labels_web import b64, labelled_config, serverkeygen_config
from tests.test_ledger import record
from tests.test_service import _options, _Reactor
from tests.test_tls import (
    CLIENT_ADDRESS,
    ClientTLS,
    Connection,
    ca_name,
    client_for,
    connect,
    device,
    expired_device,
    tls_pki,
)
from tests.test_web import (
    CACERTS,
    HeldThreadPool,
    ResourceTestCase,
    SynchronousThreadPool,
    ThreadlessClock,
    header,
    reenroll_csr,
)

pytest_plugins = ["tests.pg_support"]

EST = "/.well-known/est/"
JSON = [b"application/json"]

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(metrics: Metrics) -> Samples:
    """Every sample of a scrape, keyed by (sample name, sorted labels)."""
    content_type, body = metrics.render()
    assert content_type == TEXT_CONTENT_TYPE
    return parse(body)


def parse(body: bytes) -> Samples:
    """Parse the Prometheus text format into samples."""
    samples: Samples = {}
    for family in text_string_to_metric_families(body.decode("utf-8")):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    """The value of one sample, or None if it was not exposed."""
    return samples.get((name, tuple(sorted(labels.items()))))


def named(samples: Samples, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """All samples of one name, by their labels."""
    return {labels: v for (sample, labels), v in samples.items() if sample == name}


def days_left(certificate: x509.Certificate, seconds: float) -> float:
    """Days from ``seconds`` (POSIX) until ``certificate`` expires."""
    now = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return (certificate.not_valid_after_utc - now).total_seconds() / 86400


def request_labels(
    operation: str, label: str, status: int
) -> tuple[tuple[str, str], ...]:
    """The sorted labels of an ``estd_requests_total`` sample."""
    return (("label", label), ("operation", operation), ("status", str(status)))


def stepping_timer(step: float) -> Callable[[], float]:
    """A timer that advances by ``step`` each time it is read."""
    ticks = itertools.count()
    return lambda: next(ticks) * step


# --- Pure pieces ----------------------------------------------------------------------


class RequestOperationTests(SynchronousTestCase):
    """Which operation and label a request is counted under."""

    def test_paths(self) -> None:
        """EST paths map to their operation and configured label, all else to other."""
        labels = ("", "rfc", "other")
        cases = {
            b"/.well-known/est/simplereenroll": ("simplereenroll", ""),
            b"/.well-known/est/cacerts?x=1": ("cacerts", ""),
            b"/.well-known/est//simplereenroll": ("simplereenroll", ""),
            b"/.well-known/est/simpleenroll/": ("simpleenroll", ""),
            b"/.well-known/est/rfc/serverkeygen": ("serverkeygen", "rfc"),
            b"/.well-known/est/%72fc/csrattrs": ("csrattrs", "rfc"),
            b"/.well-known/est/nosuch/cacerts": ("other", ""),
            b"/.well-known/est/rfc/nosuch": ("other", ""),
            b"/.well-known/est/rfc/cacerts/more": ("other", ""),
            b"/.well-known/est/rfc": ("other", ""),
            b"/.well-known/est": ("other", ""),
            b"/": ("other", ""),
            b"": ("other", ""),
            b"/cacerts": ("other", ""),
            b"/.well-known/est/\xff": ("other", ""),
        }
        for uri, expected in cases.items():
            self.assertEqual((uri, request_operation(uri, labels)), (uri, expected))


class RequestCounterCacheTests(SynchronousTestCase):
    """request_answered remembers counters per URI, but never across reloads."""

    def test_counts_follow_a_reload_that_drops_a_label(self) -> None:
        config = labelled_config()
        metrics = Metrics(lambda: config, lambda: 0.0)
        uri = (EST + "rfc/simplereenroll").encode()
        for _ in range(3):
            metrics.request_answered(uri, 200)
        metrics.request_answered(b"/no/such/" + b"x" * 10, 404)
        config = demo_config()  # reloaded: no "rfc" label any more
        metrics.request_answered(uri, 200)
        self.assertEqual(
            named(scrape(metrics), "estd_requests_total"),
            {
                request_labels("simplereenroll", "rfc", 200): 3,
                request_labels("other", "", 200): 1,
                request_labels("other", "", 404): 1,
            },
        )


def test_ledger_commits_and_writes(tmp_path: Path) -> None:
    """A SQLite ledger reports its group commits; no ledger reports none."""
    ledger = Ledger.open(f"sqlite:///{tmp_path / 'ledger.db'}")
    try:
        config = demo_config()
        metrics = Metrics(lambda: config, lambda: 0.0, ledger=ledger)
        ledger.record_issuance(record(1))
        ledger.record_issuance(record(2))
        samples = scrape(metrics)
        assert value(samples, "estd_ledger_commits_total") == 2
        assert value(samples, "estd_ledger_writes_total") == 2
    finally:
        ledger.close()
    bare = scrape(Metrics(lambda: config, lambda: 0.0))
    assert named(bare, "estd_ledger_commits_total") == {}


class HandshakeCategoryTests(SynchronousTestCase):
    """The fixed set of handshake failure reasons."""

    def test_reason_texts(self) -> None:
        """Each reason text estd logs maps to its category; anything else is other."""
        cases = {
            "client certificate CN=d: it has expired": "expired",
            "chain certificate CN=ca: it has expired": "expired",
            "TLS error: sslv3 alert certificate expired": "expired",
            "client certificate CN=d: it is not yet valid": "not_yet_valid",
            "client certificate CN=d: it is not issued by a trusted CA "
            "(client-cas or the EST CA)": "unknown_ca",
            "client certificate CN=d: its issuer certificate is unknown": "unknown_ca",
            "chain certificate CN=r: its chain ends in a self-signed certificate "
            "that is not a trust anchor": "unknown_ca",
            "TLS error: tlsv1 alert unknown ca": "unknown_ca",
            "client certificate CN=d: it is not allowed for client authentication": (
                "not_client_auth"
            ),
            "client certificate CN=d does not allow clientAuth (ExtKeyUsage)": (
                "not_client_auth"
            ),
            "client certificate CN=ca is a CA certificate": "ca_as_client",
            "TLS error: unsupported protocol": "protocol_version",
            "TLS error: wrong version number": "protocol_version",
            "TLS error: no shared cipher": "no_shared_cipher",
            "connection closed before the TLS handshake completed "
            "(Connection was closed cleanly.)": "closed_early",
            "client certificate CN=d: its signature does not verify": "other",
            "TLS error: something new": "other",
        }
        for reason, category in cases.items():
            self.assertEqual(
                (reason, handshake_failure_category(reason)), (reason, category)
            )
        self.assertEqual(
            set(cases.values()) | {"other"}, set(HANDSHAKE_FAILURE_REASONS)
        )


# --- Requests and issuances through the EST site --------------------------------------


class MeteredResourceTestCase(ResourceTestCase):
    """The EST site in memory, counted in a fresh :class:`Metrics`."""

    def setUp(self) -> None:
        super().setUp()
        self.clock.advance(NOW.timestamp() - self.clock.seconds())
        self.metrics = Metrics(
            lambda: self.config,
            self.clock.seconds,
            self.threadpool,
            timer=stepping_timer(0.25),
        )

    metered = True

    def site(self) -> EstSite:
        """The EST site, counting into ``self.metrics`` if ``metered``."""
        return build_site(
            lambda: self.config,
            self.clock,
            self.threadpool,
            metrics=self.metrics if self.metered else None,
        )


class RequestMetricsTests(MeteredResourceTestCase):
    """Requests, issuances and their latency, after known traffic."""

    def test_known_traffic(self) -> None:
        """Each request is counted once under operation, label and status."""
        self.config = labelled_config()
        csr = b64(reenroll_csr(demo_pki().devices[0]))
        statuses = [
            self.reenroll(csr)[0].code,
            self.reenroll(csr)[0].code,
            self.reenroll(csr, path=EST + "rfc/simplereenroll")[0].code,
            self.reenroll(csr, path=EST + "other/simplereenroll")[0].code,
            self.request("GET", CACERTS)[0].code,
            self.request("GET", EST + "other/simplereenroll")[0].code,
            self.request("GET", EST + "nosuch/cacerts")[0].code,
            self.request("GET", "/")[0].code,
        ]
        self.assertEqual(statuses, [201, 201, 200, 403, 200, 405, 404, 404])
        samples = scrape(self.metrics)
        self.assertEqual(
            named(samples, "estd_requests_total"),
            {
                request_labels("simplereenroll", "", 201): 2,
                request_labels("simplereenroll", "rfc", 200): 1,
                request_labels("simplereenroll", "other", 403): 1,
                request_labels("cacerts", "", 200): 1,
                request_labels("simplereenroll", "other", 405): 1,
                request_labels("other", "", 404): 2,
            },
        )
        self.assertEqual(
            named(samples, "estd_certificates_issued_total"),
            {
                (("label", ""), ("operation", "simplereenroll")): 2,
                (("label", "rfc"), ("operation", "simplereenroll")): 1,
            },
        )
        self.assertEqual(
            named(samples, "estd_issuance_seconds_count"),
            {
                (("label", ""), ("operation", "simplereenroll")): 2,
                (("label", "rfc"), ("operation", "simplereenroll")): 1,
            },
        )
        # The stepping timer makes each issuance take exactly 0.25 s.
        self.assertEqual(
            value(
                samples,
                "estd_issuance_seconds_sum",
                operation="simplereenroll",
                label="",
            ),
            0.5,
        )
        for bound, count in (("0.1", 0), ("0.25", 2), ("+Inf", 2)):
            self.assertEqual(
                value(
                    samples,
                    "estd_issuance_seconds_bucket",
                    operation="simplereenroll",
                    label="",
                    le=bound,
                ),
                count,
            )

    def test_serverkeygen_counted_as_such(self) -> None:
        """A /serverkeygen issuance is counted under operation serverkeygen."""
        self.config = serverkeygen_config()
        csr = b64(reenroll_csr(demo_pki().devices[0]))
        response, _ = self.reenroll(csr, path=EST + "serverkeygen")
        self.assertEqual(response.code, 200)
        samples = scrape(self.metrics)
        labels = {"operation": "serverkeygen", "label": ""}
        self.assertEqual(value(samples, "estd_certificates_issued_total", **labels), 1)
        self.assertEqual(value(samples, "estd_issuance_seconds_count", **labels), 1)
        self.assertEqual(
            value(samples, "estd_requests_total", status="200", **labels), 1
        )

    def test_refusal_is_not_an_issuance(self) -> None:
        """A refused enrollment is a request, but neither timed nor issued."""
        self.identity = None
        response, _ = self.reenroll(b64(reenroll_csr(demo_pki().devices[0])))
        self.assertEqual(response.code, 401)
        samples = scrape(self.metrics)
        self.assertEqual(
            value(
                samples,
                "estd_requests_total",
                operation="simplereenroll",
                label="",
                status="401",
            ),
            1,
        )
        self.assertEqual(named(samples, "estd_certificates_issued_total"), {})
        self.assertEqual(named(samples, "estd_issuance_seconds_count"), {})

    def test_unmetered_site(self) -> None:
        """A site built without metrics serves as before and counts nothing."""
        self.metered = False
        self.assertIsNone(self.site().metrics)
        self.assertEqual(self.request("GET", CACERTS)[0].code, 200)
        self.assertEqual(named(scrape(self.metrics), "estd_requests_total"), {})

    def test_oversized_body_counted(self) -> None:
        """A body refused with 413 before it is read is still counted once."""
        site = self.site()
        channel = site.buildProtocol(CLIENT_ADDRESS)
        transport = StringTransport(peerAddress=CLIENT_ADDRESS)
        channel.makeConnection(transport)
        channel.dataReceived(
            b"POST /.well-known/est/simpleenroll HTTP/1.1\r\nHost: est.test\r\n"
            b"Content-Type: application/pkcs10\r\nContent-Length: 99999999\r\n\r\n"
        )
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 413 "))
        self.assertEqual(
            value(
                scrape(self.metrics),
                "estd_requests_total",
                operation="simpleenroll",
                label="",
                status="413",
            ),
            1,
        )


# --- TLS: handshake failures and connections ------------------------------------------


class TCPTransport(StringTransport):
    """A ``StringTransport`` that takes the TCP option TLS sets."""

    def setTcpNoDelay(self, enabled: bool) -> None:
        """Nothing to set in memory."""


class TLSMetricsTests(SynchronousTestCase):
    """Handshake failures by reason and active connections, over real TLS."""

    def setUp(self) -> None:
        self.config = tls_pki().config
        self.clock = ThreadlessClock()
        self.metrics = Metrics(lambda: self.config, self.clock.seconds)
        self.site = build_site(
            lambda: self.config,
            self.clock,
            SynchronousThreadPool(),
            metrics=self.metrics,
        )

    def connect(self, client: ClientTLS) -> Connection:
        """One in-memory TLS connection to the metered EST site."""
        return connect(client, server_factory=self.site)

    def failures(self) -> dict[str, float]:
        """The handshake failure counters by reason."""
        return {
            dict(labels)["reason"]: count
            for labels, count in named(
                scrape(self.metrics), "estd_tls_handshake_failures_total"
            ).items()
        }

    def active(self) -> float | None:
        """The active connections gauge."""
        return value(scrape(self.metrics), "estd_active_connections")

    def test_failures_by_reason(self) -> None:
        """Each refused handshake is counted once under its reason category."""
        pki = tls_pki()
        now = datetime.datetime.now(datetime.UTC)
        stranger_ca = make_pair(ca_name("stranger-CA"), None, ca=True, now=now)
        # A CA certificate that OpenSSL's purpose check lets through (no
        # KeyUsage, clientAuth in ExtKeyUsage): estd's own check refuses it.
        ca_key = ec.generate_private_key(ec.SECP256R1())
        client_shaped_ca = (
            x509.CertificateBuilder()
            .subject_name(ca_name("client-shaped-CA"))
            .issuer_name(pki.demo.device_ca.certificate.subject)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .add_extension(
                x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.CLIENT_AUTH]), False
            )
            .sign(pki.demo.device_ca.key, hashes.SHA256())
        )
        clients = [
            client_for(expired_device(pki.demo.device_ca)),
            client_for(expired_device(pki.demo.device_ca)),
            client_for(
                device(pki.demo.device_ca, not_before=now + datetime.timedelta(days=1))
            ),
            client_for(device(stranger_ca)),
            client_for(Pair(client_shaped_ca, ca_key)),
            client_for(
                device(
                    pki.demo.device_ca,
                    extended_usage=[x509.ExtendedKeyUsageOID.SERVER_AUTH],
                )
            ),
            client_for(
                pki.demo.devices[0],
                min_version=SSL.TLS1_1_VERSION,
                max_version=SSL.TLS1_1_VERSION,
                ciphers=b"DEFAULT:@SECLEVEL=0",
            ),
            client_for(
                pki.demo.devices[0],
                max_version=SSL.TLS1_2_VERSION,
                ciphers=b"ECDHE-ECDSA-AES128-SHA:@SECLEVEL=0",
            ),
        ]
        for client in clients:
            connection = self.connect(client)
            self.assertIsNotNone(connection.client.lost)
        self.assertEqual(
            self.failures(),
            {
                "expired": 2,
                "not_yet_valid": 1,
                "unknown_ca": 1,
                "not_client_auth": 1,
                "ca_as_client": 1,
                "protocol_version": 1,
                "no_shared_cipher": 1,
            },
        )
        self.assertEqual(self.active(), 0)

    def test_closed_before_handshake(self) -> None:
        """A client that connects and leaves without a TLS byte is closed_early."""
        factory = TLSMemoryBIOFactory(ServerTLS(lambda: self.config), False, self.site)
        protocol = factory.buildProtocol(CLIENT_ADDRESS)
        protocol.makeConnection(TCPTransport(peerAddress=CLIENT_ADDRESS))
        self.assertEqual(self.active(), 1)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.failures(), {"closed_early": 1})
        self.assertEqual(self.active(), 0)

    def test_active_connections_up_and_down(self) -> None:
        """Open connections are counted while they last, handshake or not."""
        first = self.connect(client_for(tls_pki().demo.devices[0]))
        self.assertTrue(first.client.handshook)
        self.assertEqual(self.active(), 1)
        second = self.connect(client_for(None))
        self.assertTrue(second.client.handshook)
        self.assertEqual(self.active(), 2)
        first.client.transport.loseConnection()
        first.pump.flush()
        self.assertEqual(self.active(), 1)
        second.client.transport.loseConnection()
        second.pump.flush()
        self.assertEqual(self.active(), 0)
        self.assertEqual(self.failures(), {})


# --- Scrape-time gauges ---------------------------------------------------------------


class ExpiryGaugeTests(SynchronousTestCase):
    """Days until the TLS certificate, each EST CA and each root expire."""

    def test_days_left(self) -> None:
        """Each served certificate has a gauge equal to its days left now."""
        config = labelled_config()
        clock = ThreadlessClock()
        clock.advance(NOW.timestamp() + 3600.5)
        metrics = Metrics(lambda: config, clock.seconds)
        tls = config.tls_certificates[0]
        tls_subject = tls.subject.rfc4514_string()
        tls_key = (("kind", "tls"), ("label", ""), ("subject", tls_subject))
        expected = {tls_key: days_left(tls, clock.seconds())}
        for name, label in config.labels.items():
            for kind, certificate in (
                ("ca", label.ca.certificate),
                *(("root", root) for root in label.root_certificates),
            ):
                subject = certificate.subject.rfc4514_string()
                key = (("kind", kind), ("label", name), ("subject", subject))
                expected[key] = days_left(certificate, clock.seconds())
        self.assertEqual(len(expected), 1 + 3 * 2)
        self.assertEqual(
            named(scrape(metrics), "estd_certificate_expiry_days"), expected
        )

    def test_follows_the_clock_and_reloads(self) -> None:
        """The gauges are computed when scraped: from the current time and config."""
        holder = ConfigHolder(labelled_config())
        clock = ThreadlessClock()
        clock.advance(NOW.timestamp())
        metrics = Metrics(holder, clock.seconds)
        tls = holder.config.tls_certificates[0]
        past_expiry = tls.not_valid_after_utc.timestamp() + 86400 * 2
        clock.advance(past_expiry - clock.seconds())
        samples = scrape(metrics)
        self.assertEqual(
            value(
                samples,
                "estd_certificate_expiry_days",
                kind="tls",
                label="",
                subject=tls.subject.rfc4514_string(),
            ),
            -2,
        )
        holder.config = demo_config()
        labels = {
            dict(key)["label"]
            for key in named(scrape(metrics), "estd_certificate_expiry_days")
        }
        self.assertEqual(labels, {""})


class ThreadPoolGaugeTests(SynchronousTestCase):
    """Queue depth and busy threads, read from the signing thread pool."""

    def gauges(self, pool: object) -> tuple[float | None, float | None]:
        """(queue depth, busy threads) as scraped."""
        samples = scrape(Metrics(demo_config, ThreadlessClock().seconds, pool))
        return (
            value(samples, "estd_threadpool_queue_depth"),
            value(samples, "estd_threadpool_busy_threads"),
        )

    def test_queued_work(self) -> None:
        """Work given to a pool that has no thread free is the queue depth."""
        pool = SigningThreadPool(2, name="estd-test")
        for _ in range(3):
            # Not started: it stays queued.
            pool.callInThreadWithCallback(None, lambda: None)
        self.assertEqual(self.gauges(pool), (3, 0))

    def test_busy_threads(self) -> None:
        """Threads running a call are busy; the calls behind them are queued."""
        pool = SigningThreadPool(3, name="estd-test")
        started, release = threading.Semaphore(0), threading.Event()

        def hold() -> None:
            started.release()
            release.wait(30)

        for _ in range(8):
            pool.callInThreadWithCallback(None, hold)
        pool.start()
        self.addCleanup(pool.stop)
        self.addCleanup(release.set)
        for _ in range(3):
            self.assertTrue(started.acquire(timeout=30))
        self.assertEqual(self.gauges(pool), (5, 3))

    def test_pool_without_statistics(self) -> None:
        """A pool without statistics exposes no samples, and no error."""
        self.assertEqual(self.gauges(SynchronousThreadPool()), (None, None))


class RegistryTests(SynchronousTestCase):
    """Each Metrics has its own registry."""

    def test_independent_instances(self) -> None:
        """Two Metrics in one process count separately."""
        first = Metrics(demo_config, ThreadlessClock().seconds)
        second = Metrics(demo_config, ThreadlessClock().seconds)
        first.handshake_failed("TLS error: no shared cipher")
        self.assertEqual(
            value(
                scrape(first),
                "estd_tls_handshake_failures_total",
                reason="no_shared_cipher",
            ),
            1,
        )
        self.assertEqual(named(scrape(second), "estd_tls_handshake_failures_total"), {})


# --- The admin site -------------------------------------------------------------------


class AdminSiteTests(SynchronousTestCase):
    """``/metrics``, ``/healthz`` and ``/readyz`` on the admin listener."""

    def setUp(self) -> None:
        self.config = demo_config()
        self.clock = ThreadlessClock()
        self.clock.advance(NOW.timestamp())
        self.threadpool: SynchronousThreadPool = SynchronousThreadPool()
        self.metrics = Metrics(lambda: self.config, self.clock.seconds)
        self.ledger: Ledger | None = None

    def open_ledger(self) -> Ledger:
        """A real SQLite ledger in a temporary directory."""
        directory = tempfile.mkdtemp(prefix="estd-metrics-")
        self.addCleanup(shutil.rmtree, directory)
        ledger = Ledger.open("sqlite:///" + os.path.join(directory, "l.sqlite3"))
        self.addCleanup(ledger.close)
        return ledger

    def get(self, path: str, method: str = "GET") -> tuple[Any, bytes]:
        """One finished request to the admin site."""
        from treq.testing import StubTreq

        site = build_admin_site(
            self.metrics, lambda: self.config, self.clock, self.threadpool, self.ledger
        )
        stub = StubTreq(site.resource)
        stub._agent._serverFactory = site
        pending = stub.request(method, "http://admin.test" + path)
        stub.flush()
        self.stub = stub
        response = self.successResultOf(pending)
        return response, self.successResultOf(response.content())

    def assert_json(self, response: Any, body: bytes, status: int, doc: Any) -> None:
        """A short JSON answer with its status, type and length."""
        self.assertEqual((response.code, json.loads(body)), (status, doc))
        self.assertEqual(header(response, "Content-Type"), JSON)
        self.assertEqual(response.length, len(body))
        self.assertLess(len(body), 200)

    def test_healthz(self) -> None:
        """/healthz answers 200 {"status": "ok"} while the process runs."""
        response, body = self.get("/healthz")
        self.assert_json(response, body, 200, {"status": "ok"})

    def test_metrics(self) -> None:
        """/metrics is the Prometheus text format with its Content-Type."""
        self.metrics.handshake_failed("TLS error: unsupported protocol")
        response, body = self.get("/metrics")
        self.assertEqual(response.code, 200)
        self.assertEqual(
            header(response, "Content-Type"),
            [b"text/plain; version=0.0.4; charset=utf-8"],
        )
        self.assertEqual(response.length, len(body))
        samples = parse(body)
        self.assertEqual(
            value(
                samples,
                "estd_tls_handshake_failures_total",
                reason="protocol_version",
            ),
            1,
        )
        self.assertEqual(value(samples, "estd_active_connections"), 0)

    def test_head(self) -> None:
        """HEAD /healthz has the headers of GET and no body."""
        response, body = self.get("/healthz", method="HEAD")
        self.assertEqual((response.code, body), (200, b""))
        self.assertEqual(header(response, "Content-Type"), JSON)

    def test_other_paths(self) -> None:
        """Any other path is a short text 404; other methods are 405."""
        for path in ("/", "/metrics/", "/healthz/x", "/.well-known/est/cacerts"):
            response, body = self.get(path)
            self.assertEqual((path, response.code), (path, 404))
            self.assertEqual(
                header(response, "Content-Type"), [b"text/plain; charset=utf-8"]
            )
            self.assertEqual(body, b"not found: try /metrics\n")
        response, _ = self.get("/metrics", method="POST")
        self.assertEqual(response.code, 405)
        self.assertEqual(header(response, "Allow"), [b"GET, HEAD"])

    def test_ready_then_ledger_unavailable(self) -> None:
        """/readyz is 200 with a reachable ledger and 503 naming it once closed."""
        self.ledger = self.open_ledger()
        response, body = self.get("/readyz")
        self.assert_json(response, body, 200, {"status": "ready"})
        self.ledger.close()
        response, body = self.get("/readyz")
        self.assert_json(
            response,
            body,
            503,
            {
                "status": "not ready",
                "reason": "the ledger is unavailable: the ledger is closed",
            },
        )

    def test_ready_without_ledger(self) -> None:
        """Without a ledger, a responsive pool and valid certificates are ready."""
        response, body = self.get("/readyz")
        self.assert_json(response, body, 200, {"status": "ready"})

    def test_stuck_thread_pool(self) -> None:
        """/readyz waits 2 s for the thread pool, then answers 503 saying so."""
        from treq.testing import StubTreq

        self.ledger = self.open_ledger()
        held = HeldThreadPool()
        self.threadpool = held
        site = build_admin_site(
            self.metrics, lambda: self.config, self.clock, held, self.ledger
        )
        stub = StubTreq(site.resource)
        stub._agent._serverFactory = site
        pending = stub.request("GET", "http://admin.test/readyz")
        stub.flush()
        self.clock.advance(1.9)
        stub.flush()
        self.assertNoResult(pending)
        self.clock.advance(0.1)
        stub.flush()
        response = self.successResultOf(pending)
        body = self.successResultOf(response.content())
        self.assert_json(
            response,
            body,
            503,
            {
                "status": "not ready",
                "reason": "the signing thread pool did not answer within 2s",
            },
        )
        # The no-op that finally runs finds its answer already given.
        held.run_all()
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_expired_certificates(self) -> None:
        """/readyz is 503 once the TLS certificate has expired, and says so."""
        tls = self.config.tls_certificates[0]
        self.clock.advance(tls.not_valid_after_utc.timestamp() + 1 - NOW.timestamp())
        response, body = self.get("/readyz")
        until = tls.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
        self.assert_json(
            response,
            body,
            503,
            {
                "status": "not ready",
                "reason": f"the TLS certificate (tls-cert) expired on {until}",
            },
        )

    def test_expired_label_ca(self) -> None:
        """/readyz is 503 once a label's EST CA has expired, naming the label."""
        pki = demo_pki()
        short_lived = make_pair(
            pki.est_ca.certificate.subject, pki.root, ca=True, now=NOW, days=1
        )
        config = labelled_config()
        rfc = dataclasses.replace(
            config.labels["rfc"],
            ca=CertificateAuthority(short_lived.certificate, short_lived.key),
        )
        self.config = dataclasses.replace(
            config, labels=MappingProxyType({**config.labels, "rfc": rfc})
        )
        response, body = self.get("/readyz")
        self.assertEqual(response.code, 200)
        self.clock.advance(2 * 86400)
        response, body = self.get("/readyz")
        until = short_lived.certificate.not_valid_after_utc
        self.assert_json(
            response,
            body,
            503,
            {
                "status": "not ready",
                "reason": f"the EST CA of label rfc (ca-cert) expired on "
                f"{until:%Y-%m-%dT%H:%M:%SZ}",
            },
        )


def _result_of(pending: defer.Deferred[Any]) -> Any:
    """The result of a Deferred that has fired (pytest has no successResultOf)."""
    results: list[Any] = []
    pending.addBoth(results.append)
    assert len(results) == 1, "the Deferred has not fired"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def test_readyz_postgresql_stopped(private_postgresql: Any) -> None:
    """/readyz is 503 naming the ledger when its PostgreSQL server is stopped."""
    from treq.testing import StubTreq

    config = demo_config()
    clock = ThreadlessClock()
    clock.advance(NOW.timestamp())
    ledger = Ledger.open(private_postgresql.url, timeout=2)
    try:
        site = build_admin_site(
            Metrics(lambda: config, clock.seconds),
            lambda: config,
            clock,
            SynchronousThreadPool(),
            ledger,
        )

        def readyz() -> tuple[int, Any]:
            stub = StubTreq(site.resource)
            stub._agent._serverFactory = site
            pending = stub.request("GET", "http://admin.test/readyz")
            stub.flush()
            response = _result_of(pending)
            return response.code, json.loads(_result_of(response.content()))

        assert readyz() == (200, {"status": "ready"})
        private_postgresql.stop()
        code, document = readyz()
        assert code == 503
        assert document["status"] == "not ready"
        assert document["reason"].startswith("the ledger is unavailable: ")
    finally:
        ledger.close()


# --- Wiring ---------------------------------------------------------------------------


class AdminListenerWiringTests(SynchronousTestCase):
    """makeService starts the admin listener when admin-listen is set."""

    def setUp(self) -> None:
        from tests.pki import write_pki

        self.directory = tempfile.mkdtemp(prefix="estd-metrics-svc-")
        self.addCleanup(shutil.rmtree, self.directory)
        self.ini = write_pki(self.directory)

    def start(self, *argv: str) -> MemoryReactorClock:
        """makeService with ``argv`` on a memory reactor, started."""
        from estd.tap import makeService

        reactor = _Reactor()
        options = _options(
            "--config", self.ini, "--listen", "tcp:18443:interface=127.0.0.1", *argv
        )
        top = makeService(options, reactor=reactor)
        top.privilegedStartService()
        top.startService()
        self.addCleanup(top.stopService)
        return reactor

    def test_second_listener(self) -> None:
        """admin-listen adds a plain-HTTP listener for the admin site."""
        reactor = self.start("--admin-listen", "tcp:19443:interface=127.0.0.1")
        listeners = {port: (factory, interface) for port, factory, _, interface in (
            reactor.tcpServers
        )}  # fmt: skip
        self.assertEqual(sorted(listeners), [18443, 19443])
        self.assertIsInstance(listeners[18443][0], TLSMemoryBIOFactory)
        admin, interface = listeners[19443]
        self.assertIsInstance(admin, AdminSite)
        self.assertEqual(interface, "127.0.0.1")

    def test_default_is_loopback_9443(self) -> None:
        """Without admin-listen the admin site listens on 127.0.0.1:9443."""
        reactor = self.start()
        admin = [
            (p, i) for p, f, _, i in reactor.tcpServers if isinstance(f, AdminSite)
        ]
        self.assertEqual(admin, [(9443, "127.0.0.1")])

    def test_empty_is_off(self) -> None:
        """An empty admin-listen starts no admin listener."""
        reactor = self.start("--admin-listen=")
        [(port, factory, _, _)] = reactor.tcpServers
        self.assertEqual(port, 18443)
        self.assertIsInstance(factory, TLSMemoryBIOFactory)

    def test_bad_endpoint(self) -> None:
        """An unparseable admin-listen is a configuration error naming the key."""
        import io

        from estd.tap import makeService

        stderr = io.StringIO()
        reactor = MemoryReactorClock()
        with mock.patch.object(sys, "stderr", stderr):
            with self.assertRaises(SystemExit) as raised:
                makeService(
                    _options("--config", self.ini, "--admin-listen", "bogus:1"),
                    reactor=reactor,
                )
        self.assertEqual(raised.exception.code, 2)
        self.assertEqual(
            stderr.getvalue(),
            f"estd: configuration error: {self.ini}: admin-listen: "
            "'bogus:1' is not a server endpoint: Unknown endpoint type: 'bogus'\n",
        )
        self.assertEqual(reactor.tcpServers, [])


# --- The Grafana dashboard -----------------------------------------------------------

DASHBOARD = Path(__file__).resolve().parent.parent / "contrib" / "grafana-estd.json"


def exposed_names(metrics: Metrics) -> set[str]:
    """Every sample name a scrape of ``metrics`` can contain."""
    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_sum", "_count"),
        "gauge": ("",),
    }
    return {
        family.name + suffix
        for family in metrics.registry.collect()
        for suffix in suffixes[family.type]
    }


class DashboardTests(SynchronousTestCase):
    """``contrib/grafana-estd.json`` is a dashboard over the metrics estd has."""

    def test_queries_only_known_metrics(self) -> None:
        """Every query names metrics estd exposes, through the datasource variable."""
        dashboard = json.loads(DASHBOARD.read_text())
        variables = {v["name"]: v for v in dashboard["templating"]["list"]}
        self.assertEqual(variables["datasource"]["type"], "datasource")
        self.assertEqual(variables["datasource"]["query"], "prometheus")
        known = exposed_names(Metrics(demo_config, ThreadlessClock().seconds))
        used: set[str] = set()
        for panel in dashboard["panels"]:
            if panel["type"] == "row":
                continue
            self.assertEqual(panel["datasource"]["uid"], "${datasource}")
            for query in panel["targets"]:
                used |= set(re.findall(r"estd_[a-z_]+", query["expr"]))
        self.assertLessEqual(used, known)
        # Everything the issue asks to see is on the dashboard.
        self.assertEqual(
            {name for name in known if not name.endswith(("_sum", "_count"))} - used,
            set(),
        )

    def test_expiry_thresholds(self) -> None:
        """The expiry panel turns orange under 30 days and red under 7."""
        dashboard = json.loads(DASHBOARD.read_text())
        (expiry,) = [
            panel
            for panel in dashboard["panels"]
            if any(
                "estd_certificate_expiry_days" in query["expr"]
                for query in panel.get("targets", [])
            )
        ]
        steps = expiry["fieldConfig"]["defaults"]["thresholds"]["steps"]
        self.assertEqual(
            [(step["color"], step["value"]) for step in steps],
            [("red", None), ("orange", 7), ("green", 30)],
        )


# --- End to end -----------------------------------------------------------------------


@pytest.fixture
def metered_server(tmp_path: Path) -> Iterator[tuple[EstServer, Path, int]]:
    """``twistd -n est`` on the demo PKI with the admin listener on a free port."""
    port = free_port()
    admin_port = poll(lambda: (p := free_port()) != port and p, "a second port")
    done = run(
        [sys.executable, "-m", "estd.estctl", "demo", str(tmp_path / "pki"),
         "--port", str(port)]
    )  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()
    server = EstServer(
        tmp_path / "server",
        port,
        ["--config", str(tmp_path / "pki" / "est.ini")],
        admin_listen=f"tcp:{admin_port}:interface=127.0.0.1",
    )
    try:
        server.start()
        server.wait_until_listening()
        poll(
            lambda: f"starting on {admin_port}" in server.log_text(),
            "the admin listener",
        )
        yield server, tmp_path / "pki", admin_port
    finally:
        server.stop()


def test_scrape_real_server(metered_server: tuple[EstServer, Path, int]) -> None:
    """A renewal through a real twistd shows up on its admin listener's /metrics."""
    server, pki, admin_port = metered_server
    work = server.workdir / "renewal"
    csr = fioconfig_csr(pki / "device.pem", work, "renewal")
    response = reenroll(
        server, pki, pki / "device.pem", pki / "device.key", csr.body, work
    )
    assert response.status_line == b"HTTP/1.1 201 Created"

    def admin(path: str) -> tuple[bytes, bytes]:
        done = run(
            ["curl", "-sS", "--max-time", "10", "-D", "-",
             f"http://127.0.0.1:{admin_port}{path}"]
        )  # fmt: skip
        assert done.returncode == 0, done.stderr.decode()
        head, _, body = done.stdout.partition(b"\r\n\r\n")
        return head, body

    head, body = admin("/metrics")
    assert b"\r\ncontent-type: text/plain; version=0.0.4; charset=utf-8" in head.lower()
    text = body.decode()
    assert (
        'estd_requests_total{label="",operation="simplereenroll",status="201"} 1.0'
        in text.splitlines()
    )
    samples = parse(body)
    assert (
        value(
            samples,
            "estd_certificates_issued_total",
            operation="simplereenroll",
            label="",
        )
        == 1
    )
    kinds = {
        dict(labels)["kind"]
        for labels in named(samples, "estd_certificate_expiry_days")
    }
    assert kinds == {"tls", "ca", "root"}
    assert value(samples, "estd_threadpool_queue_depth") == 0
    _, body = admin("/readyz")
    assert json.loads(body) == {"status": "ready"}
    _, body = admin("/healthz")
    assert json.loads(body) == {"status": "ok"}
