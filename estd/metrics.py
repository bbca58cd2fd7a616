"""Prometheus metrics: what estd counts, and what it reads at scrape time.

A :class:`Metrics` owns its own ``CollectorRegistry`` (never the library's
global one), so several servers in one process, and the tests, each see only
their own numbers.  Counters are bumped from the HTTP layer (requests, TLS
handshake failures, connections) and from the signing threads (issuance
latency, certificates issued; prometheus_client's values are thread-safe).
Expiry days and thread-pool gauges are computed when scraped, from the
configuration snapshot and the pool as they are at that moment.
"""

from __future__ import annotations

import datetime
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from cryptography import x509
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest

from estd.config import OPERATION_NAMES, Config

T = TypeVar("T")

TEXT_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The Prometheus text exposition format that ``generate_latest`` writes."""

OTHER = "other"
"""The operation of a request that is no EST operation (bounded cardinality)."""

ISSUANCE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
"""Seconds: signing takes milliseconds, a bcrypt check a quarter second, a
slow database or a busy HSM seconds."""

HANDSHAKE_FAILURE_REASONS = (
    "expired",
    "not_yet_valid",
    "unknown_ca",
    "not_client_auth",
    "ca_as_client",
    "protocol_version",
    "no_shared_cipher",
    "closed_early",
    "other",
)
"""The ``reason`` label values of ``estd_tls_handshake_failures_total``."""

# Checked in order against the reason text of estd.tls.handshake_failure_reason
# (our verify callback's words, or OpenSSL's); the first match wins.
_REASON_PATTERNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("closed_early", ("connection closed before the tls handshake completed",)),
    ("ca_as_client", ("is a ca certificate",)),
    ("expired", ("it has expired", "certificate expired")),
    ("not_yet_valid", ("it is not yet valid", "certificate is not yet valid")),
    (
        "not_client_auth",
        ("not allowed for client authentication", "does not allow clientauth"),
    ),
    (
        "unknown_ca",
        (
            "not issued by a trusted ca",
            "issuer certificate is unknown",
            "not a trust anchor",
            "unknown ca",
            "certificate verify failed",
        ),
    ),
    (
        "protocol_version",
        (
            "unsupported protocol",
            "wrong version number",
            "protocol version",
            "version too low",
        ),
    ),
    (
        "no_shared_cipher",
        ("no shared cipher", "no suitable signature algorithm", "no cipher"),
    ),
)


CONNECTION_PHASES = ("handshake", "headers", "body")
"""The ``phase`` label values of ``estd_connection_timeouts_total``."""


def handshake_failure_category(reason: str) -> str:
    """The ``reason`` label for a TLS handshake failure's one-line reason."""
    text = reason.lower()
    for category, needles in _REASON_PATTERNS:
        if any(needle in text for needle in needles):
            return category
    return OTHER


def request_operation(uri: bytes, labels: Iterable[str]) -> tuple[str, str]:
    """(operation, label) of a request URI, for metric labels.

    Only the EST operation names and the configured labels are ever
    returned, so a client sending random paths cannot make new time series;
    everything else is ``("other", "")``.  Empty segments are skipped as the
    resources skip them (fioconfig's ``est//simplereenroll``).
    """
    path = uri.split(b"?", 1)[0]
    segments = [
        urllib.parse.unquote_to_bytes(segment).decode("utf-8", "replace")
        for segment in path.split(b"/")
    ]
    segments = [segment for segment in segments if segment]
    if segments[:2] != [".well-known", "est"]:
        return OTHER, ""
    rest = segments[2:]
    if len(rest) == 1 and rest[0] in OPERATION_NAMES:
        return rest[0], ""
    if len(rest) == 2 and rest[0] in set(labels) and rest[1] in OPERATION_NAMES:
        return rest[1], rest[0]
    return OTHER, ""


ANSWERED_CACHE = 256
"""URIs (with status) whose request counter Metrics.request_answered keeps."""


class Metrics:
    """estd's metrics in a registry of their own; :meth:`render` is /metrics.

    ``config_source`` returns the current configuration snapshot (the
    labels and the certificates whose expiry is reported), ``clock`` the
    current time in POSIX seconds (``reactor.seconds``), ``threadpool`` is
    the signing pool whose queue is reported (a pool without
    ``statistics()`` reports nothing), ``ledger`` the ledger whose group
    commits are reported.  ``timer`` measures issuance
    durations inside the signing threads.
    """

    def __init__(
        self,
        config_source: Callable[[], Config],
        clock: Callable[[], float],
        threadpool: object | None = None,
        timer: Callable[[], float] = time.perf_counter,
        ledger: object | None = None,
    ) -> None:
        self._config_source = config_source
        self._timer = timer
        self.registry = CollectorRegistry(auto_describe=False)
        self.requests = Counter(
            "estd_requests",
            "HTTP requests answered, by EST operation, CA label and status.",
            ["operation", "label", "status"],
            registry=self.registry,
        )
        self.issuance_seconds = Histogram(
            "estd_issuance_seconds",
            "Time an issuance spends in the signing thread pool "
            "(authenticate, decide, sign, record).",
            ["operation", "label"],
            buckets=ISSUANCE_BUCKETS,
            registry=self.registry,
        )
        self.certificates_issued = Counter(
            "estd_certificates_issued",
            "Certificates sent to clients, by EST operation and CA label.",
            ["operation", "label"],
            registry=self.registry,
        )
        self.tls_handshake_failures = Counter(
            "estd_tls_handshake_failures",
            "TLS handshakes that failed, by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.active_connections = Gauge(
            "estd_active_connections",
            "Connections open on the EST listener.",
            registry=self.registry,
        )
        self.requests_rejected = Counter(
            "estd_requests_rejected",
            "Requests refused before any work, by reason (max_pending: "
            "an enrollment answered 503 because max-pending were in flight).",
            ["reason"],
            registry=self.registry,
        )
        self.requests_rejected.labels("max_pending")
        self.connections_rejected = Counter(
            "estd_connections_rejected",
            "Connections closed on arrival, by reason (max_connections).",
            ["reason"],
            registry=self.registry,
        )
        self.connections_rejected.labels("max_connections")
        self.connection_timeouts = Counter(
            "estd_connection_timeouts",
            "Connections aborted because a phase took too long: the TLS "
            "handshake, the request headers or the request body.",
            ["phase"],
            registry=self.registry,
        )
        for phase in CONNECTION_PHASES:
            self.connection_timeouts.labels(phase)
        self.enrollments_in_flight = Gauge(
            "estd_enrollments_in_flight",
            "Enrollments admitted and not yet answered (bounded by max-pending).",
            registry=self.registry,
        )
        self.registry.register(ThreadPoolCollector(threadpool))
        self.registry.register(ExpiryCollector(config_source, clock))
        self.registry.register(LedgerWritesCollector(ledger))
        self._answered: dict[tuple[bytes, int], Any] = {}
        """(URI, status) -> its child of ``requests``, for the current labels."""
        self._answered_labels: object = None

    # --- Hooks ---

    def request_answered(self, uri: bytes, status: int) -> None:
        """Count one answered request (called once per request, when logged).

        The counter of an EST operation's URI is remembered (per set of
        labels, at most ANSWERED_CACHE of them): devices ask the same few
        paths over and over, and parsing each costs more than counting.
        """
        labels = self._config_source().labels
        if labels is not self._answered_labels:
            self._answered, self._answered_labels = {}, labels
        child = self._answered.get((uri, status))
        if child is None:
            operation, label = request_operation(uri, labels)
            child = self.requests.labels(operation, label, str(status))
            if operation != OTHER and len(self._answered) < ANSWERED_CACHE:
                self._answered[uri, status] = child
        child.inc()

    def handshake_failed(self, reason: str) -> None:
        """Count one failed TLS handshake, by the category of its reason."""
        self.tls_handshake_failures.labels(handshake_failure_category(reason)).inc()

    def request_rejected(self, reason: str) -> None:
        """Count one request refused before any work (``max_pending``)."""
        self.requests_rejected.labels(reason).inc()

    def connection_rejected(self, reason: str) -> None:
        """Count one connection closed on arrival (``max_connections``)."""
        self.connections_rejected.labels(reason).inc()

    def connection_timed_out(self, phase: str) -> None:
        """Count one connection aborted in ``phase`` (handshake, headers, body)."""
        self.connection_timeouts.labels(phase).inc()

    def connection_opened(self) -> None:
        """A connection to the EST listener was made."""
        self.active_connections.inc()

    def connection_closed(self) -> None:
        """A connection to the EST listener ended."""
        self.active_connections.dec()

    def issuance(
        self,
        operation: str,
        label: str,
        function: Callable[..., T],
        *args: Any,
    ) -> T:
        """Run ``function(*args)``; if it returns, observe and count an issuance.

        Meant to run in the signing thread: the duration is the work itself,
        not the time the request waited for a free thread.  A refusal (an
        exception) is neither timed nor counted; it shows in the requests.
        """
        started = self._timer()
        result = function(*args)
        self.issuance_seconds.labels(operation, label).observe(self._timer() - started)
        self.certificates_issued.labels(operation, label).inc()
        return result

    # --- Exposition ---

    def render(self) -> tuple[str, bytes]:
        """(Content-Type, body) of the Prometheus text format of every metric."""
        return TEXT_CONTENT_TYPE, generate_latest(self.registry)


def thread_pool_statistics(threadpool: object) -> tuple[int, int] | None:
    """(queued work items, busy threads) of a thread pool, or None.

    estd's :class:`~estd.pool.SigningThreadPool` tells (``statistics()``);
    anything else (a test's synchronous pool) has no statistics.
    """
    statistics = getattr(threadpool, "statistics", None)
    if not callable(statistics):
        return None
    queued, busy = statistics()
    return int(queued), int(busy)


class LedgerWritesCollector:
    """``estd_ledger_commits_total`` and ``estd_ledger_writes_total``.

    A SQLite ledger commits concurrent writes together (group commit);
    writes / commits is the average batch.  Other ledgers report nothing.
    """

    def __init__(self, ledger: object | None) -> None:
        self._ledger = ledger

    def describe(self) -> list[Metric]:
        """The metric names, so the registry can refuse duplicates."""
        return list(self._families(None))

    def collect(self) -> Iterator[Metric]:
        """The ledger's commits and writes so far."""
        statistics = getattr(self._ledger, "write_statistics", None)
        yield from self._families(statistics() if callable(statistics) else None)

    @staticmethod
    def _families(counts: tuple[int, int] | None) -> Iterator[Metric]:
        commits = CounterMetricFamily(
            "estd_ledger_commits",
            "Write transactions the SQLite ledger committed (or failed).",
        )
        writes = CounterMetricFamily(
            "estd_ledger_writes",
            "Writes (issuances, revocations, approvals...) in those "
            "transactions: several share one commit under load.",
        )
        if counts is not None:
            commits.add_metric([], counts[0])
            writes.add_metric([], counts[1])
        yield commits
        yield writes


class ThreadPoolCollector:
    """``estd_threadpool_queue_depth`` and ``_busy_threads``, read when scraped."""

    def __init__(self, threadpool: object | None) -> None:
        self._threadpool = threadpool

    def describe(self) -> list[Metric]:
        """The metric names, so the registry can refuse duplicates."""
        return list(self._families())

    def collect(self) -> Iterator[Metric]:
        """The pool's current queue depth and busy threads."""
        statistics = (
            thread_pool_statistics(self._threadpool)
            if self._threadpool is not None
            else None
        )
        yield from self._families(statistics)

    @staticmethod
    def _families(
        statistics: tuple[int, int] | None = None,
    ) -> Iterator[GaugeMetricFamily]:
        queue = GaugeMetricFamily(
            "estd_threadpool_queue_depth",
            "Requests waiting for a free signing thread.",
        )
        busy = GaugeMetricFamily(
            "estd_threadpool_busy_threads",
            "Signing threads working on a request.",
        )
        if statistics is not None:
            queue.add_metric([], statistics[0])
            busy.add_metric([], statistics[1])
        yield queue
        yield busy


def expiry_days(
    config: Config, now: datetime.datetime
) -> Iterator[tuple[str, str, str, float]]:
    """(kind, label, subject, days left) for each certificate estd serves.

    ``tls`` is the server's own certificate (label ""), ``ca`` each label's
    EST CA and ``root`` each of its roots (``root-cert``).  Days are
    fractional and negative once a certificate has expired.
    """

    def days(certificate: x509.Certificate) -> float:
        return (certificate.not_valid_after_utc - now).total_seconds() / 86400

    tls = config.tls_certificates[0]
    yield "tls", "", tls.subject.rfc4514_string(), days(tls)
    for name, label in config.labels.items():
        ca = label.ca.certificate
        yield "ca", name, ca.subject.rfc4514_string(), days(ca)
        for root in label.root_certificates:
            yield "root", name, root.subject.rfc4514_string(), days(root)


class ExpiryCollector:
    """``estd_certificate_expiry_days``, from the configuration when scraped."""

    NAME = "estd_certificate_expiry_days"
    HELP = "Days until a certificate estd serves expires (negative: expired)."

    def __init__(
        self, config_source: Callable[[], Config], clock: Callable[[], float]
    ) -> None:
        self._config_source = config_source
        self._clock = clock

    def describe(self) -> list[Metric]:
        """The metric name, so the registry can refuse duplicates."""
        return [self._family()]

    def collect(self) -> Iterator[Metric]:
        """Days left for the TLS certificate, each EST CA and each root."""
        now = datetime.datetime.fromtimestamp(self._clock(), datetime.UTC)
        soonest: dict[tuple[str, str, str], float] = {}
        for kind, label, subject, days in expiry_days(self._config_source(), now):
            # Two roots of a label with one subject (a re-keyed root) would
            # be one series twice; the one expiring first is what matters.
            key = (kind, label, subject)
            soonest[key] = min(days, soonest.get(key, days))
        family = self._family()
        for (kind, label, subject), days in soonest.items():
            family.add_metric([kind, label, subject], days)
        yield family

    def _family(self) -> GaugeMetricFamily:
        return GaugeMetricFamily(
            self.NAME, self.HELP, labels=["kind", "label", "subject"]
        )
