"""The load generator: worker processes that each drive many connections.

Every worker is one process with a single-threaded ``selectors`` (epoll) loop
over non-blocking sockets and :mod:`ssl`.  Each request is a fresh TCP
connection and a full TLS handshake (TLS 1.3 unless asked otherwise; the
client never offers a session, so nothing is resumed), with the device's
P-256 certificate for the cases that need one.  Everything a request needs
(TLS contexts, the CSR with its fresh key, the request bytes) is prepared
before the clock starts; the clock runs from ``socket()`` to the last byte of
the response, and the response is checked after the clock stopped.

The driver (:mod:`bench.driver`) talks to each worker over a pipe:
``("prepare", n)`` makes ``n`` fresh CSRs, ``("run", params)`` runs one phase
and answers its statistics, ``("exit", None)`` ends the process.

Cases:

``cacerts``         anonymous ``GET /.well-known/est/cacerts``: 200 and a
                    certs-only PKCS#7 with the expected number of certificates
``simplereenroll``  ``POST`` of a fioconfig CSR with the device certificate:
``simpleenroll``    201, exactly one certificate, the device's subject bytes
                    and the CSR's public key
``handshake``       connect, full handshake with the client certificate,
                    close_notify both ways, close: the TLS share of the cost
``handshake-anon``  the same without a client certificate (as for cacerts)

Error kinds: ``connect`` (TCP connect failed), ``tls`` (handshake failed or
the server sent an alert), ``reset`` (the connection broke before the whole
response), ``timeout`` (no complete answer within the request timeout),
``http-NNN`` (an unexpected status), ``bad-response`` (the expected status but
a body that is not what was asked for).  A 503 is not an error: it is counted
as ``rejected_503`` and the request is retried after its ``Retry-After``
(capped); in a closed loop the waiting client keeps its slot, in a burst the
device waits without holding a connection.
"""

from __future__ import annotations

import array
import base64
import collections
import errno
import heapq
import itertools
import os
import resource
import selectors
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bench.der import (
    DerError,
    PreparedCsr,
    certificate_fields,
    decode_base64_body,
    fioconfig_csr,
    pem_certificate_der,
    pkcs7_certificates,
)

CASES = ("cacerts", "simplereenroll", "simpleenroll", "handshake", "handshake-anon")
HANDSHAKE_CASES = frozenset({"handshake", "handshake-anon"})
CERT_CASES = frozenset({"simplereenroll", "simpleenroll", "handshake"})
ENROLL_CASES = frozenset({"simplereenroll", "simpleenroll"})
EST_PATH = "/.well-known/est"
FIOCONFIG_AGENT = "fioconfig-client/2"
MAX_ATTEMPTS = 100
"""A burst device that got 503 this many times counts as failed (``gave-up``)."""

_CONNECTING, _HANDSHAKE, _SENDING, _RECEIVING, _CLOSING = range(5)
_READ, _WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE


@dataclass(frozen=True)
class WorkerSpec:
    """What one worker process needs to know, fixed for its lifetime."""

    index: int
    host: str
    port: int
    server_name: str
    cafile: str
    devices: list[tuple[str, str]]
    """(certificate PEM path, key PEM path) of the devices this worker uses."""
    tls: str = "1.3"
    timeout: float = 30.0
    retry_cap: float = 1.0
    expected_cacerts: int = 2


@dataclass
class Job:
    """One request to make: which device, with which CSR, as which bytes."""

    device: int
    csr: PreparedCsr | None
    request: bytes | None
    """None for handshake-only."""
    attempts: int = 0


@dataclass
class PhaseStats:
    """What one worker saw in one phase (sent to the driver as a dict)."""

    ok: int = 0
    ok_in_window: int = 0
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    error_samples: list[str] = field(default_factory=list)
    rejected_503: int = 0
    latencies: array.array[float] = field(default_factory=lambda: array.array("d"))
    connect_times: array.array[float] = field(default_factory=lambda: array.array("d"))
    """socket() to TCP connected: long ones mean a full accept queue."""
    handshake_times: array.array[float] = field(
        default_factory=lambda: array.array("d")
    )
    """TCP connected to TLS handshake done (client side)."""
    csr_reused: int = 0
    retried_devices: int = 0
    failed_devices: int = 0
    last_success: float = 0.0
    started: float = 0.0
    finished: float = 0.0
    cpu_user: float = 0.0
    cpu_system: float = 0.0

    def error(self, kind: str, detail: str) -> None:
        """Count an error; keep the first few details for the report."""
        self.errors[kind] += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(f"{kind}: {detail}")

    def as_dict(self) -> dict[str, Any]:
        """A picklable summary; latencies as raw doubles."""
        return {
            "ok": self.ok,
            "ok_in_window": self.ok_in_window,
            "errors": dict(self.errors),
            "error_samples": self.error_samples,
            "rejected_503": self.rejected_503,
            "latencies": self.latencies.tobytes(),
            "connect_times": self.connect_times.tobytes(),
            "handshake_times": self.handshake_times.tobytes(),
            "csr_reused": self.csr_reused,
            "retried_devices": self.retried_devices,
            "failed_devices": self.failed_devices,
            "last_success": self.last_success,
            "started": self.started,
            "finished": self.finished,
            "cpu_user": self.cpu_user,
            "cpu_system": self.cpu_system,
        }


def client_context(
    spec: WorkerSpec, cert: str | None, key: str | None
) -> ssl.SSLContext:
    """A client context: verifies the server, optionally presents a device cert."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(spec.cafile)
    if spec.tls == "1.3":
        context.minimum_version = ssl.TLSVersion.TLSv1_3
    elif spec.tls == "1.2":
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    if cert is not None:
        context.load_cert_chain(cert, key)
    return context


def parse_head(data: bytes, head_end: int) -> tuple[int, dict[bytes, bytes]]:
    """Status code and lower-cased headers of an HTTP/1.1 response head."""
    lines = data[:head_end].split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/"):
        raise DerError(f"not an HTTP response: {lines[0][:60]!r}")
    status = int(parts[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return status, headers


def retry_after(headers: dict[bytes, bytes], cap: float) -> float:
    """The Retry-After delay in seconds (a missing or odd value counts as 1 s)."""
    try:
        seconds = float(int(headers.get(b"retry-after", b"1")))
    except ValueError:
        seconds = 1.0
    return max(0.0, min(seconds, cap))


class Connection:
    """One request on its own connection, advanced by selector events."""

    __slots__ = (
        "buffer",
        "connected",
        "context",
        "fd",
        "handshaken",
        "head_end",
        "job",
        "length",
        "request",
        "sent",
        "sock",
        "start",
        "state",
        "timeout_at",
        "tls",
        "wanted",
    )

    def __init__(
        self,
        job: Job,
        context: ssl.SSLContext,
        request: bytes | None,
        start: float,
        timeout: float,
    ) -> None:
        self.job = job
        self.context = context
        self.request = request
        self.start = start
        self.timeout_at = start + timeout
        self.state = _CONNECTING
        self.sock: socket.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setblocking(False)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.fd = self.sock.fileno()
        self.tls: ssl.SSLSocket | None = None
        self.sent = 0
        self.buffer = bytearray()
        self.head_end = -1
        self.length = -1
        self.wanted = _WRITE
        self.connected = self.handshaken = 0.0

    def close(self) -> None:
        """Close without close_notify, as a device process that exits."""
        (self.tls or self.sock).close()

    def advance(self, server_name: str) -> str | None:
        """Make progress; '' when the exchange is complete, an error kind, or None.

        None means: wait for ``self.wanted`` on the socket.
        """
        try:
            if self.state == _CONNECTING:
                error = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if error:
                    return "connect:" + os.strerror(error)
                self.tls = self.context.wrap_socket(
                    self.sock,
                    server_hostname=server_name,
                    do_handshake_on_connect=False,
                )
                self.connected = time.monotonic()
                self.state = _HANDSHAKE
            tls = self.tls
            assert tls is not None
            if self.state == _HANDSHAKE:
                tls.do_handshake()
                self.handshaken = time.monotonic()
                self.state = _CLOSING if self.request is None else _SENDING
            if self.state == _CLOSING:
                # close_notify, then wait for the server's: it has then seen
                # our Finished (and verified our certificate) for sure.
                tls.unwrap()
                return ""
            if self.state == _SENDING:
                request = self.request
                assert request is not None
                while self.sent < len(request):
                    self.sent += tls.send(request[self.sent :])
                self.state = _RECEIVING
            while True:  # _RECEIVING
                chunk = tls.recv(65536)
                if not chunk:
                    return self._at_eof()
                self.buffer += chunk
                if self._complete():
                    return ""
        except ssl.SSLWantReadError:
            self.wanted = _READ
            return None
        except ssl.SSLWantWriteError:
            self.wanted = _WRITE
            return None
        except ssl.SSLZeroReturnError:
            return self._at_eof()
        except ssl.SSLEOFError:
            if self.state == _CLOSING:
                # No close_notify back: the server may have refused our
                # certificate after the handshake (TLS 1.3) and hung up.
                return "reset:closed without close_notify"
            return self._at_eof()
        except ssl.SSLError as exc:
            if self.state in (_HANDSHAKE, _CLOSING) or "ALERT" in str(exc.reason):
                return f"tls:{exc.reason or exc}"
            return f"reset:{exc.reason or exc}"
        except OSError as exc:
            what = "connect" if self.state == _CONNECTING else "reset"
            return f"{what}:{exc.strerror or exc}"

    def _at_eof(self) -> str:
        if self.state == _CLOSING:
            return ""
        if self.state == _RECEIVING and self.head_end >= 0 and self.length < 0:
            return ""  # no Content-Length: the body ends with the connection
        return "reset:connection closed before the whole response"

    def _complete(self) -> bool:
        if self.head_end < 0:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return False
            self.head_end = end
            head = bytes(self.buffer[:end]).lower()
            marker = head.find(b"\r\ncontent-length:")
            if marker >= 0:
                line_end = head.find(b"\r\n", marker + 2)
                value = head[marker + 17 : line_end if line_end >= 0 else None]
                try:
                    self.length = int(value.strip())
                except ValueError:
                    self.length = -1
        if self.length < 0:
            return False
        return len(self.buffer) >= self.head_end + 4 + self.length


class Worker:
    """One load generator process: its devices, contexts and CSRs."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.address = (spec.host, spec.port)
        self.anonymous = client_context(spec, None, None)
        self.contexts: list[ssl.SSLContext] = []
        self.subjects: list[bytes] = []
        for cert, key in spec.devices:
            with open(cert, "rb") as handle:
                subject, _ = certificate_fields(pem_certificate_der(handle.read()))
            self.subjects.append(subject)
            self.contexts.append(client_context(spec, cert, key))
        self.csrs: list[PreparedCsr] = []
        self.csr_next = 0
        self.csr_wrapped = False
        self.device_next = 0

    # --- preparation (before the clock) ---------------------------------------------

    def prepare(self, argument: tuple[int, bool]) -> None:
        """Replace the CSR pool by fresh CSRs, round-robin over the devices.

        ``argument`` is (count, from_first): with from_first the round starts
        at this worker's first device (a burst), else where the last ended.
        """
        count, from_first = argument
        devices = len(self.subjects)
        if from_first:
            self.device_next = 0
        self.csrs = []
        self.csr_next = 0
        self.csr_wrapped = False
        for number in range(count):
            device = (self.device_next + number) % devices
            der, spki = fioconfig_csr(self.subjects[device])
            self.csrs.append(PreparedCsr(device, base64.b64encode(der), spki))
        self.device_next = (self.device_next + count) % max(devices, 1)

    def request_bytes(self, case: str, csr: PreparedCsr | None) -> bytes | None:
        """The exact bytes of one request; None for handshake-only."""
        host = f"{self.spec.server_name}:{self.spec.port}"
        if case in HANDSHAKE_CASES:
            return None
        if case == "cacerts":
            return (
                f"GET {EST_PATH}/cacerts HTTP/1.1\r\nHost: {host}\r\n"
                "User-Agent: estd-bench\r\nAccept-Encoding: identity\r\n\r\n"
            ).encode()
        assert csr is not None
        # The User-Agent of fioconfig releases before 2026: the Go server
        # answers it (only it) with fioconfig's 201; estd ignores it.
        return (
            f"POST {EST_PATH}/{case} HTTP/1.1\r\nHost: {host}\r\n"
            f"User-Agent: {FIOCONFIG_AGENT}\r\nContent-Type: application/pkcs10\r\n"
            f"Content-Length: {len(csr.body)}\r\nAccept-Encoding: identity\r\n\r\n"
        ).encode() + csr.body

    # --- one phase --------------------------------------------------------------------

    def run(self, params: dict[str, Any]) -> dict[str, Any]:
        """Run one phase (closed loop or burst) and return its statistics."""
        case: str = params["case"]
        concurrency: int = params["concurrency"]
        burst: bool = params.get("burst", False)
        duration: float | None = params.get("duration")
        limit: int | None = params.get("requests")
        spec = self.spec
        stats = PhaseStats()
        enroll = case in ENROLL_CASES
        use_cert = case in CERT_CASES
        # Everything each request needs is built before the clock starts.
        if enroll and not self.csrs:
            raise RuntimeError("no CSRs prepared")
        pool = [(csr, self.request_bytes(case, csr)) for csr in self.csrs]
        shared_request = None if enroll else self.request_bytes(case, None)
        devices = len(self.contexts)
        if use_cert and not devices:
            raise RuntimeError("no devices")

        queue: collections.deque[Job] = collections.deque()
        if burst:
            queue.extend(Job(csr.device, csr, request) for csr, request in pool)
        delayed: list[tuple[float, int, Job]] = []
        retry: collections.deque[Job] = collections.deque()
        sequence = itertools.count()
        active: dict[int, Connection] = {}
        selector = selectors.EpollSelector()
        requests_left = limit if limit is not None else -1
        deadline = float("inf")

        def fresh_job(now: float) -> Job | None:
            nonlocal requests_left
            if burst:
                return queue.popleft() if queue else None
            if now >= deadline or requests_left == 0:
                return None
            requests_left -= 1 if requests_left > 0 else 0
            if enroll:
                if self.csr_next >= len(pool):
                    self.csr_next = 0
                    self.csr_wrapped = True
                if self.csr_wrapped:
                    stats.csr_reused += 1
                csr, request = pool[self.csr_next]
                self.csr_next += 1
                return Job(csr.device, csr, request)
            device = self.device_next
            self.device_next = (device + 1) % max(devices, 1)
            return Job(device, None, shared_request)

        def start(job: Job, now: float) -> None:
            job.attempts += 1
            context = self.contexts[job.device] if use_cert else self.anonymous
            conn = Connection(job, context, job.request, now, spec.timeout)
            code = conn.sock.connect_ex(self.address)
            if code not in (0, errno.EINPROGRESS):
                conn.close()
                finish(conn, "connect:" + os.strerror(code), now)
                return
            active[conn.fd] = conn
            selector.register(conn.fd, _WRITE, conn)
            if code == 0:
                step(conn)

        def finish(conn: Connection, outcome: str, now: float) -> None:
            job = conn.job
            if not outcome:
                outcome, delay = self.check(case, conn, job)
                if outcome == "retry":
                    stats.rejected_503 += 1
                    if not burst or job.attempts < MAX_ATTEMPTS:
                        heapq.heappush(delayed, (now + delay, next(sequence), job))
                        return
                    outcome = f"gave-up:{job.attempts} attempts answered 503"
            if outcome:
                kind, _, detail = outcome.partition(":")
                stats.error(kind, detail)
                stats.failed_devices += 1 if burst else 0
                return
            stats.ok += 1
            stats.latencies.append(now - conn.start)
            stats.connect_times.append(conn.connected - conn.start)
            stats.handshake_times.append(conn.handshaken - conn.connected)
            if now <= deadline:
                stats.ok_in_window += 1
            stats.last_success = max(stats.last_success, now)
            if job.attempts > 1:
                stats.retried_devices += 1

        def step(conn: Connection) -> None:
            outcome = conn.advance(spec.server_name)
            if outcome is None:
                selector.modify(conn.fd, conn.wanted, conn)
                return
            # The clock stops before the socket is closed and the answer checked.
            now = time.monotonic()
            selector.unregister(conn.fd)
            del active[conn.fd]
            conn.close()
            finish(conn, outcome, now)

        usage0 = resource.getrusage(resource.RUSAGE_SELF)
        started = stats.started = time.monotonic()
        if duration is not None:
            deadline = started + duration
        last_sweep = started
        while True:
            now = time.monotonic()
            while delayed and delayed[0][0] <= now:
                retry.append(heapq.heappop(delayed)[2])
            if not burst and now >= deadline:
                delayed.clear()  # a closed loop makes no new requests after it
                retry.clear()
            # In a closed loop a client waiting out a 503 keeps its slot; in a
            # burst a waiting device holds no connection.
            busy = len(active) + (0 if burst else len(delayed))
            while busy < concurrency:
                job = retry.popleft() if retry else fresh_job(now)
                if job is None:
                    break
                start(job, now)
                busy += 1
            if not active and not delayed and not retry:
                if burst and not queue:
                    break
                if not burst and (now >= deadline or requests_left == 0):
                    break
            wait = 0.25
            if delayed:
                wait = min(wait, max(0.0, delayed[0][0] - now))
            if deadline > now:
                wait = min(wait, deadline - now)
            for key, _ in selector.select(wait):
                step(key.data)
            now = time.monotonic()
            if now - last_sweep >= 0.25:
                last_sweep = now
                for conn in [c for c in active.values() if c.timeout_at <= now]:
                    selector.unregister(conn.fd)
                    del active[conn.fd]
                    conn.close()
                    finish(conn, f"timeout:no answer within {spec.timeout:g}s", now)
        stats.finished = time.monotonic()
        usage1 = resource.getrusage(resource.RUSAGE_SELF)
        stats.cpu_user = usage1.ru_utime - usage0.ru_utime
        stats.cpu_system = usage1.ru_stime - usage0.ru_stime
        selector.close()
        return stats.as_dict()

    def check(self, case: str, conn: Connection, job: Job) -> tuple[str, float]:
        """'' if the answer is right, 'retry' (with its delay) or 'kind:detail'."""
        if case in HANDSHAKE_CASES:
            return "", 0.0
        data = bytes(conn.buffer)
        try:
            status, headers = parse_head(data, conn.head_end)
        except (DerError, ValueError) as exc:
            return f"bad-response:{exc}", 0.0
        if status == 503:
            return "retry", retry_after(headers, self.spec.retry_cap)
        body = data[conn.head_end + 4 :]
        expected = 200 if case == "cacerts" else 201
        if status != expected:
            text = body[:120].decode("utf-8", "replace").strip()
            return f"http-{status}:{text}", 0.0
        try:
            der = decode_base64_body(body)
            certificates = pkcs7_certificates(der)
            if case == "cacerts":
                for start, _ in certificates:
                    certificate_fields(der, start)
                if len(certificates) != self.spec.expected_cacerts:
                    return (
                        f"bad-response:{len(certificates)} CA certificates,"
                        f" expected {self.spec.expected_cacerts}",
                        0.0,
                    )
                return "", 0.0
            if len(certificates) != 1:
                return f"bad-response:{len(certificates)} certificates", 0.0
            subject, spki = certificate_fields(der, certificates[0][0])
        except DerError as exc:
            return f"bad-response:{exc}", 0.0
        assert job.csr is not None
        if subject != self.subjects[job.device]:
            return "bad-response:the subject differs from the device's", 0.0
        if spki != job.csr.spki:
            return "bad-response:the public key is not the CSR's", 0.0
        return "", 0.0


def worker_main(spec: WorkerSpec, pipe: Any) -> None:
    """Entry point of a worker process: serve the driver's commands."""
    try:
        worker = Worker(spec)
    except Exception as exc:
        pipe.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    pipe.send(("ready", None))
    commands: dict[str, Callable[[Any], Any]] = {
        "prepare": worker.prepare,
        "run": worker.run,
    }
    while True:
        command, argument = pipe.recv()
        if command == "exit":
            return
        try:
            pipe.send(("ok", commands[command](argument)))
        except Exception as exc:
            pipe.send(("error", f"{type(exc).__name__}: {exc}"))
