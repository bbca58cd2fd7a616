"""The HTTP layer under the EST resources: requests, channel, site.

What EST clients need from HTTP beyond twisted.web's defaults lives here:
Content-Length on every response and header plus body in one write
(strongSwan's ``pki`` reads the response in one go), bodies over 64 KiB
refused before they are read, TLS handshake failures logged once with their
reason, one log line per request, and a deadline for each phase of a
request (see :mod:`estd.limits`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from twisted.internet import defer
from twisted.internet.interfaces import (
    IDelayedCall,
    IHandshakeListener,
    IReactorTime,
    ITCPTransport,
)
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, resource, server
from zope.interface import implementer

from estd.enrollment import Enrollment
from estd.errors import PayloadTooLarge
from estd.identity import ClientIdentity
from estd.limits import (
    BODY,
    DEFAULT_LIMITS,
    HANDSHAKE,
    HEADERS,
    EnrollmentSlots,
    LimitSettings,
    Phase,
)
from estd.metrics import Metrics
from estd.tls import client_identity, handshake_failure_reason, handshake_state
from estd.wire import MAX_BODY_BYTES

log = Logger(namespace="estd")


class EstRequest(server.Request):
    """A request that knows its start time, its client and what it issued."""

    est_client: ClientIdentity | None = None
    est_issued: Enrollment | None = None
    est_user: str | None = None
    """The authenticated HTTP Basic user, once known (issued or refused)."""
    est_client_gone = False
    _body_refused = False
    _body_seen = 0

    def __init__(self, channel: EstChannel, *args: Any, **kwargs: Any) -> None:
        super().__init__(channel, *args, **kwargs)
        # Kept here: Request.channel is cleared when the connection is lost.
        self.est_site: EstSite = channel.site  # type: ignore[attr-defined]
        self.started_at = self.est_site.clock.seconds()

    @property
    def log_address(self) -> str:
        """The client's IP address (or '?'), for logs and throttling."""
        return str(getattr(self.getClientAddress(), "host", "?"))

    @property
    def log_path(self) -> str:
        """The request path for logs, printable and bounded."""
        path = (self.uri or b"").split(b"?", 1)[0][:256]
        return path.decode("ascii", "backslashreplace")

    def gotLength(self, length: int | None) -> None:
        """Refuse an announced oversized body before reading any of it."""
        super().gotLength(length)
        if length is not None and length > MAX_BODY_BYTES:
            self._refuse_body()

    def handleContentChunk(self, data: bytes) -> None:
        """Store body bytes up to the limit (chunked bodies have no length)."""
        if self._body_refused:
            return
        self._body_seen += len(data)
        if self._body_seen > MAX_BODY_BYTES:
            self._refuse_body()
            return
        super().handleContentChunk(data)

    def _refuse_body(self) -> None:
        # Answer 413 at once and close: RFC 9110 §15.5.14 allows closing,
        # and reading a body we will not use only costs memory.
        self._body_refused = True
        # Site.log wants the request line, which Request only sets later.
        self.method = self.channel._command
        self.uri = self.channel._path
        self.requestHeaders.removeHeader(b"expect")  # no "100 Continue" now
        error = PayloadTooLarge(f"the request body is over {MAX_BODY_BYTES} bytes")
        body = error.reason.encode() + b"\n"
        raw = (
            b"HTTP/1.1 413 Payload Too Large\r\n"
            b"Server: estd\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: %d\r\n"
            b"Connection: close\r\n\r\n" % len(body)
        ) + body
        self.code = 413
        self.sentLength = len(body)
        self.channel.persistent = False
        transport = self.channel.transport
        assert transport is not None
        transport.write(raw)
        self.est_site.log(self)
        transport.loseConnection()

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        """Process the request unless its body was already refused."""
        if self._body_refused:
            return
        super().requestReceived(command, path, version)

    def process(self) -> None:
        """Note the verified client certificate before the resource runs."""
        self.est_client = client_identity(self.channel.transport)
        self.est_site.request_started()
        self.notifyFinish().addBoth(self.est_site.request_finished)
        super().process()


@implementer(IHandshakeListener)
class EstChannel(http.HTTPChannel):
    """An HTTP channel that logs TLS handshake failures and writes once.

    It also gives each phase of a request a deadline on the site's clock:
    the TLS handshake from the TCP connection, the request line and headers
    from the handshake or the end of the previous response, the body from
    the end of the headers.  Twisted's idle timeout (``timeOut``), which any
    byte resets, keeps running beside them.
    """

    _handshake_done = False
    _held_headers: bytes = b""
    _deadline: IDelayedCall | None = None
    _phase: Phase | None = None
    _phase_bytes = 0
    _phase_timeout = 0.0
    _timed_out = False
    _lost = False

    def handshakeCompleted(self) -> None:
        """TLS is up; from now on a disconnect is no handshake failure."""
        self._handshake_done = True
        self._start_phase(HEADERS)

    @property
    def _est_site(self) -> EstSite | None:
        site = getattr(self, "site", None)  # set by Site.buildProtocol
        return site if isinstance(site, EstSite) else None

    @property
    def _metrics(self) -> Metrics | None:
        site = self._est_site
        return site.metrics if site is not None else None

    def connectionMade(self) -> None:
        """Count the connection as active; start the clock on its first phase."""
        super().connectionMade()
        if self._est_site is not None:
            self._est_site.channels.add(self)
        if self._metrics is not None:
            self._metrics.connection_opened()
        # Under TLS this runs when TCP connects, before the handshake.
        tls = handshake_state(self.transport) is not None
        self._start_phase(HANDSHAKE if tls else HEADERS)

    def dataReceived(self, data: bytes) -> None:
        """Note that the client is sending something, then parse it."""
        self._phase_bytes += len(data)
        super().dataReceived(data)

    def allHeadersReceived(self) -> None:
        """The headers are in: the body, if any, has its own deadline."""
        super().allHeadersReceived()
        if self.length != 0:  # a Content-Length, or chunked (None)
            self._start_phase(BODY)

    def allContentReceived(self) -> None:
        """The request is complete: no deadline while it is processed."""
        self._stop_phase()
        super().allContentReceived()

    def _start_phase(self, phase: Phase) -> None:
        site = self._est_site
        if site is None or self._lost:
            return
        seconds = phase.timeout(site.limit_settings())
        self._phase, self._phase_bytes, self._phase_timeout = phase, 0, seconds
        if self._deadline is not None and self._deadline.active():
            self._deadline.reset(seconds)
        else:
            self._deadline = site.clock.callLater(seconds, self._phase_expired)

    def _stop_phase(self) -> None:
        self._phase = None
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _phase_expired(self) -> None:
        phase, self._phase, self._deadline = self._phase, None, None
        # Every stream transport can abort (TLS, TCP, the test fakes).
        transport = cast(ITCPTransport, self.transport)
        site = self._est_site
        if transport is None or phase is None or site is None:
            return
        if getattr(transport, "disconnecting", False):
            # Already closing (after a response or an error) and the client
            # is not reading what is left: stop waiting for it.
            transport.abortConnection()
            return
        peer = transport.getPeer()
        address = getattr(peer, "host", "?")
        timeout = self._phase_timeout
        if phase is HEADERS and self._phase_bytes == 0:
            # Idle between requests (or after the handshake): an ordinary
            # close, as HTTP allows (RFC 9112 §9.5); the deadline now only
            # bounds how long the client may take to read what is left.
            log.info(
                "closing idle connection from {client_address}: no request "
                "within {timeout:g}s (header-timeout)",
                client_address=address,
                timeout=timeout,
            )
            self.setTimeout(None)  # Twisted's idle timeout would close it again
            self.loseConnection()
            self._start_phase(HEADERS)
            return
        self._timed_out = True
        log.warn(
            "connection from {client_address} aborted: {phase_what} did not "
            "complete within {timeout:g}s ({setting})",
            client_address=address,
            phase=phase.name,
            phase_what=phase.what,
            timeout=timeout,
            setting=phase.setting,
        )
        if site.metrics is not None:
            site.metrics.connection_timed_out(phase.name)
        transport.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """Log a failed handshake once, with its reason and no traceback."""
        self._lost = True
        self._stop_phase()
        metrics = self._metrics
        if not self._handshake_done and not self._timed_out:
            peer = self.transport.getPeer() if self.transport is not None else None
            failure = handshake_failure_reason(self.transport, reason)
            log.warn(
                "TLS handshake with {client_address} failed: {tls_failure}",
                client_address=getattr(peer, "host", "?"),
                tls_failure=failure,
            )
            if metrics is not None:
                metrics.handshake_failed(failure)
        if metrics is not None:
            metrics.connection_closed()
        super().connectionLost(reason)
        if self._est_site is not None:
            self._est_site.channel_closed(self)

    def writeHeaders(
        self, version: bytes, code: bytes, reason: bytes, headers: Any
    ) -> None:
        """Hold the header block so that it leaves with the body."""
        lines = [version, b" ", code, b" ", reason, b"\r\n"]
        for name, values in headers.getAllRawHeaders():
            for value in values:
                lines.extend((name, b": ", value, b"\r\n"))
        lines.append(b"\r\n")
        self._held_headers = b"".join(lines)

    def write(self, data: bytes) -> None:
        """Write ``data``, preceded by any held header block."""
        if self._held_headers:
            data, self._held_headers = self._held_headers + data, b""
        assert self.transport is not None
        self.transport.write(data)

    def writeSequence(self, iovec: list[bytes]) -> None:
        """Write the pieces as one, preceded by any held header block."""
        self.write(b"".join(iovec))

    def requestDone(self, request: http.Request) -> None:
        """Flush a header-only response before the channel moves on."""
        if self._held_headers:
            self.write(b"")
        # The next request's headers are due from now (set before Twisted
        # replays any pipelined bytes); on a closing connection, the deadline
        # bounds how long the client may take to read the response.
        self._start_phase(HEADERS)
        super().requestDone(request)


class EstSite(server.Site):
    """The site: our request and channel classes, and one log line per request."""

    requestFactory = EstRequest
    protocol = EstChannel  # type: ignore[assignment]
    displayTracebacks = False
    noisy = False

    def __init__(
        self,
        root: resource.Resource,
        clock: IReactorTime,
        metrics: Metrics | None = None,
        limit_settings: Callable[[], LimitSettings] | None = None,
    ) -> None:
        # EST bodies are never HTML forms: skip twisted.web's form parsing, which
        # parses every POST's Content-Type with the (slow) email package.
        super().__init__(root, reactor=clock, parsePOSTFormSubmission=False)
        self.clock = clock
        self.metrics = metrics
        self.limit_settings: Callable[[], LimitSettings] = limit_settings or (
            lambda: DEFAULT_LIMITS
        )
        """The current max-pending and timeouts (the configuration snapshot)."""
        self.enrollments = EnrollmentSlots(self.limit_settings, clock.seconds, metrics)
        """Enrollments in flight, bounded by max-pending."""
        self.in_flight = 0
        self.channels: set[EstChannel] = set()
        """Open connections, closed politely once a shutdown has drained."""
        self._closed_waiters: list[defer.Deferred[None]] = []
        self.draining = False
        """Set when shutdown began: /readyz answers 503 from then on."""
        self._drain_waiters: list[defer.Deferred[None]] = []

    def request_started(self) -> None:
        """Count a request being processed."""
        self.in_flight += 1

    def request_finished(self, _: object = None) -> None:
        """Count a request done (answered, or its client gone)."""
        self.in_flight -= 1
        if self.in_flight == 0:
            waiters, self._drain_waiters = self._drain_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def channel_closed(self, channel: EstChannel) -> None:
        """Forget a closed connection; wake close_all() when none is left."""
        self.channels.discard(channel)
        if not self.channels:
            waiters, self._closed_waiters = self._closed_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def close_all(self) -> defer.Deferred[None]:
        """Close every connection after what it still has to send is sent.

        A response handed to the transport may not have left yet; closing
        with loseConnection (not the reactor's shutdown) lets it go first.
        """
        if not self.channels:
            return defer.succeed(None)
        waiter: defer.Deferred[None] = defer.Deferred()
        self._closed_waiters.append(waiter)
        for channel in list(self.channels):
            channel.loseConnection()
        return waiter

    def drained(self) -> defer.Deferred[None]:
        """A Deferred that fires once no request is in flight."""
        if self.in_flight == 0:
            return defer.succeed(None)
        waiter: defer.Deferred[None] = defer.Deferred()
        self._drain_waiters.append(waiter)
        return waiter

    def log(self, request: EstRequest) -> None:  # type: ignore[override]
        """One line: who, what, outcome, size, time, client cert, issuance."""
        if self.metrics is not None:
            self.metrics.request_answered(request.uri or b"", request.code)
        peer = request.getClientAddress()
        fields: dict[str, Any] = {
            "client_address": getattr(peer, "host", "?"),
            "method": request.method.decode("ascii", "replace"),
            "path": request.log_path,
            "status": request.code,
            "bytes": request.sentLength,
            "duration_ms": round((self.clock.seconds() - request.started_at) * 1000, 1),
            "client_subject": None,
            "client_serial": None,
            "issued_serial": None,
            "issued_not_after": None,
        }
        parts = [
            f'{fields["client_address"]} "{fields["method"]} {fields["path"]}" '
            f"{fields['status']} {fields['bytes']}B {fields['duration_ms']}ms"
        ]
        client = request.est_client
        if client is not None:
            subject = fields["client_subject"] = client.subject_text
            serial = fields["client_serial"] = client.serial_hex
            parts.append(f' client="{subject}" client_serial={serial}')
        user = request.est_user
        if user is not None:
            fields["user"] = user
            # A users file may hold names no terminal should print as they are.
            shown = user if user.isprintable() and " " not in user else repr(user)
            parts.append(f" user={shown}")
        if request.est_issued is not None:
            requester = request.est_issued.requester
            if requester.client is not None and requester.client.expired:
                fields["client_expired"] = True
                parts.append(
                    " (expired client certificate, within re-enrollment grace)"
                )
            issued = request.est_issued.issued
            serial = fields["issued_serial"] = issued.serial_hex
            not_after = fields["issued_not_after"] = (
                issued.certificate.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
            )
            parts.append(f" issued_serial={serial} not_after={not_after}")
        fields["client_gone"] = request.est_client_gone
        if request.est_client_gone:
            parts.append(" (client gone before the response)")
        # Rendered here, once: the observers then format a one-field event
        # (twisted.logger's format parsing cost more than the rest of this).
        log.info("{log_line}", log_line="".join(parts), **fields)
