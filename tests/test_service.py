"""The twistd plugin wiring: options, makeService, ordered shutdown."""

from __future__ import annotations

import io
import os
import sys
import tempfile
from unittest import mock

from twisted.application import service
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial.unittest import SynchronousTestCase

from estd.tap import DrainService, Options, OrderedMultiService, makeService
from tests.pki import write_pki


class _Reactor(MemoryReactorClock):
    """A memory reactor that also takes results from the thread pool."""

    def callFromThread(self, f, *args, **kwargs):  # type: ignore[no-untyped-def]
        f(*args, **kwargs)


def _options(*argv: str) -> Options:
    options = Options()
    options.parseOptions(list(argv))
    return options


class OptionsTests(SynchronousTestCase):
    """The command line of `twistd est`."""

    def test_go_server_flags(self) -> None:
        """The Go server's flag names are accepted as options of the same name."""
        options = _options(
            "--tls-cert", "t.pem", "--tls-key", "t.key", "--root-cert", "r.pem",
            "--ca-cert", "c.pem", "--ca-key", "c.key", "--client-cas", "d.pem",
            "--port", "9443", "--cert-duration", "1095d",
        )  # fmt: skip
        values = options.key_values()
        self.assertEqual(values["tls-cert"], "t.pem")
        self.assertEqual(values["client-cas"], "d.pem")
        self.assertEqual(values["port"], "9443")
        self.assertEqual(values["cert-duration"], "1095d")
        self.assertIsNone(values["listen"])

    def test_unknown_option_refused(self) -> None:
        """An option that is no est.ini key is a usage error."""
        from twisted.python.usage import UsageError

        self.assertRaises(UsageError, _options, "--no-such-key", "1")


class MakeServiceTests(SynchronousTestCase):
    """makeService builds the server from a configuration, or stops."""

    def setUp(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="estd-svc-")
        self.ini = write_pki(self.directory)

    def test_listens_with_tls(self) -> None:
        """The service listens on the configured endpoint with TLS wrapping the site."""
        reactor = _Reactor()
        options = _options(
            "--config",
            self.ini,
            "--listen",
            "tcp:18443:interface=127.0.0.1",
            "--admin-listen=",
        )
        top = makeService(options, reactor=reactor)
        top.privilegedStartService()
        top.startService()
        self.addCleanup(top.stopService)
        [(port, factory, backlog, interface)] = reactor.tcpServers
        self.assertEqual((port, interface), (18443, "127.0.0.1"))
        # A fleet reconnecting at once overflows Twisted's default queue of 50.
        self.assertEqual(backlog, 1024)
        self.assertIsInstance(factory, TLSMemoryBIOFactory)

    def test_explicit_backlog_is_kept(self) -> None:
        """A listen endpoint that sets its own backlog keeps it."""
        from estd.tap import with_backlog

        self.assertEqual(with_backlog("tcp:8443:backlog=77"), "tcp:8443:backlog=77")
        self.assertEqual(with_backlog("tcp:8443"), "tcp:8443:backlog=1024")
        self.assertEqual(with_backlog("unix:/run/estd.sock"), "unix:/run/estd.sock")

    def test_config_error_exits_before_listening(self) -> None:
        """A config error prints one line naming file and key and exits with 2."""
        with open(self.ini, "a") as handle:
            handle.write("tls-certificate = oops.pem\n")
        reactor = MemoryReactorClock()
        stderr = io.StringIO()
        with mock.patch.object(sys, "stderr", stderr):
            with self.assertRaises(SystemExit) as raised:
                makeService(_options("--config", self.ini), reactor=reactor)
        self.assertEqual(raised.exception.code, 2)
        self.assertEqual(
            stderr.getvalue(),
            f"estd: configuration error: {self.ini}: tls-certificate: unknown key\n",
        )
        self.assertEqual(reactor.tcpServers, [])

    def test_bad_listen_endpoint(self) -> None:
        """An unparseable listen value is a config error naming the key."""
        stderr = io.StringIO()
        with mock.patch.object(sys, "stderr", stderr):
            with self.assertRaises(SystemExit):
                makeService(
                    _options("--config", self.ini, "--listen", "bogus:1"),
                    reactor=MemoryReactorClock(),
                )
        self.assertIn("listen: 'bogus:1' is not a server endpoint", stderr.getvalue())
        self.assertEqual(stderr.getvalue().count("\n"), 1)

    def test_command_line_paths_relative_to_cwd(self) -> None:
        """Without --config, paths on the command line are read from the cwd."""
        cwd = os.getcwd()
        os.chdir(self.directory)
        self.addCleanup(os.chdir, cwd)
        options = _options(
            "--tls-cert", "local-tls.pem", "--tls-key", "local-tls.key",
            "--root-cert", "factory_ca.pem", "--ca-cert", "est-ca.pem",
            "--ca-key", "est-ca.key", "--client-cas", "client-cas.pem",
        )  # fmt: skip
        top = makeService(options, reactor=MemoryReactorClock())
        config = top.est_config()  # type: ignore[attr-defined]
        self.assertEqual(config.listen, "tcp:8443")
        self.assertEqual(len(config.default.client_cas), 1)


class _FakeSite:
    def __init__(self) -> None:
        self.in_flight = 1
        self.draining = False
        self.waiter: defer.Deferred[None] = defer.Deferred()

    def drained(self) -> defer.Deferred[None]:
        return self.waiter

    def close_all(self) -> defer.Deferred[None]:
        return defer.succeed(None)


class ShutdownTests(SynchronousTestCase):
    """Stopping waits for requests in flight, then stops the signing threads."""

    def test_drain_waits_for_requests(self) -> None:
        """Stopping does not complete while a request is still being answered."""
        site = _FakeSite()
        drain = DrainService(site, Clock(), timeout=30)  # type: ignore[arg-type]
        drain.startService()
        stopped = drain.stopService()
        self.assertNoResult(stopped)
        site.waiter.callback(None)
        self.successResultOf(stopped)

    def test_drain_gives_up_after_timeout(self) -> None:
        """After the timeout, shutdown proceeds even if a request hangs."""
        site, clock = _FakeSite(), Clock()
        drain = DrainService(site, clock, timeout=30)  # type: ignore[arg-type]
        drain.startService()
        stopped = drain.stopService()
        clock.advance(29)
        self.assertNoResult(stopped)
        clock.advance(1)
        self.successResultOf(stopped)

    def test_children_stop_in_reverse_order_one_at_a_time(self) -> None:
        """The listener stops first, then the drain, then the thread pool."""
        events: list[str] = []
        gates: dict[str, defer.Deferred[None]] = {}

        class Child(service.Service):
            def __init__(self, name: str) -> None:
                self.name = name

            def stopService(self) -> defer.Deferred[None]:
                events.append(self.name)
                gates[self.name] = defer.Deferred()
                return gates[self.name]

        top = OrderedMultiService()
        for name in ("threads", "drain", "listener"):
            Child(name).setServiceParent(top)
        top.startService()
        stopped = top.stopService()
        self.assertEqual(events, ["listener"])
        gates["listener"].callback(None)
        self.assertEqual(events, ["listener", "drain"])
        gates["drain"].callback(None)
        gates["threads"].callback(None)
        self.assertEqual(events, ["listener", "drain", "threads"])
        self.successResultOf(stopped)
