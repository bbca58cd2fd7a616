"""The admin listener: ``/metrics``, ``/healthz`` and ``/readyz`` over plain HTTP.

It listens on ``admin-listen`` (loopback by default), apart from the EST
port, for Prometheus and for orchestrators' probes:

- ``/metrics``: every metric of :class:`estd.metrics.Metrics`, in the
  Prometheus text format;
- ``/healthz``: 200 while the process runs (liveness);
- ``/readyz``: 200 when estd can issue now (readiness), else 503 with the
  reason: the TLS certificate and each EST CA within their validity, the
  signing thread pool running a no-op within :data:`READY_TIMEOUT`, and the
  ledger answering a ping (in that pool, like every database call).
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, resource, server

from estd.config import Config
from estd.ledger import Ledger
from estd.metrics import Metrics
from estd.pool import in_thread

log = Logger(namespace="estd")

READY_TIMEOUT = 2.0
"""Seconds the thread pool, and then the ledger, get to answer /readyz."""

JSON = b"application/json"
TEXT = b"text/plain; charset=utf-8"


def certificate_problem(config: Config, now: datetime.datetime) -> str | None:
    """Why the configured TLS certificate or an EST CA is not valid now, or None."""
    checked = [("the TLS certificate (tls-cert)", config.tls_certificates[0])]
    for name, label in config.labels.items():
        where = f" of label {name}" if name else ""
        checked.append((f"the EST CA{where} (ca-cert)", label.ca.certificate))
    for what, certificate in checked:
        if now < certificate.not_valid_before_utc:
            since = certificate.not_valid_before_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
            return f"{what} is not valid before {since}"
        if now > certificate.not_valid_after_utc:
            until = certificate.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
            return f"{what} expired on {until}"
    return None


class NotReady(Exception):
    """A readiness check failed; the message is the reason /readyz gives."""


class Readiness:
    """The /readyz checks, against the live configuration, pool and ledger.

    ``reactor`` provides IReactorTime and IReactorFromThreads; ``threadpool``
    is the signing pool (the ledger is pinged in it, as every database call
    is made off the reactor).
    """

    def __init__(
        self,
        config_source: Callable[[], Config],
        reactor: Any,
        threadpool: Any,
        ledger: Ledger | None = None,
        timeout: float = READY_TIMEOUT,
        draining: Callable[[], bool] = lambda: False,
    ) -> None:
        self._draining = draining
        self._config_source = config_source
        self._reactor = reactor
        self._threadpool = threadpool
        self._ledger = ledger
        self._timeout = timeout

    def check(self) -> defer.Deferred[None]:
        """Fire with None when ready; fail with :class:`NotReady` otherwise."""
        if self._draining():
            # Load balancers should stop sending before the port is gone.
            return defer.fail(NotReady("shutting down"))
        now = datetime.datetime.fromtimestamp(self._reactor.seconds(), datetime.UTC)
        problem = certificate_problem(self._config_source(), now)
        if problem is not None:
            return defer.fail(NotReady(problem))
        ready = self._in_pool(
            lambda: None,
            f"the signing thread pool did not answer within {self._timeout:g}s",
            "the signing thread pool failed",
        )
        ledger = self._ledger
        if ledger is not None:
            ready.addCallback(
                lambda _: self._in_pool(
                    ledger.ping,
                    f"the ledger did not answer within {self._timeout:g}s",
                    "the ledger is unavailable",
                )
            )
        return ready

    def _in_pool(
        self, function: Callable[[], None], too_slow: str, failed: str
    ) -> defer.Deferred[None]:
        work: defer.Deferred[None] = in_thread(
            self._reactor, self._threadpool, function
        )
        work.addTimeout(self._timeout, self._reactor)

        def explain(reason: Failure) -> None:
            if reason.check(defer.TimeoutError):
                raise NotReady(too_slow)
            lines = str(reason.value).splitlines() or [type(reason.value).__name__]
            raise NotReady(f"{failed}: {lines[0][:200]}")

        return work.addErrback(explain)


def _send(
    request: server.Request, status: int, content_type: bytes, body: bytes
) -> None:
    """Answer with ``body``, Content-Type and Content-Length (if still connected)."""
    if request.finished or request._disconnected:
        return
    request.setResponseCode(status)
    request.responseHeaders.setRawHeaders(b"Content-Type", [content_type])
    request.responseHeaders.setRawHeaders(b"Content-Length", [str(len(body)).encode()])
    request.responseHeaders.setRawHeaders(b"Cache-Control", [b"no-store"])
    request.write(body)
    request.finish()


def _json(document: dict[str, str]) -> bytes:
    return json.dumps(document).encode() + b"\n"


class AdminResource(resource.Resource):
    """Serves the three admin paths; anything else is a 404."""

    isLeaf = True

    def __init__(self, metrics: Metrics, readiness: Readiness) -> None:
        super().__init__()
        self._metrics = metrics
        self._readiness = readiness

    def render(self, request: server.Request) -> int:  # type: ignore[override]
        """Dispatch on the exact path; GET and HEAD only."""
        serve = {
            b"/metrics": self._serve_metrics,
            b"/healthz": self._serve_health,
            b"/readyz": self._serve_readiness,
        }.get(request.path)
        if serve is None:
            _send(request, http.NOT_FOUND, TEXT, b"not found: try /metrics\n")
            return server.NOT_DONE_YET
        if request.method not in (b"GET", b"HEAD"):
            request.responseHeaders.setRawHeaders(b"Allow", [b"GET, HEAD"])
            _send(request, http.NOT_ALLOWED, TEXT, b"only GET and HEAD\n")
            return server.NOT_DONE_YET
        serve(request)
        return server.NOT_DONE_YET

    def _serve_metrics(self, request: server.Request) -> None:
        content_type, body = self._metrics.render()
        _send(request, http.OK, content_type.encode(), body)

    def _serve_health(self, request: server.Request) -> None:
        _send(request, http.OK, JSON, _json({"status": "ok"}))

    def _serve_readiness(self, request: server.Request) -> None:
        # A prober that hangs up meanwhile gets nothing: _send checks.
        checking = self._readiness.check()

        def ready(_: None) -> None:
            _send(request, http.OK, JSON, _json({"status": "ready"}))

        def not_ready(reason: Failure) -> None:
            if reason.check(NotReady):
                why = str(reason.value)
            else:
                log.failure("readiness check failed", reason)
                why = "internal error; see the server log"
            _send(
                request,
                http.SERVICE_UNAVAILABLE,
                JSON,
                _json({"status": "not ready", "reason": why}),
            )

        checking.addCallbacks(ready, not_ready).addErrback(
            lambda reason: log.failure("cannot answer /readyz", reason)
        )


class AdminSite(server.Site):
    """The admin listener's site; probes and scrapes are not logged."""

    noisy = False

    def log(self, request: server.Request) -> None:  # type: ignore[override]
        """Nothing: a probe every few seconds would drown the EST log."""


def build_admin_site(
    metrics: Metrics,
    config_source: Callable[[], Config],
    reactor: Any,
    threadpool: Any,
    ledger: Ledger | None = None,
    draining: Callable[[], bool] = lambda: False,
) -> AdminSite:
    """The admin site of one estd: its metrics and its readiness checks."""
    readiness = Readiness(config_source, reactor, threadpool, ledger, draining=draining)
    return AdminSite(AdminResource(metrics, readiness), reactor=reactor)
