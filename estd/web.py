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
from http import HTTPStatus
from typing import Any

from twisted.internet import defer
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import resource, server

from estd.auth import FailureThrottle, parse_basic_authorization
from estd.config import OPERATION_NAMES, Config, LabelConfig
from estd.crl import CrlPublisher
from estd.enrollment import LEDGER_RETRY_AFTER, Enrollment, EnrollmentRequest, enroll
from estd.errors import (
    EstError,
    MethodNotAllowed,
    NotFound,
    NotImplementedOperation,
    ServiceUnavailable,
    UnsupportedMediaType,
)
from estd.identity import BadCredentials
from estd.ledger import Ledger, LedgerUnavailable
from estd.limits import OVERLOAD_REASON, OVERLOAD_RETRY_AFTER
from estd.metrics import Metrics
from estd.policy import Operation
from estd.pool import WorkerPool, in_thread
from estd.site import EstRequest, EstSite
from estd.tls import channel_binding
from estd.wire import CSRATTRS, PKCS7_MIME, PKCS10, PKIX_CRL, encode_base64, media_type

log = Logger(namespace="estd")

ConfigSource = Callable[[], Config]


@dataclass(frozen=True)
class EstResponse:
    """A complete response: status, Content-Type and body bytes."""

    status: int
    content_type: str | None
    body: bytes
    base64: bool = False
    headers: dict[str, str] = field(default_factory=dict)
    close: bool = False
    """Close the connection after this response (``Connection: close``)."""


def error_response(error: EstError) -> EstResponse:
    """The text/plain response for an EST error."""
    return EstResponse(
        status=error.status,
        content_type="text/plain; charset=utf-8",
        body=error.reason.encode("utf-8") + b"\n",
        headers=error.headers,
    )


def _reason_phrase(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b"Unknown"


def write_response(request: EstRequest, response: EstResponse) -> None:
    """Send ``response`` unless the client went away meanwhile."""
    if request.finished or request._disconnected:
        return
    # Twisted has no reason phrase for some statuses (429); BouncyCastle
    # wants one in every status line.
    request.setResponseCode(response.status, _reason_phrase(response.status))
    request.responseHeaders.setRawHeaders(b"Server", [b"estd"])
    if response.content_type is not None:
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
    if response.close and request.channel is not None:
        request.responseHeaders.setRawHeaders(b"Connection", [b"close"])
        request.channel.persistent = False  # closed once the response is out
    if response.body:
        request.write(response.body)
    request.finish()


def respond(request: EstRequest, work: defer.Deferred[EstResponse]) -> int:
    """Serve the outcome of ``work``: the one Deferred-to-HTTP boundary."""

    # The work is not cancelled when the client hangs up: signing in a thread
    # cannot be interrupted, and what it issued must still reach the log.

    def failed(reason: Failure) -> EstResponse:
        error = reason.value
        if isinstance(error, EstError):
            request.est_user = error.user
            return error_response(error)
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


@dataclass(frozen=True)
class Machinery:
    """What resources need besides settings: the clock, threads, throttle."""

    reactor: Any
    """Provides IReactorTime and IReactorFromThreads."""
    threadpool: WorkerPool
    throttle: FailureThrottle
    ledger: Ledger | None = None
    crls: CrlPublisher | None = None

    def now(self) -> datetime.datetime:
        """The reactor's time as an aware UTC datetime."""
        return datetime.datetime.fromtimestamp(self.reactor.seconds(), datetime.UTC)

    def in_thread(
        self, function: Callable[..., Any], *args: Any
    ) -> defer.Deferred[Any]:
        """Run ``function(*args)`` in the signing thread pool."""
        return in_thread(self.reactor, self.threadpool, function, *args)


class CsrAttrsResource(EstResource):
    """``/csrattrs`` (RFC 7030 §4.5): what the CA wants in a CSR."""

    allowed_methods = ("GET", "HEAD")

    def __init__(self, settings: LabelConfig) -> None:
        super().__init__()
        self._settings = settings

    def serve_GET(self, request: EstRequest) -> defer.Deferred[EstResponse]:
        """204 when nothing is configured (libest wants that, not 404)."""
        attrs = self._settings.csrattrs
        if not attrs.items:
            return defer.succeed(EstResponse(204, None, b""))
        body = encode_base64(attrs.der, self._settings.base64_line_length)
        return defer.succeed(EstResponse(200, CSRATTRS, body, base64=True))


class CrlResource(EstResource):
    """``/crl``: the label's EST CA's current CRL (DER, not base64)."""

    allowed_methods = ("GET", "HEAD")

    def __init__(self, settings: LabelConfig, machinery: Machinery) -> None:
        super().__init__()
        self._settings = settings
        self._machinery = machinery

    def serve_GET(self, request: EstRequest) -> defer.Deferred[EstResponse]:
        """Read revocations and sign (or reuse) the CRL in a thread."""
        machinery = self._machinery
        crls = machinery.crls
        ca = self._settings.ca
        if crls is None:
            raise NotFound("no CRL: this server keeps no ledger")
        if not ca.can_sign_crls:
            raise NotFound("no CRL: the EST CA's KeyUsage does not allow cRLSign")

        def made(der: bytes) -> EstResponse:
            return EstResponse(200, PKIX_CRL, der)

        def unavailable(reason: Failure) -> Failure:
            if reason.check(LedgerUnavailable):
                raise ServiceUnavailable(
                    "the issuance ledger is unavailable; retry later",
                    LEDGER_RETRY_AFTER,
                )
            return reason

        work = machinery.in_thread(crls.crl, ca, machinery.now())
        return work.addCallbacks(made, unavailable)


class FullCmcResource(EstResource):
    """``/fullcmc`` (RFC 7030 §4.3): not implemented, and said so."""

    def render(self, request: EstRequest) -> int:  # type: ignore[override]
        """501 whatever the method."""
        return respond(
            request,
            defer.fail(
                NotImplementedOperation(
                    "full CMC (RFC 7030 §4.3) is not supported by this server"
                )
            ),
        )


class EnrollResource(EstResource):
    """``/simpleenroll``, ``/simplereenroll`` (§4.2) and ``/serverkeygen`` (§4.4)."""

    allowed_methods = ("POST",)

    def __init__(
        self,
        settings: LabelConfig,
        operation: Operation,
        machinery: Machinery,
        server_keygen: bool = False,
    ) -> None:
        super().__init__()
        self._settings = settings
        self._operation = operation
        self._machinery = machinery
        self._server_keygen = server_keygen

    def serve_POST(self, request: EstRequest) -> defer.Deferred[EstResponse]:
        """Check the request on the reactor, then decide and sign in a thread."""
        content_type = media_type(request.getHeader(b"content-type"))
        if content_type != PKCS10:
            shown = content_type or "none"
            raise UnsupportedMediaType(f"Content-Type must be {PKCS10}, not {shown}")
        assert request.content is not None
        credentials = None
        if self._settings.auth.uses_basic:
            credentials = parse_basic_authorization(request.getHeader(b"authorization"))
        enrollment_request = EnrollmentRequest(
            operation=self._operation,
            body=request.content.read(),
            client=request.est_client,
            credentials=credentials,
            channel_binding=channel_binding(request.channel.transport),
            server_keygen=self._server_keygen,
            client_address=request.log_address,
        )
        address = request.log_address
        throttle = self._machinery.throttle
        reactor = self._machinery.reactor
        metrics = request.est_site.metrics
        slots = request.est_site.enrollments

        def release(outcome: Enrollment | Failure) -> Enrollment | Failure:
            slots.release()
            return outcome

        def run(_: object) -> defer.Deferred[Enrollment]:
            # Admitted here, after any failure-throttle delay: a client made
            # to wait for its wrong passwords holds no slot meanwhile.  The
            # slot is freed when the work is done, just before respond()
            # writes the outcome.
            if not slots.admit():
                raise ServiceUnavailable(OVERLOAD_REASON, OVERLOAD_RETRY_AFTER)
            try:
                issuing = self._issue(enrollment_request, metrics)
            except BaseException:
                slots.release()
                raise
            return issuing.addBoth(release)

        def counted(outcome: Enrollment | Failure) -> Enrollment | Failure:
            # Repeated wrong passwords from one address are answered ever
            # more slowly (RFC 7030 §3.2.3 leaves brute force to us).
            if isinstance(outcome, Failure) and outcome.check(BadCredentials):
                throttle.record_failure(address)
            elif credentials is not None and not isinstance(outcome, Failure):
                throttle.record_success(address)
            return outcome

        delay = throttle.delay(address) if credentials is not None else 0.0
        if delay > 0:
            started: defer.Deferred[None] = deferLater(reactor, delay, lambda: None)
        else:
            started = defer.succeed(None)
        work = started.addCallback(run).addBoth(counted)
        return work.addCallback(self._rendered, request)

    def _issue(
        self, enrollment_request: EnrollmentRequest, metrics: Metrics | None
    ) -> defer.Deferred[Enrollment]:
        """Decide and sign in the thread pool (timed there when metered)."""
        machinery = self._machinery
        arguments = (
            self._settings,
            enrollment_request,
            machinery.now(),
            machinery.ledger,
        )
        if metrics is None:
            return machinery.in_thread(enroll, *arguments)
        # Timed in the thread: the work, not the wait for a free thread.
        operation = "serverkeygen" if self._server_keygen else self._operation.value
        return machinery.in_thread(
            metrics.issuance, operation, self._settings.label, enroll, *arguments
        )

    def _rendered(self, enrollment: Enrollment, request: EstRequest) -> EstResponse:
        # A delivered certificate ends the client's business here: the
        # connection is closed rather than left idle (fioconfig's Go client
        # would keep it open, holding a max-connections slot, until it
        # exits).  Refusals keep it open: a client answers a 401 challenge
        # on the same connection, whose tls-unique its CSR may carry.
        request.est_issued = enrollment
        request.est_user = enrollment.requester.user
        if enrollment.content_type is not None:
            # /serverkeygen: each part carries its own transfer encoding.
            return EstResponse(
                200, enrollment.content_type, enrollment.body, close=True
            )
        profile = self._settings.response_profile
        return EstResponse(
            profile.enroll_status,
            profile.enroll_content_type,
            enrollment.body,
            base64=True,
            close=True,
        )


class NotFoundResource(EstResource):
    """Anything that is not an EST resource estd serves."""

    def __init__(self, reason: str) -> None:
        super().__init__()
        self._reason = reason

    def render(self, request: EstRequest) -> int:  # type: ignore[override]
        """Always 404, whatever the method."""
        return respond(request, defer.fail(NotFound(self._reason)))


def operation_resource(
    settings: LabelConfig, name: str, machinery: Machinery
) -> resource.Resource:
    """The resource serving operation ``name`` of one label."""
    if name == "cacerts":
        return CACertsResource(settings)
    if name == "csrattrs":
        return CsrAttrsResource(settings)
    if name == "fullcmc":
        return FullCmcResource()
    if name == "crl":
        return CrlResource(settings, machinery)
    if name == "serverkeygen":
        if not settings.serverkeygen:
            return NotFoundResource(
                "serverkeygen is not enabled here (serverkeygen = yes turns it on)"
            )
        return EnrollResource(
            settings, Operation.SIMPLEENROLL, machinery, server_keygen=True
        )
    return EnrollResource(settings, Operation(name), machinery)


class LabelDirectory(resource.Resource):
    """``/.well-known/est/<label>`` (RFC 7030 §3.2.2): one CA label's operations."""

    def __init__(self, settings: LabelConfig, machinery: Machinery) -> None:
        super().__init__()
        self._settings = settings
        self._machinery = machinery

    def getChild(self, path: bytes, request: EstRequest) -> resource.Resource:
        """Map ``<op>`` to its resource; anything else is 404."""
        if path == b"":
            return self  # a labelled base URL with a trailing slash
        name = path.decode("utf-8", "replace")
        if name in OPERATION_NAMES:
            return operation_resource(self._settings, name, self._machinery)
        return NotFoundResource(f"unknown EST operation {name[:128]!r}")

    def render(self, request: EstRequest) -> int:  # type: ignore[override]
        """A label by itself is no EST resource."""
        return respond(request, defer.fail(NotFound("no EST operation in the path")))


class EstDirectory(resource.Resource):
    """``/.well-known/est``: finds the label and the operation."""

    def __init__(self, config_source: ConfigSource, machinery: Machinery) -> None:
        super().__init__()
        self._config_source = config_source
        self._machinery = machinery

    def getChild(self, path: bytes, request: EstRequest) -> resource.Resource:
        """Map ``<op>`` or ``<label>`` under the current configuration."""
        if path == b"":
            # fioconfig appends "/simplereenroll" to the URL it is given, so a
            # trailing slash in it makes an empty segment; skip it.
            return self
        name = path.decode("utf-8", "replace")
        labels = self._config_source().labels
        if name in OPERATION_NAMES:
            return operation_resource(labels[""], name, self._machinery)
        if name and name in labels:
            return LabelDirectory(labels[name], self._machinery)
        return NotFoundResource(f"unknown EST operation or CA label {name[:128]!r}")

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


def build_site(
    config_source: ConfigSource,
    reactor: Any,
    threadpool: WorkerPool,
    throttle: FailureThrottle | None = None,
    ledger: Ledger | None = None,
    metrics: Metrics | None = None,
) -> EstSite:
    """The whole EST site for a configuration source (counted in ``metrics``)."""
    machinery = Machinery(
        reactor=reactor,
        threadpool=threadpool,
        throttle=throttle if throttle is not None else FailureThrottle(reactor.seconds),
        ledger=ledger,
        crls=CrlPublisher(ledger) if ledger is not None else None,
    )
    est = EstDirectory(config_source, machinery)
    return EstSite(RootResource(est), reactor, metrics, limit_settings=config_source)
