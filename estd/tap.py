"""The ``twistd est`` plugin: options and ``makeService`` (wiring only)."""

from __future__ import annotations

import os

# Before pyOpenSSL (and the OpenSSL inside cryptography) initialise: no TLS
# 1.3 session tickets (estd/openssl.cnf says why).  An OPENSSL_CONF already
# set by the operator wins.
os.environ.setdefault(
    "OPENSSL_CONF", os.path.join(os.path.dirname(__file__), "openssl.cnf")
)

import datetime
import re
import signal
import sys
from collections.abc import Callable, Generator
from typing import Any, ClassVar

from twisted.application import service, strports
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import defer, task
from twisted.internet.endpoints import serverFromString
from twisted.logger import ILogObserver, Logger
from twisted.python import usage
from twisted.python.failure import Failure

from estd import __version__
from estd.affinity import allowed_cpus, cpu_for_worker, pin_process
from estd.config import KEYS, Config, Key, load_config
from estd.errors import ConfigError
from estd.health import build_admin_site
from estd.ledger import Ledger, LedgerError
from estd.limits import ConnectionLimitedTLSFactory
from estd.logs import json_observer, twistd_log_output
from estd.metrics import Metrics
from estd.pool import SigningThreadPool, in_thread
from estd.reload import ConfigHolder, ConfigService
from estd.site import EstSite
from estd.tls import ServerTLS
from estd.web import build_site
from estd.workers import InheritedPortEndpoint, WorkersService, child_options

_ = strports  # keep the strports plugins (systemd:, tcp:) importable
log = Logger(namespace="estd")


def _help(key: Key) -> str:
    default = f" [default: {key.default}]" if key.default is not None else ""
    return key.help + default


class Options(usage.Options):
    """``twistd est`` options: every est.ini key, plus ``--config``."""

    synopsis = "[--config est.ini] [--KEY VALUE ...]"
    longdesc = (
        "EST (RFC 7030) certificate enrollment server.  Settings come from the "
        "[est] section of --config; each key can also be given as an option of "
        "the same name, which wins over the file.  Relative paths in the file "
        "are relative to the file."
    )
    optParameters: ClassVar[list[list[Any]]] = [
        ["config", "c", None, "est.ini to read settings from"],
        ["worker-fd", None, None, "(internal) serve the listening socket on this fd"],
        ["worker-cpu", None, None, "(internal) the CPU this worker runs on"],
        *[[key.name, None, None, _help(key)] for key in KEYS],
    ]

    def opt_version(self) -> None:
        """Print the estd version and exit."""
        print(f"estd {__version__}")
        sys.exit(0)

    def key_values(self) -> dict[str, str | None]:
        """The est.ini keys given on the command line."""
        return {key.name: self[key.name] for key in KEYS}


class Shutdown:
    """What the stopping services tell each other."""

    abandoned = False
    """True when shutdown-timeout passed with requests still in flight."""


class ThreadPoolService(service.Service):
    """Starts the signing thread pool with the service, stops it after."""

    def __init__(
        self, threadpool: SigningThreadPool, shutdown: Shutdown | None = None
    ) -> None:
        self.threadpool = threadpool
        self.shutdown = shutdown or Shutdown()

    def startService(self) -> None:
        """Start the worker threads."""
        super().startService()
        self.threadpool.start()

    def stopService(self) -> None:
        """Join idle threads; leave abandoned work behind (daemon threads)."""
        super().stopService()
        if not self.shutdown.abandoned:
            self.threadpool.stop()


CLOSE_TIMEOUT = 5.0
"""Seconds a stopping server gives connections to take their last bytes."""


class DrainService(service.Service):
    """On stop, waits (bounded) for requests in flight to be answered.

    Sits between the listener and the thread pool: once the port is closed,
    requests already accepted finish, with their certificates, before the
    signing threads are stopped.
    """

    def __init__(
        self,
        site: EstSite,
        clock: Any,
        timeout: float | Callable[[], float],
        shutdown: Shutdown | None = None,
    ) -> None:
        self.site = site
        self.clock = clock
        self._timeout = timeout
        self.shutdown = shutdown or Shutdown()

    @property
    def timeout(self) -> float:
        """shutdown-timeout of the current configuration (reloads count)."""
        return self._timeout() if callable(self._timeout) else self._timeout

    def stopService(self) -> defer.Deferred[None]:
        """Fire when in-flight requests are done or the timeout passed."""
        super().stopService()
        self.site.draining = True
        timeout = self.timeout
        waiting = self.site.drained()
        if not waiting.called:
            log.info(
                "waiting up to {timeout}s for {count} request(s) in flight",
                timeout=timeout,
                count=self.site.in_flight,
            )
            waiting.addTimeout(timeout, self.clock)

            def abandoned(_: object) -> None:
                self.shutdown.abandoned = True
                log.warn("shutdown timeout: requests in flight abandoned")

            waiting.addErrback(abandoned)

        def close_connections(_: object) -> defer.Deferred[None]:
            # Let written responses leave before the reactor drops sockets;
            # a client that does not read is cut after a few seconds.
            closing = self.site.close_all()
            closing.addTimeout(CLOSE_TIMEOUT, self.clock)
            return closing.addErrback(lambda _: None)

        return waiting.addCallback(close_connections)


class OrderedMultiService(service.MultiService):
    """Stops its children one after another, last started first."""

    est_config: ConfigHolder | None = None
    json_logs = False

    def setServiceParent(self, parent: Any) -> None:
        """Join the application; with log-format = json, set its log observer.

        twistd asks the application for an ILogObserver before it starts
        logging; it still decides where the log goes.
        """
        super().setServiceParent(parent)
        set_component = getattr(parent, "setComponent", None)
        if self.json_logs and set_component is not None:
            set_component(ILogObserver, json_observer(twistd_log_output()))

    def startService(self) -> None:
        """Start the children; say what is served once the reactor runs.

        twistd starts services before the reactor installs its signal
        handlers; the announcement comes after them, so whoever waits for it
        may send SIGTERM or SIGHUP safely.
        """
        super().startService()
        if self.reactor is not None:
            self.reactor.callWhenRunning(self._announce)
        else:
            self._announce()

    def _announce(self) -> None:
        if self.est_config is not None:
            config = self.est_config()
            ca = config.default.ca.certificate
            log.info(
                "estd {version} serving EST on {listen} (TLS); EST CA {ca_subject} "
                "valid until {ca_not_after}; {anchors} client trust anchor(s); "
                "response profile {profile}; labels: {labels}",
                version=__version__,
                listen=config.listen,
                ca_subject=ca.subject.rfc4514_string(),
                ca_not_after=ca.not_valid_after_utc.strftime("%Y-%m-%d"),
                anchors=len(config.trust_anchors),
                profile=config.default.response_profile.value,
                labels=", ".join(name for name in config.labels if name) or "none",
            )

    reactor: Any = None

    @defer.inlineCallbacks
    def stopService(self) -> Generator[defer.Deferred[Any], Any, None]:
        """Stop each child in reverse order, waiting for each.

        After a SIGTERM that ended this way, twistd would kill itself with
        SIGTERM again on exit; a graceful stop exits 0 instead.
        """
        service.Service.stopService(self)
        for child in reversed(list(self)):
            yield defer.maybeDeferred(child.stopService)
        if getattr(self.reactor, "_exitSignal", None) == signal.SIGTERM:
            self.reactor._exitSignal = None


def makeService(options: Options, reactor: Any = None) -> OrderedMultiService:
    """Build the EST service from options; a config error exits with status 2."""
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor

    def load(now: datetime.datetime) -> Config:
        return load_config(options["config"], options.key_values(), now)

    worker_fd = options["worker-fd"]
    try:
        config = load(datetime.datetime.now(datetime.UTC))
        if worker_fd is not None:
            endpoint: Any = InheritedPortEndpoint(reactor, int(worker_fd))
        else:
            endpoint = _endpoint(reactor, config)
        _admin_endpoint(reactor, config)  # refused before the ledger is opened
        ledger = open_ledger(config)
    except ConfigError as error:
        sys.stderr.write(f"estd: configuration error: {error}\n")
        raise SystemExit(2) from None
    if worker_fd is None and config.workers > 1:
        # The ledger was opened (and migrated) once here; workers open theirs.
        ledger.close()
        top = build_supervisor(config, reactor, endpoint, options, load)
    else:
        # Pinned before the signing threads exist: they inherit the CPU.
        if options["worker-cpu"] is not None:
            pin_process(int(options["worker-cpu"]))
        elif worker_fd is None and config.cpu_affinity:
            pin_process(allowed_cpus()[0])
        top = build_service(config, reactor, endpoint, ledger, load)
    if config.log_format == "json":
        top.json_logs = True
    return top


def build_supervisor(
    config: Config,
    reactor: Any,
    endpoint: Any,
    options: Options,
    load: Callable[[datetime.datetime], Config],
) -> OrderedMultiService:
    """``workers = N``: bind the port and run N worker processes on it."""
    holder = ConfigHolder(config)
    keys = [key.name for key in KEYS]
    cpus = allowed_cpus() if config.cpu_affinity else []

    def worker_options(number: int) -> list[str]:
        cpu = cpu_for_worker(number, cpus) if cpus else None
        return child_options(options, keys, config.admin_listen, number, cpu)

    workers = WorkersService(
        reactor,
        endpoint,
        config.workers,
        worker_options,
        config.shutdown_timeout.total_seconds(),
    )
    top = OrderedMultiService()
    top.reactor = reactor
    # A reload is checked here first; only a valid one reaches the workers.
    ConfigService(
        holder, load, reactor, on_reload=lambda: workers.signal_workers(signal.SIGHUP)
    ).setServiceParent(top)
    workers.setServiceParent(top)
    top.est_config = holder
    return top


def open_ledger(config: Config) -> Ledger:
    """Open the ledger and apply its migrations, or fail like a config error.

    Done before listening: a server that cannot record what it issues must
    not start issuing.
    """
    try:
        return Ledger.open(config.ledger_url)
    except (LedgerError, OSError) as exc:
        raise ConfigError(
            "ledger", config.source, f"cannot open {_shown(config.ledger_url)}: {exc}"
        ) from None


def _shown(url: str) -> str:
    """A database URL without its password, for messages and logs."""
    return re.sub(r"(://[^:/@]*):[^@]*@", r"\1:***@", url)


class LedgerService(service.Service):
    """Expires pending requests hourly and closes the ledger on stop."""

    def __init__(
        self,
        ledger: Ledger,
        reactor: Any,
        threadpool: SigningThreadPool,
        shutdown: Shutdown | None = None,
    ) -> None:
        self.shutdown = shutdown or Shutdown()
        self.ledger = ledger
        self.reactor = reactor
        self.threadpool = threadpool
        self._loop: task.LoopingCall | None = None

    def startService(self) -> None:
        """Start the hourly expiry of pending requests."""
        super().startService()
        self._loop = task.LoopingCall(self._expire)
        self._loop.clock = self.reactor
        self._loop.start(3600, now=True).addErrback(
            lambda reason: log.failure("pending-request expiry stopped", reason)
        )

    def _expire(self) -> defer.Deferred[None]:
        now = datetime.datetime.fromtimestamp(self.reactor.seconds(), datetime.UTC)
        work = in_thread(self.reactor, self.threadpool, self.ledger.expire_pending, now)

        def expired(count: int) -> None:
            if count:
                log.info("{count} pending request(s) expired", count=count)

        def failed(reason: Failure) -> None:
            log.warn(
                "cannot expire pending requests: {error}",
                error=reason.getErrorMessage(),
            )

        return work.addCallbacks(expired, failed)

    def stopService(self) -> None:
        """Stop the loop and close the database connections."""
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if not self.shutdown.abandoned:
            # An abandoned signing thread may still be using a connection.
            self.ledger.close()


LISTEN_BACKLOG = 1024
"""Listen queue for tcp: endpoints that set none.  Twisted's default of 50
overflows when a fleet reconnects at once: the kernel then drops SYNs and
each dropped device waits a second or more before trying again."""


def with_backlog(listen: str) -> str:
    """``listen`` with a ``backlog`` if it is a tcp: endpoint without one."""
    if listen.split(":", 1)[0] in ("tcp", "tcp6") and "backlog=" not in listen:
        return f"{listen}:backlog={LISTEN_BACKLOG}"
    return listen


def _endpoint(reactor: Any, config: Config) -> Any:
    try:
        return serverFromString(reactor, with_backlog(config.listen))
    except (ValueError, TypeError, KeyError) as exc:
        raise ConfigError(
            "listen",
            config.source,
            f"{config.listen!r} is not a server endpoint: {exc}",
        ) from None


def _admin_endpoint(reactor: Any, config: Config) -> Any | None:
    """The admin listener's endpoint, or None when admin-listen is empty."""
    if not config.admin_listen:
        return None
    try:
        return serverFromString(reactor, config.admin_listen)
    except (ValueError, TypeError, KeyError) as exc:
        raise ConfigError(
            "admin-listen",
            config.source,
            f"{config.admin_listen!r} is not a server endpoint: {exc}",
        ) from None


def build_service(
    config: Config,
    reactor: Any,
    endpoint: Any,
    ledger: Ledger | None = None,
    load: Callable[[datetime.datetime], Config] | None = None,
) -> OrderedMultiService:
    """Wire a validated configuration to an endpoint: TLS, site, thread pool."""
    holder = ConfigHolder(config)
    threadpool = SigningThreadPool(config.threads)
    shutdown = Shutdown()
    metrics = Metrics(holder, reactor.seconds, threadpool, ledger=ledger)
    site = build_site(holder, reactor, threadpool, ledger=ledger, metrics=metrics)
    factory = ConnectionLimitedTLSFactory(
        ServerTLS(holder),
        site,
        max_connections=lambda: holder().max_connections,
        clock=reactor,
        metrics=metrics,
    )
    factory.noisy = False
    top = OrderedMultiService()
    top.reactor = reactor
    # Stopped in reverse: the ledger closes only after the signing threads
    # that use it are gone (and not at all if some were abandoned).
    if ledger is not None:
        LedgerService(ledger, reactor, threadpool, shutdown).setServiceParent(top)
    ThreadPoolService(threadpool, shutdown).setServiceParent(top)
    admin_endpoint = _admin_endpoint(reactor, config)
    if admin_endpoint is not None:
        # Stopped after the EST port closed and the drain: /metrics stays up
        # while requests finish, and /readyz never pings a closed ledger.
        admin_site = build_admin_site(
            metrics, holder, reactor, threadpool, ledger, draining=lambda: site.draining
        )
        admin = StreamServerEndpointService(admin_endpoint, admin_site)
        admin._raiseSynchronously = True
        admin.setServiceParent(top)
    ConfigService(holder, load, reactor).setServiceParent(top)
    DrainService(
        site,
        reactor,
        lambda: holder().shutdown_timeout.total_seconds(),
        shutdown,
    ).setServiceParent(top)
    listener = StreamServerEndpointService(endpoint, factory)
    listener._raiseSynchronously = True
    listener.setServiceParent(top)
    top.est_config = holder
    return top
