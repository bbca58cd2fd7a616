"""``workers = N``: several processes serving one port, supervised by twistd.

The twistd process (the supervisor) binds the port and never accepts on it;
each worker is a ``twistd -n est`` child that adopts the listening socket
(inherited as a file descriptor), so the kernel spreads connections over
the workers.  The supervisor replaces a worker that dies, passes SIGTERM
and SIGHUP on to every worker, owns the pidfile and writes every worker's
log lines into its own log.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from typing import Any

from twisted.application import service
from twisted.internet import defer, error, protocol
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from zope.interface import implementer

log = Logger(namespace="estd")

RESTART_DELAY = 1.0
"""Seconds before a dead worker is replaced (doubling while it keeps dying
within a minute, up to a minute)."""


@implementer(IStreamServerEndpoint)
class InheritedPortEndpoint:
    """Listens by adopting a listening socket inherited from the supervisor."""

    def __init__(self, reactor: Any, fd: int) -> None:
        self._reactor = reactor
        self._fd = fd

    def listen(self, factory: protocol.Factory) -> defer.Deferred[Any]:  # type: ignore[override]
        """Adopt the socket for ``factory``."""
        family = socket.socket(fileno=os.dup(self._fd)).family
        return defer.execute(self._reactor.adoptStreamPort, self._fd, family, factory)


class _NoAccept(protocol.Factory):
    """The supervisor's port never reads; this factory is never used."""

    noisy = False

    def logPrefix(self) -> str:
        """How the port names itself in the log."""
        return "estd workers' port"


# A worker ignores SIGHUP until its own handler is installed, so a reload
# sent while it starts does not kill it (it reads the new files anyway).
_BOOTSTRAP = (
    "import signal, sys; signal.signal(signal.SIGHUP, signal.SIG_IGN); "
    "from twisted.scripts.twistd import run; sys.exit(run())"
)


class _Worker(protocol.ProcessProtocol):
    """One worker process: relays its log lines, reports its end."""

    def __init__(self, supervisor: WorkersService, number: int) -> None:
        self.supervisor = supervisor
        self.number = number
        self.ended: defer.Deferred[None] = defer.Deferred()
        self._buffers: dict[int, bytes] = {1: b"", 2: b""}

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        """Split the worker's output into lines and log each."""
        buffer = self._buffers.get(childFD, b"") + data
        *lines, rest = buffer.split(b"\n")
        self._buffers[childFD] = rest[-65536:]
        for line in lines:
            self._relay(childFD, line.decode("utf-8", "replace").rstrip("\r"))

    def _relay(self, fd: int, line: str) -> None:
        if not line.strip():
            return
        pid = self.transport.pid if self.transport is not None else None
        if fd == 1:
            try:
                event = json.loads(line)
            except ValueError:
                event = None
            if isinstance(event, dict) and "message" in event:
                # The worker logs JSON lines; log them again here, fields and
                # all, so the one log (text or JSON) reads as one server's.
                fields = {
                    key: value
                    for key, value in event.items()
                    if key not in ("time", "level", "namespace", "message")
                }
                level = LogLevel.levelWithName(str(event.get("level", "info")))
                log.emit(
                    level,
                    "{message}",
                    message=event["message"],
                    worker=self.number,
                    worker_pid=pid,
                    log_system=f"worker {self.number}",
                    **fields,
                )
                return
        log.warn(
            "worker {worker} says: {line}",
            worker=self.number,
            line=line,
            worker_pid=pid,
        )

    def processEnded(self, reason: Failure) -> None:
        """Tell the supervisor; it decides whether to replace the worker."""
        self.ended.callback(None)
        self.supervisor.worker_ended(self, reason)


class WorkersService(service.Service):
    """Binds the port, starts and supervises the worker processes."""

    def __init__(
        self,
        reactor: Any,
        endpoint: Any,
        count: int,
        child_options: Any,
        shutdown_timeout: float,
    ) -> None:
        self.reactor = reactor
        self.endpoint = endpoint
        self.count = count
        self.child_options = child_options
        self.shutdown_timeout = shutdown_timeout
        self.workers: dict[int, _Worker] = {}
        self.restarts = 0
        self._port: Any = None
        self._stopping = False
        self._delays: dict[int, float] = {}
        self._last_start: dict[int, float] = {}

    def privilegedStartService(self) -> None:
        """Bind the port before twistd drops privileges; never accept on it."""
        super().privilegedStartService()
        result: list[Any] = []
        listening = self.endpoint.listen(_NoAccept())
        listening.addBoth(result.append)
        if not result:
            raise RuntimeError("the listening endpoint did not bind synchronously")
        if isinstance(result[0], Failure):
            result[0].raiseException()
        self._port = result[0]
        self._port.stopReading()

    def startService(self) -> None:
        """Start every worker and forward SIGHUP to them from now on."""
        super().startService()
        for number in range(1, self.count + 1):
            self._spawn(number)
        log.info(
            "started {count} worker processes sharing {address}",
            count=self.count,
            address=str(self._port.getHost()),
        )

    def _spawn(self, number: int) -> None:
        fd = self._port.fileno()
        argv = [
            sys.executable,
            "-c",
            _BOOTSTRAP,
            "-n",
            "--pidfile=",
            "est",
            *self.child_options(number),
            f"--worker-fd={3}",
        ]
        worker = _Worker(self, number)
        self.reactor.spawnProcess(
            worker,
            sys.executable,
            argv,
            env=dict(os.environ),
            path=os.getcwd(),
            childFDs={0: "w", 1: "r", 2: "r", 3: fd},
        )
        self.workers[number] = worker
        self._last_start[number] = self.reactor.seconds()

    def worker_ended(self, worker: _Worker, reason: Failure) -> None:
        """Replace a worker that ended while the service runs."""
        if self.workers.get(worker.number) is worker:
            del self.workers[worker.number]
        if self._stopping:
            return
        status = getattr(reason.value, "exitCode", None)
        sig = getattr(reason.value, "signal", None)
        how = f"signal {sig}" if sig else f"status {status}"
        # A worker that keeps dying right after its start waits longer each
        # time, so a broken setup does not spin.
        lived = self.reactor.seconds() - self._last_start.get(worker.number, 0.0)
        delay = self._delays.get(worker.number, RESTART_DELAY)
        delay = min(delay * 2, 60.0) if lived < 60 else RESTART_DELAY
        self._delays[worker.number] = delay
        self.restarts += 1
        log.warn(
            "worker {worker} ended ({how}); starting a new one in {delay:g}s",
            worker=worker.number,
            how=how,
            delay=delay,
        )
        self.reactor.callLater(delay, self._respawn, worker.number)

    def _respawn(self, number: int) -> None:
        if not self._stopping and number not in self.workers:
            self._spawn(number)

    def signal_workers(self, signum: int) -> None:
        """Send ``signum`` to every running worker."""
        for worker in list(self.workers.values()):
            try:
                worker.transport.signalProcess(signum)  # type: ignore[union-attr]
            except (error.ProcessExitedAlready, OSError):
                pass

    def stopService(self) -> defer.Deferred[None]:
        """SIGTERM every worker, wait for them (bounded), close the port."""
        super().stopService()
        self._stopping = True
        ended = [worker.ended for worker in self.workers.values()]
        self.signal_workers(signal.SIGTERM)
        waiting = defer.DeferredList(ended, consumeErrors=True)
        # Workers drain for shutdown-timeout themselves; kill stragglers.
        waiting.addTimeout(self.shutdown_timeout + 5, self.reactor)

        def stragglers(_: object) -> None:
            self.signal_workers(signal.SIGKILL)

        def close(_: object) -> defer.Deferred[Any] | None:
            if self._port is not None:
                return defer.maybeDeferred(self._port.stopListening)
            return None

        return waiting.addErrback(stragglers).addBoth(close)


def child_options(
    options: Any,
    keys: list[str],
    admin_listen: str,
    number: int,
    cpu: int | None = None,
) -> list[str]:
    """The est options worker ``number`` gets: the supervisor's, with the
    config path made absolute, JSON logs to the supervisor, the admin
    listener (if any) on the admin port + ``number``, and the CPU it is
    pinned to under cpu-affinity = auto."""
    argv: list[str] = []
    if options["config"]:
        argv.append(f"--config={os.path.abspath(options['config'])}")
    for name in keys:
        value = options[name]
        if value is not None and name not in ("workers", "admin-listen", "log-format"):
            argv.append(f"--{name}={value}")
    # Workers log JSON to the supervisor, which re-logs in the chosen format.
    argv += [
        "--workers=1",
        "--log-format=json",
        f"--admin-listen={worker_admin(admin_listen, number)}",
    ]
    if cpu is not None:
        argv.append(f"--worker-cpu={cpu}")
    return argv


def worker_admin(admin_listen: str, number: int) -> str:
    """Worker ``number``'s admin endpoint: a tcp: port moved up by ``number``."""
    parts = admin_listen.split(":")
    if len(parts) >= 2 and parts[0] == "tcp" and parts[1].isdigit():
        parts[1] = str(int(parts[1]) + number)
        return ":".join(parts)
    return ""
