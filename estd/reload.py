"""Configuration at run time: SIGHUP reloads, expiry warnings.

A reload re-reads est.ini and every file it names into a new
:class:`~estd.config.Config`; only when that succeeds is the snapshot
swapped.  New connections and requests then use it; established ones finish
on the old one.  A reload that fails validation is logged and changes
nothing.
"""

from __future__ import annotations

import datetime
import signal
from collections.abc import Callable, Iterator
from typing import Any

from cryptography import x509
from twisted.application import service
from twisted.internet import defer, task
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.python.failure import Failure

from estd.config import Config
from estd.errors import ConfigError

log = Logger(namespace="estd")

EXPIRY_WARNING = datetime.timedelta(days=30)
"""Certificates closer than this to expiry are warned about daily."""

RESTART_ONLY = {
    "listen": "listen",
    "threads": "threads",
    "ledger_url": "ledger",
    "admin_listen": "admin-listen",
    "log_format": "log-format",
    "workers": "workers",
    "cpu_affinity": "cpu-affinity",
    "max_connections": "max-connections",
}
"""Settings a running server cannot change (attribute: est.ini key); a
reload says so."""


class ConfigHolder:
    """Holds the current :class:`Config` snapshot; calling it returns it.

    Everything that needs settings asks the holder per connection or per
    request, so a reload only has to swap the snapshot.
    """

    def __init__(self, config: Config) -> None:
        self.config = config

    def __call__(self) -> Config:
        """The current snapshot."""
        return self.config


def expiring(
    config: Config, now: datetime.datetime
) -> Iterator[tuple[str, x509.Certificate]]:
    """(what, certificate) for each configured certificate near its expiry."""
    seen: set[bytes] = set()

    def check(
        what: str, certificate: x509.Certificate
    ) -> Iterator[tuple[str, x509.Certificate]]:
        key = certificate.tbs_certificate_bytes
        if key in seen:
            return
        seen.add(key)
        if certificate.not_valid_after_utc - now <= EXPIRY_WARNING:
            yield what, certificate

    yield from check("TLS certificate (tls-cert)", config.tls_certificates[0])
    for name, label in config.labels.items():
        where = f" of label {name}" if name else ""
        yield from check(f"EST CA{where} (ca-cert)", label.ca.certificate)
        for root in label.root_certificates:
            yield from check(f"root{where} (root-cert)", root)


class ConfigService(service.Service):
    """Reloads on SIGHUP and warns daily about certificates about to expire."""

    def __init__(
        self,
        holder: ConfigHolder,
        load: Callable[[datetime.datetime], Config] | None,
        reactor: Any,
        on_reload: Callable[[], None] | None = None,
    ) -> None:
        self.on_reload = on_reload
        self.holder = holder
        self.load = load
        self.reactor = reactor
        self._reloading: defer.Deferred[None] | None = None
        self._previous_handler: Any = None
        self._daily: task.LoopingCall | None = None

    def startService(self) -> None:
        """Install the SIGHUP handler and start the daily expiry check."""
        super().startService()
        if self.load is not None:
            self._previous_handler = signal.signal(signal.SIGHUP, self._on_sighup)
        self._daily = task.LoopingCall(self.warn_expiring)
        self._daily.clock = self.reactor
        self._daily.start(86400, now=True)

    def stopService(self) -> None:
        """Restore SIGHUP and stop the daily check."""
        super().stopService()
        if self.load is not None and self._previous_handler is not None:
            signal.signal(signal.SIGHUP, self._previous_handler)
        if self._daily is not None and self._daily.running:
            self._daily.stop()

    def _on_sighup(self, signum: int, frame: object) -> None:
        # Signal handlers interrupt the reactor thread anywhere; do the work
        # from the reactor loop instead.
        self.reactor.callFromThread(self.reload)

    def now(self) -> datetime.datetime:
        """The reactor's time as an aware UTC datetime."""
        return datetime.datetime.fromtimestamp(self.reactor.seconds(), datetime.UTC)

    def reload(self) -> defer.Deferred[None]:
        """Load the configuration anew and swap it in if it is valid."""
        if self.load is None:
            return defer.succeed(None)
        if self._reloading is not None:
            log.info("a reload is already running; SIGHUP ignored")
            return self._reloading
        log.info("SIGHUP: reloading the configuration")
        work: defer.Deferred[Config] = deferToThread(self.load, self.now())
        done = work.addCallbacks(self._loaded, self._failed)

        def finished(result: object) -> object:
            self._reloading = None
            return result

        self._reloading = done.addBoth(finished)
        return self._reloading

    def _loaded(self, config: Config) -> None:
        old = self.holder.config
        unchanged = [
            RESTART_ONLY[name]
            for name in RESTART_ONLY
            if getattr(old, name) != getattr(config, name)
        ]
        if unchanged:
            log.warn(
                "reload: {keys} changed; those take effect after a restart",
                keys=", ".join(unchanged),
            )
        self.holder.config = config
        if self.on_reload is not None:
            self.on_reload()
        log.info(
            "configuration reloaded from {source}; EST CA {ca_subject}; "
            "labels: {labels}",
            source=config.source,
            ca_subject=config.default.ca.certificate.subject.rfc4514_string(),
            labels=", ".join(name for name in config.labels if name) or "none",
        )
        self.warn_expiring()

    def _failed(self, reason: Failure) -> None:
        if reason.check(ConfigError):
            log.error(
                "reload failed, still serving the previous configuration: {error}",
                error=str(reason.value),
            )
            return
        log.failure("reload failed, still serving the previous configuration", reason)

    def warn_expiring(self) -> None:
        """Log a warning for each certificate within 30 days of expiry."""
        now = self.now()
        for what, certificate in expiring(self.holder.config, now):
            days = (certificate.not_valid_after_utc - now).days
            log.warn(
                "{what} {subject} expires on {not_after} ({days} days)",
                what=what,
                subject=certificate.subject.rfc4514_string(),
                not_after=certificate.not_valid_after_utc.strftime("%Y-%m-%d"),
                days=days,
            )
