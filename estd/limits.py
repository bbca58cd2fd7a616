"""Overload and slow clients: what one estd process takes on at a time.

Three bounds, each read from the configuration snapshot current when it is
applied (so a reload changes them for new work):

- ``max-pending``: enrollments (simpleenroll, simplereenroll, serverkeygen)
  in flight.  Beyond it a new one is answered 503 with ``Retry-After`` at
  once: a client told to come back soon fares better than one whose request
  waits in the signing queue until it gives up (a whole fleet renewing
  after a CA rotation would otherwise all time out together).
- ``max-connections``: open connections.  Beyond it a new connection is
  closed on arrival, before any TLS work; those already open keep working.
- ``handshake-timeout``, ``header-timeout``, ``body-timeout``: how long a
  connection may take over each phase of a request.  A client trickling
  bytes (slowloris) keeps resetting an idle timeout, never these.
  Enrollment work only starts once the whole body is in, so a slow client
  costs a connection, never a signing thread.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory

from estd.metrics import Metrics
from estd.tls import EstTLSProtocol

log = Logger(namespace="estd")

OVERLOAD_RETRY_AFTER = 5
"""Seconds a client refused by ``max-pending`` is told to wait (Retry-After):
long enough for the signing queue to move, short against a device's timer."""

OVERLOAD_REASON = "the server is busy with other enrollments; retry later"
"""The one-line body of the 503 a client refused by ``max-pending`` gets."""

LIMIT_LOG_INTERVAL = 5.0
"""Seconds between two log lines saying a limit is reached (no log flood)."""


class LimitSettings(Protocol):
    """The settings this module reads; a :class:`estd.config.Config` has them."""

    @property
    def max_pending(self) -> int:
        """Enrollments in flight before new ones get 503."""

    @property
    def max_connections(self) -> int:
        """Open connections before new ones are closed."""

    @property
    def handshake_timeout(self) -> float:
        """Seconds from the TCP connection to the end of the TLS handshake."""

    @property
    def header_timeout(self) -> float:
        """Seconds for a request line and headers."""

    @property
    def body_timeout(self) -> float:
        """Seconds for a request body, from the end of the headers."""


@dataclass(frozen=True)
class Limits:
    """Limit settings by themselves; the defaults are est.ini's (4 threads)."""

    max_pending: int = 32
    max_connections: int = 1024
    handshake_timeout: float = 10.0
    header_timeout: float = 10.0
    body_timeout: float = 10.0


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class Phase:
    """One timed phase of a connection: its setting and how logs name it."""

    name: str
    setting: str
    """The est.ini key."""
    what: str
    """What had to complete, in words."""

    def timeout(self, settings: LimitSettings) -> float:
        """The phase's time limit in seconds under ``settings``."""
        seconds: float = getattr(settings, self.setting.replace("-", "_"))
        return seconds


HANDSHAKE = Phase("handshake", "handshake-timeout", "the TLS handshake")
HEADERS = Phase("headers", "header-timeout", "the request line and headers")
BODY = Phase("body", "body-timeout", "the request body")
PHASES = (HANDSHAKE, HEADERS, BODY)
"""A connection's timed phases, in order (``estd_connection_timeouts_total``
counts aborts by their names)."""


class Occasional:
    """Counts events, and says when one is worth a log line.

    The first event is reported at once; after that at most one report per
    ``interval`` seconds, each with the number of events since the last one.
    """

    def __init__(
        self, seconds: Callable[[], float], interval: float = LIMIT_LOG_INTERVAL
    ) -> None:
        self._seconds = seconds
        self._interval = interval
        self._last: float | None = None
        self._unreported = 0

    def happened(self) -> int | None:
        """Count one event; the count to report now, or None to stay quiet."""
        self._unreported += 1
        now = self._seconds()
        if self._last is not None and now - self._last < self._interval:
            return None
        self._last = now
        count, self._unreported = self._unreported, 0
        return count


class EnrollmentSlots:
    """The count of enrollments in flight, bounded by ``max-pending``.

    A slot is held from when an enrollment is admitted until its work is
    done, which is when its response is written (or dropped, its client
    gone).  A client that hangs up does not free its slot early: its CSR is
    still queued or being signed, and freeing the slot would let clients
    that connect, send and leave pile up unbounded work in the pool.
    """

    def __init__(
        self,
        settings: Callable[[], LimitSettings],
        seconds: Callable[[], float],
        metrics: Metrics | None = None,
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self._refusals = Occasional(seconds)
        self.in_flight = 0

    def admit(self) -> bool:
        """Take a slot if one is free; False (counted, logged now and then) if not."""
        limit = self._settings().max_pending
        if self.in_flight >= limit:
            if self._metrics is not None:
                self._metrics.request_rejected("max_pending")
            refused = self._refusals.happened()
            if refused is not None:
                log.warn(
                    "max-pending reached ({max_pending} enrollments in flight): "
                    "new enrollments get 503; {refused} refused since the last "
                    "such message",
                    max_pending=limit,
                    refused=refused,
                )
            return False
        self.in_flight += 1
        if self._metrics is not None:
            self._metrics.enrollments_in_flight.set(self.in_flight)
        return True

    def release(self) -> None:
        """Give a slot back."""
        self.in_flight -= 1
        if self._metrics is not None:
            self._metrics.enrollments_in_flight.set(self.in_flight)


class ConnectionLimitedTLSFactory(TLSMemoryBIOFactory):
    """The server's TLS factory, refusing connections beyond ``max-connections``.

    A refused connection gets no protocol: the listening port closes the
    socket at once, before a byte of TLS is read or written.  The count is
    of connections this factory holds open (``WrappingFactory.protocols``).
    """

    protocol = EstTLSProtocol

    def __init__(
        self,
        contextFactory: Any,
        wrappedFactory: Any,
        *,
        max_connections: Callable[[], int],
        clock: IReactorTime,
        metrics: Metrics | None = None,
    ) -> None:
        super().__init__(contextFactory, False, wrappedFactory, clock=clock)
        self._max_connections = max_connections
        self._metrics = metrics
        self._refusals = Occasional(clock.seconds)

    @property
    def open_connections(self) -> int:
        """Connections currently open through this factory."""
        return len(self.protocols)

    def buildProtocol(self, addr: Any) -> Any:
        """A TLS protocol for the connection, or None when the limit is reached."""
        limit = self._max_connections()
        if len(self.protocols) >= limit:
            if self._metrics is not None:
                self._metrics.connection_rejected("max_connections")
            refused = self._refusals.happened()
            if refused is not None:
                log.warn(
                    "max-connections reached ({max_connections} open): new "
                    "connections are closed; {refused} refused since the last "
                    "such message (latest from {client_address})",
                    max_connections=limit,
                    refused=refused,
                    client_address=getattr(addr, "host", "?"),
                )
            return None
        return super().buildProtocol(addr)
