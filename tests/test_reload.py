"""Configuration at run time, in memory: SIGHUP reloads, expiry warnings, JSON logs.

:class:`estd.reload.ConfigService` runs against a :class:`Clock`; the thread
that loads est.ini is replaced by :class:`Threads`, which runs the load only
when a test says so (as the reactor would, later).  Only one test sends a
real signal: SIGHUP to this process, with the service's handler installed
and the previous handler restored afterwards.
"""

from __future__ import annotations

import datetime
import io
import ipaddress
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL
from twisted.internet import defer
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogEvent, LogLevel, capturedLogs, formatEvent
from twisted.python import log as legacy_log
from twisted.python import logfile
from twisted.python.failure import Failure

from estd import reload as reload_module
from estd.config import Config, load_config
from estd.demo import Pair, make_pair
from estd.logs import json_event, json_observer, twistd_log_output
from estd.reload import ConfigHolder, ConfigService, expiring
from estd.tap import DrainService, build_service
from estd.tls import ServerTLS
from tests.pki import NOW, write_pki

DAY = datetime.timedelta(days=1)


# --- Test doubles -----------------------------------------------------------------


class Threads:
    """Stands in for ``deferToThread``: work runs when :meth:`run` is called."""

    def __init__(self) -> None:
        self.waiting: list[tuple[Callable[..., Any], tuple[Any, ...], defer.Deferred]]
        self.waiting = []
        self.started = 0

    def __call__(self, function: Callable[..., Any], *args: Any) -> defer.Deferred:
        """Queue ``function(*args)``; its Deferred fires on :meth:`run`."""
        self.started += 1
        waiting: defer.Deferred[Any] = defer.Deferred()
        self.waiting.append((function, args, waiting))
        return waiting

    def run(self) -> None:
        """Run every queued call, as the thread pool and the reactor would."""
        while self.waiting:
            function, args, waiting = self.waiting.pop(0)
            try:
                result = function(*args)
            except Exception:
                waiting.errback(Failure())
            else:
                waiting.callback(result)


class ThreadedClock(Clock):
    """A Clock that also queues ``callFromThread`` calls (as a signal handler makes)."""

    def __init__(self) -> None:
        super().__init__()
        self.from_thread: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []

    def callFromThread(self, function: Callable[..., Any], *args: Any) -> None:
        """Queue ``function(*args)`` for :meth:`run_from_thread`."""
        self.from_thread.append((function, args))

    def run_from_thread(self) -> None:
        """Run the queued calls, as the reactor loop would."""
        while self.from_thread:
            function, args = self.from_thread.pop(0)
            function(*args)


class MemoryReactor(MemoryReactorClock):
    """A memory reactor whose callFromThread runs the call at once."""

    def callFromThread(self, function, *args, **kwargs):  # type: ignore[no-untyped-def]
        function(*args, **kwargs)


def messages(events: list[LogEvent], level: LogLevel | None = None) -> list[str]:
    """The formatted estd log lines among ``events``, at ``level`` if given."""
    return [
        formatEvent(event)
        for event in events
        if event.get("log_namespace") == "estd"
        and (level is None or event.get("log_level") == level)
    ]


# --- Fixtures -----------------------------------------------------------------------


class Setup:
    """A demo est.ini, its loader, a holder and a ConfigService on a Clock."""

    def __init__(self, directory: Path, threads: Threads) -> None:
        self.directory = directory
        self.ini = Path(write_pki(str(directory)))
        self.clock = ThreadedClock()
        self.clock.advance(NOW.timestamp())
        self.loads = 0
        self.holder = ConfigHolder(self.load(NOW))
        self.threads = threads
        self.service = ConfigService(self.holder, self.load, self.clock)

    def load(self, now: datetime.datetime) -> Config:
        """load_config of est.ini, as makeService's loader does."""
        self.loads += 1
        return load_config(str(self.ini), {}, now)

    def edit(self, old: str, new: str) -> None:
        """Replace ``old`` by ``new`` in est.ini."""
        text = self.ini.read_text()
        assert old in text
        self.ini.write_text(text.replace(old, new))

    def reload(self) -> defer.Deferred[None]:
        """ConfigService.reload, with the load run to completion."""
        done = self.service.reload()
        self.threads.run()
        return done


@pytest.fixture
def threads(monkeypatch: pytest.MonkeyPatch) -> Threads:
    """deferToThread in estd.reload replaced by a queue the test runs."""
    queue = Threads()
    monkeypatch.setattr(reload_module, "deferToThread", queue)
    return queue


@pytest.fixture
def setup(tmp_path: Path, threads: Threads) -> Setup:
    """A demo configuration served by a holder, with a ConfigService on a Clock."""
    return Setup(tmp_path, threads)


def result_of(deferred: defer.Deferred[Any]) -> Any:
    """The result a Deferred has already fired with; fails if it has not."""
    results: list[Any] = []
    deferred.addBoth(results.append)
    assert results, "the Deferred has not fired"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


# --- Reloading ----------------------------------------------------------------------


def test_reload_swaps_the_snapshot_when_the_new_configuration_loads(
    setup: Setup,
) -> None:
    """A reload whose load succeeds puts the new snapshot in the holder."""
    old = setup.holder.config
    setup.edit("cert-duration = 26280h", "cert-duration = 2160h")
    with capturedLogs() as events:
        done = setup.reload()
    assert result_of(done) is None
    new = setup.holder()
    assert new is not old
    assert new.default.cert_duration == datetime.timedelta(hours=2160)
    assert old.default.cert_duration == datetime.timedelta(hours=26280)
    assert messages(events, LogLevel.info) == [
        "SIGHUP: reloading the configuration",
        f"configuration reloaded from {setup.ini}; EST CA "
        "OU=demo-factory,CN=fio-est-ca; labels: none",
    ]
    assert messages(events, LogLevel.warn) == []


@pytest.mark.parametrize(
    ("old", "new", "error"),
    [
        ("[est]\n", "[est]\ncolour = blue\n", "colour: unknown key"),
        (
            "ca-key = est-ca.key",
            "ca-key = device-ca.key",
            "ca-key: the private key does not belong to the CA certificate",
        ),
        ("tls-key = local-tls.key", "tls-key = gone.key", "tls-key: "),
    ],
    ids=["unknown-key", "ca-key-mismatch", "missing-file"],
)
def test_failed_reload_keeps_the_previous_snapshot_and_logs_key_and_file(
    setup: Setup, old: str, new: str, error: str
) -> None:
    """A reload that fails validation changes nothing and logs one error line."""
    previous = setup.holder.config
    setup.edit("cert-duration = 26280h", "cert-duration = 1h")
    setup.edit(old, new)
    with capturedLogs() as events:
        done = setup.reload()
    assert result_of(done) is None
    assert setup.holder() is previous
    assert previous.default.cert_duration == datetime.timedelta(hours=26280)
    [line] = messages(events, LogLevel.error)
    prefix = "reload failed, still serving the previous configuration: "
    assert line.startswith(f"{prefix}{setup.ini}: {error}"), line
    assert not any("reloaded" in text for text in messages(events))


def test_unexpected_load_error_is_logged_with_its_traceback(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A load that raises something else keeps the old snapshot; the log has why."""
    previous = setup.holder.config

    def broken(now: datetime.datetime) -> Config:
        raise OSError("disk on fire")

    monkeypatch.setattr(setup.service, "load", broken)
    with capturedLogs() as events:
        result_of(setup.reload())
    assert setup.holder() is previous
    [failure] = [event for event in events if "log_failure" in event]
    assert failure["log_level"] == LogLevel.critical
    assert formatEvent(failure) == (
        "reload failed, still serving the previous configuration"
    )
    assert "disk on fire" in json_event(failure)["traceback"]


def test_second_sighup_during_a_reload_is_ignored(setup: Setup) -> None:
    """A reload asked for while one runs loads nothing more; a later one does."""
    loads_before = setup.loads
    setup.edit("cert-duration = 26280h", "cert-duration = 48h")
    with capturedLogs() as events:
        first = setup.service.reload()
        second = setup.service.reload()
        assert second is first
        assert setup.threads.started == 1
        setup.threads.run()
    assert setup.loads == loads_before + 1
    assert "a reload is already running; SIGHUP ignored" in messages(events)
    assert setup.holder().default.cert_duration == datetime.timedelta(hours=48)
    setup.edit("cert-duration = 48h", "cert-duration = 72h")
    third = setup.reload()
    assert third is not first
    assert setup.loads == loads_before + 2
    assert setup.holder().default.cert_duration == datetime.timedelta(hours=72)


def test_restart_only_changes_are_warned_about(setup: Setup) -> None:
    """listen, threads, admin-listen and log-format changes say they need a restart."""
    setup.edit(
        "[est]\n",
        "[est]\nthreads = 9\nadmin-listen = tcp:19999\nlog-format = json\n",
    )
    setup.edit("listen = tcp:8443", "listen = tcp:18443")
    with capturedLogs() as events:
        setup.reload()
    assert messages(events, LogLevel.warn) == [
        "reload: listen, threads, admin-listen, log-format changed; "
        "those take effect after a restart"
    ]


def test_cpu_affinity_change_needs_a_restart(setup: Setup) -> None:
    """cpu-affinity is applied at start only; a reload that changes it says so."""
    setup.edit("[est]\n", "[est]\ncpu-affinity = auto\n")
    with capturedLogs() as events:
        setup.reload()
    assert messages(events, LogLevel.warn) == [
        "reload: cpu-affinity changed; those take effect after a restart"
    ]


def test_reload_without_restart_only_changes_warns_nothing(setup: Setup) -> None:
    """Changing only reloadable settings gives no restart warning."""
    setup.edit("response-profile = fioconfig", "response-profile = rfc7030")
    with capturedLogs() as events:
        setup.reload()
    assert messages(events, LogLevel.warn) == []
    assert setup.holder().default.response_profile.value == "rfc7030"


def test_changed_ledger_is_warned_about_by_its_est_ini_name(setup: Setup) -> None:
    """A changed ledger is warned about as 'ledger', the key operators write."""
    setup.edit("[est]\n", f"[est]\nledger = sqlite:///{setup.directory}/other.db\n")
    with capturedLogs() as events:
        setup.reload()
    assert messages(events, LogLevel.warn) == [
        "reload: ledger changed; those take effect after a restart"
    ]


def test_reloaded_shutdown_timeout_is_used_by_the_next_shutdown(
    setup: Setup,
) -> None:
    """After a reload to shutdown-timeout = 1s, a shutdown waits 1s, not 30s."""
    reactor = MemoryReactor()
    reactor.advance(NOW.timestamp())
    config = setup.holder.config
    assert config.shutdown_timeout == datetime.timedelta(seconds=30)
    previous_handler = signal.getsignal(signal.SIGHUP)
    top = build_service(
        config, reactor, TCP4ServerEndpoint(reactor, 0), None, setup.load
    )
    [service] = [child for child in top if isinstance(child, ConfigService)]
    [drain] = [child for child in top if isinstance(child, DrainService)]
    top.startService()
    try:
        setup.edit("[est]\n", "[est]\nshutdown-timeout = 1s\n")
        done = service.reload()
        setup.threads.run()
        result_of(done)
        assert service.holder().shutdown_timeout == datetime.timedelta(seconds=1)
        drain.site.request_started()  # one request in flight, never answered
        with capturedLogs() as events:
            stopped = top.stopService()
            reactor.advance(1.5)
        assert "shutdown timeout: requests in flight abandoned" in messages(events)
        result_of(stopped)
    finally:
        reactor.advance(60)
        signal.signal(signal.SIGHUP, previous_handler)


def test_sighup_to_this_process_reloads_and_stop_restores_the_handler(
    setup: Setup,
) -> None:
    """A real SIGHUP reaches the installed handler; stopping puts the old one back."""
    previous = signal.getsignal(signal.SIGHUP)
    setup.edit("cert-duration = 26280h", "cert-duration = 24h")
    try:
        setup.service.startService()
        installed = signal.getsignal(signal.SIGHUP)
        assert installed == setup.service._on_sighup
        os.kill(os.getpid(), signal.SIGHUP)
        deadline = time.monotonic() + 5
        while not setup.clock.from_thread and time.monotonic() < deadline:
            time.sleep(0.001)  # a bounded poll for Python's signal delivery
        assert setup.clock.from_thread, "the SIGHUP handler did not run"
        assert setup.holder().default.cert_duration != DAY  # not before the loop
        setup.clock.run_from_thread()
        setup.threads.run()
        assert setup.holder().default.cert_duration == DAY
        setup.service.stopService()
        assert signal.getsignal(signal.SIGHUP) == previous
    finally:
        signal.signal(signal.SIGHUP, previous)


# --- TLS follows the holder ---------------------------------------------------------


def _new_tls_pair(setup: Setup) -> Pair:
    """A new localhost TLS pair from the demo root, written over local-tls.*."""
    root = Pair(
        x509.load_pem_x509_certificate(
            (setup.directory / "factory_ca.pem").read_bytes()
        ),
        serialization.load_pem_private_key(  # type: ignore[arg-type]
            (setup.directory / "factory_ca.key").read_bytes(), None
        ),
    )
    pair = make_pair(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]),
        root,
        ca=False,
        now=NOW,
        days=90,
        extended_usage=[ExtendedKeyUsageOID.SERVER_AUTH],
        alt_names=[
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        ],
    )
    (setup.directory / "local-tls.pem").write_bytes(pair.cert_pem())
    (setup.directory / "local-tls.key").write_bytes(pair.key_pem())
    return pair


def _served(connection: SSL.Connection) -> x509.Certificate:
    certificate = connection.get_certificate()
    assert certificate is not None
    return certificate.to_cryptography()


def test_server_tls_builds_a_new_context_after_the_holder_swaps(
    setup: Setup,
) -> None:
    """New connections get the reloaded certificate; earlier ones keep theirs."""
    tls = ServerTLS(setup.holder)
    old_certificate = setup.holder().tls_certificates[0]
    first = tls.context()
    assert tls.context() is first  # built once per snapshot
    established = tls.serverConnectionForTLS(None)
    pair = _new_tls_pair(setup)
    result_of(setup.reload())
    second = tls.context()
    assert second is not first
    assert tls.context() is second
    fresh = tls.serverConnectionForTLS(None)
    assert _served(fresh) == pair.certificate
    assert _served(established) == old_certificate
    assert established.get_context() is first


# --- Expiry warnings ----------------------------------------------------------------

EXPIRY_INI = """\
[est]
listen = tcp:8443
tls-cert = tls.pem
tls-key = tls.key
root-cert = root-near.pem
ca-cert = ca-near.pem
ca-key = ca-near.key
client-cas = device-ca.pem

[label same]

[label other]
ca-cert = ca-other.pem
ca-key = ca-other.key

[label far]
root-cert = root-far.pem
ca-cert = ca-far.pem
ca-key = ca-far.key
"""


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(directory: Path, stem: str, pair: Pair) -> None:
    (directory / f"{stem}.pem").write_bytes(pair.cert_pem())
    (directory / f"{stem}.key").write_bytes(pair.key_pem())


def _expiry_pki(directory: Path) -> dict[str, x509.Certificate]:
    """Certificates 5-20 days from expiry (near) and years away (far), with est.ini.

    Labels ``same`` (inheriting every certificate), ``other`` (its own near
    EST CA) and ``far`` (its own far root and EST CA).
    """
    directory.mkdir(parents=True, exist_ok=True)
    start = NOW - DAY

    def pair(name: str, issuer: Pair | None, days: int, **kw: Any) -> Pair:
        return make_pair(
            _name(name), issuer, now=NOW, days=days, not_before=start, **kw
        )

    root_near = pair("root-near", None, 21, ca=True)
    root_far = pair("root-far", None, 3650, ca=True)
    made = {
        "root-near": root_near,
        "root-far": root_far,
        "ca-near": pair("ca-near", root_near, 11, ca=True),
        "ca-other": pair("ca-other", root_near, 16, ca=True),
        "ca-far": pair("ca-far", root_far, 1000, ca=True),
        "device-ca": pair("device-ca", root_far, 1000, ca=True),
        "tls": pair(
            "localhost",
            root_near,
            6,
            ca=False,
            extended_usage=[ExtendedKeyUsageOID.SERVER_AUTH],
            alt_names=[x509.DNSName("localhost")],
        ),
    }
    for stem, each in made.items():
        _write(directory, stem, each)
    (directory / "est.ini").write_text(EXPIRY_INI)
    return {stem: each.certificate for stem, each in made.items()}


def test_expiry_warnings_name_each_near_certificate_once(tmp_path: Path) -> None:
    """TLS, each EST CA and each root within 30 days are warned about once each."""
    certificates = _expiry_pki(tmp_path)
    config = load_config(str(tmp_path / "est.ini"), {}, NOW)
    clock = Clock()
    clock.advance(NOW.timestamp())
    service = ConfigService(ConfigHolder(config), None, clock)
    with capturedLogs() as events:
        service.warn_expiring()
    subjects = {stem: c.subject.rfc4514_string() for stem, c in certificates.items()}

    def line(what: str, stem: str, days: int) -> str:
        not_after = certificates[stem].not_valid_after_utc.strftime("%Y-%m-%d")
        return f"{what} {subjects[stem]} expires on {not_after} ({days} days)"

    assert messages(events, LogLevel.warn) == [
        line("TLS certificate (tls-cert)", "tls", 5),
        line("EST CA (ca-cert)", "ca-near", 10),
        line("root (root-cert)", "root-near", 20),
        line("EST CA of label other (ca-cert)", "ca-other", 15),
    ]
    assert [what for what, _ in expiring(config, NOW + 4000 * DAY)] == [
        "TLS certificate (tls-cert)",
        "EST CA (ca-cert)",
        "root (root-cert)",
        "EST CA of label far (ca-cert)",
        "root of label far (root-cert)",
        "EST CA of label other (ca-cert)",
    ]


def test_far_certificates_give_no_expiry_warning(setup: Setup) -> None:
    """The demo PKI (years of validity) gives no expiry warning at all."""
    with capturedLogs() as events:
        setup.service.warn_expiring()
    assert messages(events) == []
    assert list(expiring(setup.holder(), NOW + 31 * DAY)) == []


def test_expiry_warning_repeats_daily_and_after_each_reload(
    tmp_path: Path, threads: Threads
) -> None:
    """The warning comes at start, every 24 hours and after every reload."""
    _expiry_pki(tmp_path)
    ini = str(tmp_path / "est.ini")
    clock = Clock()
    clock.advance(NOW.timestamp())
    holder = ConfigHolder(load_config(ini, {}, NOW))
    service = ConfigService(holder, None, clock)
    tls_line = "TLS certificate (tls-cert) CN=localhost expires on"
    with capturedLogs() as events:
        service.startService()
        try:
            assert sum(tls_line in m for m in messages(events, LogLevel.warn)) == 1
            clock.advance(86399)
            assert sum(tls_line in m for m in messages(events, LogLevel.warn)) == 1
            clock.advance(1)
            lines = [m for m in messages(events, LogLevel.warn) if tls_line in m]
            assert len(lines) == 2
            assert lines[1].endswith("(4 days)")
            service.load = lambda now: load_config(ini, {}, now)
            service.reload()
            threads.run()
            assert sum(tls_line in m for m in messages(events, LogLevel.warn)) == 3
        finally:
            service.stopService()
    assert not clock.getDelayedCalls()


# --- JSON logs ----------------------------------------------------------------------

REQUEST_FIELDS = {
    "client_address": "127.0.0.1",
    "method": "POST",
    "path": "/.well-known/est/simplereenroll",
    "status": 201,
    "bytes": 740,
    "duration_ms": 4.6,
    "client_subject": "OU=demo-factory,CN=dev-1",
    "client_serial": "0A1B",
    "issued_serial": "7C0C",
    "issued_not_after": "2029-11-25T21:36:05Z",
    "client_gone": False,
}
REQUEST_FORMAT = (
    '{client_address} "{method} {path}" {status} {bytes}B {duration_ms}ms'
    ' client="{client_subject}" client_serial={client_serial}'
    " issued_serial={issued_serial} not_after={issued_not_after}"
)


def _emitted(emit: Callable[[], None]) -> list[LogEvent]:
    with capturedLogs() as events:
        emit()
    return list(events)


def test_json_event_of_a_request_line(tmp_path: Path) -> None:
    """A request line becomes time, level, namespace, message and its own fields."""
    from twisted.logger import Logger

    log = Logger(namespace="estd")
    [event] = _emitted(lambda: log.info(REQUEST_FORMAT, **REQUEST_FIELDS))
    event["log_time"] = 1700000000.25
    out = json_event(event)
    assert out == {
        "time": "2023-11-14T22:13:20.250Z",
        "level": "info",
        "namespace": "estd",
        "message": '127.0.0.1 "POST /.well-known/est/simplereenroll" 201 740B 4.6ms'
        ' client="OU=demo-factory,CN=dev-1" client_serial=0A1B'
        " issued_serial=7C0C not_after=2029-11-25T21:36:05Z",
        **REQUEST_FIELDS,
    }
    assert list(out)[:4] == ["time", "level", "namespace", "message"]
    assert json.loads(json.dumps(out)) == out


def test_json_event_keeps_only_plain_values_and_its_own_names() -> None:
    """Fields that are not str/int/float/bool/None, or clash, are left out."""
    from twisted.logger import Logger

    log = Logger(namespace="estd")
    [event] = _emitted(
        lambda: log.warn(
            "plain {text}",
            text="words",
            blob=b"\x00bytes",
            thing=object(),
            nothing=None,
            ratio=0.5,
            flag=True,
            time="not the time",
            message="not the message",
            system="not kept",
        )
    )
    out = json_event(event)
    assert out["message"] == "plain words"
    assert out["level"] == "warn"
    assert out["time"] != "not the time"
    assert {key: out[key] for key in list(out)[4:]} == {
        "text": "words",
        "nothing": None,
        "ratio": 0.5,
        "flag": True,
    }


def test_json_event_of_a_failure_has_the_traceback() -> None:
    """log.failure gives level critical and a traceback field naming the error."""
    from twisted.logger import Logger

    log = Logger(namespace="estd")

    def fail() -> None:
        try:
            raise ZeroDivisionError("no signing today")
        except ZeroDivisionError:
            log.failure("cannot sign for {client_address}", client_address="10.0.0.7")

    [event] = _emitted(fail)
    out = json_event(event)
    assert out["level"] == "critical"
    assert out["message"] == "cannot sign for 10.0.0.7"
    assert out["client_address"] == "10.0.0.7"
    assert out["traceback"].startswith("Traceback (most recent call last):")
    assert "ZeroDivisionError: no signing today" in out["traceback"]
    assert "failure" not in out and "log_failure" not in out


def test_json_event_of_plain_legacy_strings() -> None:
    """twisted.python.log.msg strings (even with braces) are the message as is."""
    events = _emitted(
        lambda: (legacy_log.msg("EstSite starting on 8443"), legacy_log.msg("a {b}"))
    )
    outs = [json_event(event) for event in events]
    assert [(o["level"], o["namespace"], o["message"]) for o in outs] == [
        ("info", "log_legacy", "EstSite starting on 8443"),
        ("info", "log_legacy", "a {b}"),
    ]
    assert all(set(o) == {"time", "level", "namespace", "message"} for o in outs)


def test_json_event_of_a_legacy_error_has_the_traceback() -> None:
    """A twisted.python.log.err error also gets the documented traceback field."""

    def fail() -> None:
        try:
            raise KeyError("lost")
        except KeyError:
            legacy_log.err(None, "legacy trouble")

    [event] = _emitted(fail)
    out = json_event(event)
    assert out["level"] == "critical"
    assert "KeyError" in out["traceback"]


def test_json_observer_writes_one_object_per_line() -> None:
    """The observer writes each event as one JSON line, multi-line text escaped."""
    output = io.StringIO()
    observer = json_observer(output)
    from twisted.logger import Logger

    log = Logger(namespace="estd", observer=observer)
    log.info("one")
    log.info("two\nlines {n}", n=2)
    lines = output.getvalue().splitlines()
    assert [json.loads(line)["message"] for line in lines] == ["one", "two\nlines 2"]


# --- Where twistd logs --------------------------------------------------------------


@pytest.fixture
def opened() -> Iterator[list[logfile.LogFile]]:
    """LogFiles a test opened, closed afterwards."""
    files: list[logfile.LogFile] = []
    yield files
    for each in files:
        each.close()


def test_twistd_log_output_in_the_foreground_is_stdout() -> None:
    """``twistd -n est`` logs to standard output."""
    argv = ["twistd", "-n", "est", "--config", "est.ini"]
    assert twistd_log_output(argv) is sys.stdout


def test_twistd_log_output_with_logfile_is_that_file(
    tmp_path: Path, opened: list[logfile.LogFile]
) -> None:
    """``twistd --logfile X est`` logs to a rotating LogFile at X."""
    path = tmp_path / "estd.log"
    output = twistd_log_output(["twistd", "--logfile", str(path), "est"])
    assert isinstance(output, logfile.LogFile)
    opened.append(output)
    assert Path(output.path) == path
    output.write("line\n")
    output.flush()
    assert path.read_text() == "line\n"


def test_twistd_log_output_foreground_logfile_dash_is_stdout() -> None:
    """``twistd -n --logfile - est`` logs to standard output."""
    argv = ["twistd", "-n", "--logfile", "-", "est", "--config", "est.ini"]
    assert twistd_log_output(argv) is sys.stdout


def test_twistd_log_output_foreground_with_a_logfile_is_that_file(
    tmp_path: Path, opened: list[logfile.LogFile]
) -> None:
    """``twistd -n --logfile X est``: the file wins over standard output."""
    path = tmp_path / "fg.log"
    output = twistd_log_output(["twistd", "-n", "--logfile", str(path), "est"])
    assert isinstance(output, logfile.LogFile)
    opened.append(output)
    assert Path(output.path) == path
