"""twisted.web Resources for the EST paths, and the HTTP details clients need.

Every EST resource answers through :func:`respond`, the single place where a
Deferred result becomes a response: success is rendered, an
:class:`EstError` becomes its status with a one-line text body, anything
else is logged with its traceback and answered 500.  Responses always carry
Content-Length and leave in one write (strongSwan's ``pki`` reads the
response in one go).
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IHandshakeListener, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.web import http, resource, server
from zope.interface import implementer

from estd.config import Config, LabelConfig
from estd.enrollment import Enrollment, enroll
from estd.errors import (
    EstError,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    UnsupportedMediaType,
)
from estd.policy import ClientIdentity, Operation
from estd.tls import client_identity, handshake_failure_reason
from estd.wire import MAX_BODY_BYTES, PKCS7_MIME, PKCS10, media_type

log = Logger(namespace="estd")

ConfigSource = Callable[[], Config]

OPERATIONS = frozenset(
    {"cacerts", "simpleenroll", "simplereenroll", "csrattrs", "serverkeygen", "fullcmc"}
)
"""RFC 7030 §3.2.2 operation path segments; none of them can be a label."""

SERVED_OPERATIONS = frozenset({"cacerts", "simpleenroll", "simplereenroll"})


@dataclass(frozen=True)
class EstResponse:
    """A complete response: status, Content-Type and body bytes."""

    status: int
    content_type: str
    body: bytes
    base64: bool = False
    headers: dict[str, str] = field(default_factory=dict)


def error_response(error: EstError) -> EstResponse:
    """The text/plain response for an EST error."""
    return EstResponse(
        status=error.status,
        content_type="text/plain; charset=utf-8",
        body=error.reason.encode("utf-8") + b"\n",
        headers=error.headers,
    )


def write_response(request: EstRequest, response: EstResponse) -> None:
    """Send ``response`` unless the client went away meanwhile."""
    if request.finished or request._disconnected:
        return
    request.setResponseCode(response.status)
    request.responseHeaders.setRawHeaders(b"Server", [b"estd"])
    request.responseHeaders.setRawHeaders(
        b"Content-Type", [response.content_type.encode()]
    )
    request.responseHeaders.setRawHeaders(
        b"Content-Length", [str(len(response.body)).encode()]
    )
    if response.base64:
        # RFC 8951 §3: EST payloads are base64 and say so.
        request.responseHeaders.setRawHeaders(b"Content-Transfer-Encoding", [b"base64"])
    for name, value in response.headers.items():
        request.responseHeaders.setRawHeaders(name.encode(), [value.encode()])
    if response.body:
        request.write(response.body)
    request.finish()


def respond(request: EstRequest, work: defer.Deferred[EstResponse]) -> int:
    """Serve the outcome of ``work``: the one Deferred-to-HTTP boundary."""

    # The work is not cancelled when the client hangs up: signing in a thread
    # cannot be interrupted, and what it issued must still reach the log.

    def failed(reason: Failure) -> EstResponse:
        if reason.check(EstError):
            return error_response(reason.value)  # type: ignore[arg-type]
        log.failure("internal error serving {path}", reason, path=request.log_path)
        return EstResponse(
            500,
            "text/plain; charset=utf-8",
            b"internal server error; see the server log\n",
        )

    def send(response: EstResponse) -> None:
        if request._disconnected and not request.finished:
            # Request.finish will never run, so log the outcome here, once.
            request.est_client_gone = True
            request.setResponseCode(response.status)
            request.est_site.log(request)
            return
        write_response(request, response)

    work.addErrback(failed).addCallback(send).addErrback(
        lambda reason: log.failure("cannot write the response", reason)
    )
    return server.NOT_DONE_YET


class EstResource(resource.Resource):
    """Base for EST operations: our own method dispatch and 405 text."""

    isLeaf = True
    allowed_methods: tuple[str, ...] = ()

    def render(self, request: EstRequest) -> int:  # type: ignore[override]
        """Dispatch to ``render_<METHOD>`` or answer 405 with ``Allow``."""
        if request.postpath not in ([], [b""]):
            return respond(request, defer.fail(NotFound("no such EST resource")))
        method = request.method.decode("ascii", "replace")
        if method == "HEAD" and "GET" in self.allowed_methods:
            method = "GET"
        if method not in self.allowed_methods:
            return respond(request, defer.fail(MethodNotAllowed(self.allowed_methods)))
        handler: Callable[[EstRequest], defer.Deferred[EstResponse]] = getattr(
            self, "serve_" + method
        )
        try:
            work = handler(request)
        except EstError as error:
            work = defer.fail(error)
        return respond(request, work)


class CACertsResource(EstResource):
    """``/cacerts`` (RFC 7030 §4.1): the roots and the EST CA, anonymously."""

    allowed_methods = ("GET", "HEAD")

    def __init__(self, settings: LabelConfig) -> None:
        super().__init__()
        self._settings = settings

    def serve_GET(self, request: EstRequest) -> defer.Deferred[EstResponse]:
        """Answer with the precomputed certs-only PKCS#7 bundle."""
        return defer.succeed(
            EstResponse(200, PKCS7_MIME, self._settings.cacerts_body, base64=True)
        )


class EnrollResource(EstResource):
    """``/simpleenroll`` and ``/simplereenroll`` (RFC 7030 §4.2)."""

    allowed_methods = ("POST",)

    def __init__(
        self,
        settings: LabelConfig,
        operation: Operation,
        reactor: IReactorTime,
        threadpool: ThreadPool,
    ) -> None:
        super().__init__()
        self._settings = settings
        self._operation = operation
        self._reactor = reactor
        self._threadpool = threadpool

    def serve_POST(self, request: EstRequest) -> defer.Deferred[EstResponse]:
        """Check the request on the reactor, then decide and sign in a thread."""
        content_type = media_type(request.getHeader(b"content-type"))
        if content_type != PKCS10:
            shown = content_type or "none"
            raise UnsupportedMediaType(f"Content-Type must be {PKCS10}, not {shown}")
        assert request.content is not None
        body = request.content.read()
        now = datetime.datetime.fromtimestamp(self._reactor.seconds(), datetime.UTC)
        work: defer.Deferred[Enrollment] = deferToThreadPool(
            self._reactor,  # type: ignore[arg-type]
            self._threadpool,
            enroll,
            self._settings,
            self._operation,
            request.est_client,
            body,
            now,
        )
        return work.addCallback(self._rendered, request)

    def _rendered(self, enrollment: Enrollment, request: EstRequest) -> EstResponse:
        request.est_issued = enrollment
        profile = self._settings.response_profile
        return EstResponse(
            profile.enroll_status,
            profile.enroll_content_type,
            enrollment.body,
            base64=True,
        )


class NotFoundResource(EstResource):
    """Anything that is not an EST resource estd serves."""

    def __init__(self, reason: str) -> None:
        super().__init__()
        self._reason = reason

    def render(self, request: EstRequest) -> int:  # type: ignore[override]
        """Always 404, whatever the method."""
        return respond(request, defer.fail(NotFound(self._reason)))


class EstDirectory(resource.Resource):
    """``/.well-known/est``: finds the operation (and, later, the label)."""

    def __init__(
        self, config_source: ConfigSource, reactor: IReactorTime, threadpool: ThreadPool
    ) -> None:
        super().__init__()
        self._config_source = config_source
        self._reactor = reactor
        self._threadpool = threadpool

    def getChild(self, path: bytes, request: EstRequest) -> resource.Resource:
        """Map ``<op>`` to its resource under the current configuration."""
        if path == b"":
            # fioconfig appends "/simplereenroll" to the URL it is given, so a
            # trailing slash in it makes an empty segment; skip it.
            return self
        name = path.decode("utf-8", "replace")
        settings = self._config_source().default
        if name in SERVED_OPERATIONS:
            return self.operation(settings, name)
        if name in OPERATIONS:
            return NotFoundResource(f"the EST operation {name} is not supported")
        return NotFoundResource(f"unknown EST operation or CA label {name[:128]!r}")

    def operation(self, settings: LabelConfig, name: str) -> resource.Resource:
        """The resource serving operation ``name`` with ``settings``."""
        if name == "cacerts":
            return CACertsResource(settings)
        return EnrollResource(
            settings, Operation(name), self._reactor, self._threadpool
        )

    def render(self, request: EstRequest) -> int:  # type: ignore[override]
        """``/.well-known/est`` itself is no EST resource."""
        return respond(request, defer.fail(NotFound("no EST operation in the path")))


class RootResource(resource.Resource):
    """The site root: only ``/.well-known/est`` exists."""

    def __init__(self, est: resource.Resource) -> None:
        super().__init__()
        self._est = est

    def getChild(self, path: bytes, request: EstRequest) -> resource.Resource:
        """Route ``.well-known/est``; everything else is 404."""
        postpath, prepath = request.postpath or [], request.prepath or []
        if path == b".well-known" and postpath[:1] == [b"est"]:
            prepath.append(postpath.pop(0))
            return self._est
        return NotFoundResource("not an EST path; EST lives under /.well-known/est/")

    def render(self, request: EstRequest) -> int:  # type: ignore[override]
        """``/`` is not an EST resource."""
        return respond(
            request, defer.fail(NotFound("EST lives under /.well-known/est/"))
        )


# --- HTTP plumbing -------------------------------------------------------------


class EstRequest(server.Request):
    """A request that knows its start time, its client and what it issued."""

    est_client: ClientIdentity | None = None
    est_issued: Enrollment | None = None
    est_client_gone = False
    _body_refused = False
    _body_seen = 0

    def __init__(self, channel: EstChannel, *args: Any, **kwargs: Any) -> None:
        super().__init__(channel, *args, **kwargs)
        # Kept here: Request.channel is cleared when the connection is lost.
        self.est_site: EstSite = channel.site  # type: ignore[attr-defined]
        self.started_at = self.est_site.clock.seconds()

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
    """An HTTP channel that logs TLS handshake failures and writes once."""

    _handshake_done = False
    _held_headers: bytes = b""

    def handshakeCompleted(self) -> None:
        """TLS is up; from now on a disconnect is no handshake failure."""
        self._handshake_done = True

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """Log a failed handshake once, with its reason and no traceback."""
        if not self._handshake_done:
            peer = self.transport.getPeer() if self.transport is not None else None
            log.warn(
                "TLS handshake with {client_address} failed: {tls_failure}",
                client_address=getattr(peer, "host", "?"),
                tls_failure=handshake_failure_reason(self.transport, reason),
            )
        super().connectionLost(reason)

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
        super().requestDone(request)


class EstSite(server.Site):
    """The site: our request and channel classes, and one log line per request."""

    requestFactory = EstRequest
    protocol = EstChannel  # type: ignore[assignment]
    displayTracebacks = False
    noisy = False

    def __init__(self, root: resource.Resource, clock: IReactorTime) -> None:
        super().__init__(root, reactor=clock)
        self.clock = clock
        self.in_flight = 0
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

    def drained(self) -> defer.Deferred[None]:
        """A Deferred that fires once no request is in flight."""
        if self.in_flight == 0:
            return defer.succeed(None)
        waiter: defer.Deferred[None] = defer.Deferred()
        self._drain_waiters.append(waiter)
        return waiter

    def log(self, request: EstRequest) -> None:  # type: ignore[override]
        """One line: who, what, outcome, size, time, client cert, issuance."""
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
        text = '{client_address} "{method} {path}" {status} {bytes}B {duration_ms}ms'
        client = request.est_client
        if client is not None:
            fields["client_subject"] = client.subject_text
            fields["client_serial"] = client.serial_hex
            text += ' client="{client_subject}" client_serial={client_serial}'
        if request.est_issued is not None:
            issued = request.est_issued.issued
            fields["issued_serial"] = issued.serial_hex
            fields["issued_not_after"] = (
                issued.certificate.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
            )
            text += " issued_serial={issued_serial} not_after={issued_not_after}"
        fields["client_gone"] = request.est_client_gone
        if request.est_client_gone:
            text += " (client gone before the response)"
        log.info(text, **fields)


def build_site(
    config_source: ConfigSource, reactor: IReactorTime, threadpool: ThreadPool
) -> EstSite:
    """The whole EST site for a configuration source."""
    est = EstDirectory(config_source, reactor, threadpool)
    return EstSite(RootResource(est), reactor)
