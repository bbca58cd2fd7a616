"""End to end: operating a real ``twistd est`` — reloads, shutdown, JSON logs, probes.

Each test writes its own demo PKI and starts its own server on free loopback
ports (EST and admin), because most of them reload, break or stop it.  A
request is kept in flight deterministically by holding the SQLite ledger's
write lock from the test: estd has the whole request, signs, and then waits
to record the certificate (a slow database) until the test lets go.  Every
server, client thread and lock is released in ``finally``; waiting is always
a bounded poll on a condition.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import datetime
import functools
import ipaddress
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from estd.ca import BACKDATE
from estd.client import EstClient
from estd.csrs import build_csr, make_key
from estd.demo import Pair, make_pair, write_demo
from tests.e2e_support import (
    EstServer,
    HttpResponse,
    fioconfig_csr,
    free_port,
    http_get,
    kill_pid,
    metric_value,
    poll,
    process_gone,
    reenroll,
    run,
    served_certificate,
    twistd_command,
)

CREATED = b"HTTP/1.1 201 Created"
OLD_DURATION = datetime.timedelta(hours=26280)
"""cert-duration of the demo est.ini."""
NEW_DURATION = datetime.timedelta(hours=2160)
REQUEST_FIELDS = {
    "time",
    "level",
    "namespace",
    "message",
    "client_address",
    "method",
    "path",
    "status",
    "bytes",
    "duration_ms",
    "client_subject",
    "client_serial",
    "issued_serial",
    "issued_not_after",
    "client_gone",
}
"""README 'JSON logs': the fields of a request line (no user: not Basic auth)."""


# --- The deployment -------------------------------------------------------------------


@dataclass
class Deployment:
    """A demo PKI, its est.ini and the server started on it."""

    pki: Path
    server: EstServer
    admin_port: int
    scratch: Path

    @property
    def ini(self) -> Path:
        """est.ini of the demo PKI."""
        return self.pki / "est.ini"

    @property
    def pidfile(self) -> Path:
        """The pidfile twistd writes (``--pidfile``)."""
        return self.server.workdir / "twistd.pid"

    @property
    def process(self) -> subprocess.Popen[bytes]:
        """The twistd process."""
        assert self.server.process is not None
        return self.server.process

    def admin(self, path: str) -> tuple[int, bytes, str]:
        """GET ``path`` from the admin listener."""
        return http_get(f"http://127.0.0.1:{self.admin_port}{path}")

    def metric(self, name: str) -> float | None:
        """One unlabelled sample of the admin /metrics."""
        status, body, _ = self.admin("/metrics")
        assert status == 200
        return metric_value(body.decode(), name)

    def edit_ini(self, old: str, new: str) -> None:
        """Replace ``old`` by ``new`` in est.ini (atomically, as an editor would)."""
        text = self.ini.read_text()
        assert old in text, f"{old!r} not in est.ini"
        replace_file(self.ini, text.replace(old, new).encode())

    def renew(self, name: str) -> tuple[HttpResponse, str]:
        """Renew device.pem with curl; the response and the CSR body posted."""
        work = self.scratch / name
        csr = fioconfig_csr(self.pki / "device.pem", work, name)
        response = reenroll(
            self.server,
            self.pki,
            self.pki / "device.pem",
            self.pki / "device.key",
            csr.body,
            work,
        )
        return response, csr.body.decode()

    @property
    def pid(self) -> int:
        """The twistd process id: our child's, or a daemon's from its pidfile."""
        if self.server.process is not None:
            return self.server.process.pid
        text = poll(
            lambda: self.pidfile.exists() and self.pidfile.read_text().strip(),
            "the pidfile",
        )
        return int(text)

    def signal(self, number: int) -> None:
        """Send signal ``number`` to the twistd process."""
        os.kill(self.pid, number)


def replace_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a rename, so no reader sees half a file."""
    partial = path.with_name(path.name + ".new")
    partial.write_bytes(data)
    os.replace(partial, path)


@contextlib.contextmanager
def deployment(
    tmp_path: Path, *est_args: str, admin: bool = True
) -> Iterator[Deployment]:
    """A fresh demo PKI and ``twistd -n est`` on it; always stopped afterwards."""
    port, admin_port = free_port(), free_port() if admin else 0
    pki = tmp_path / "pki"
    write_demo(str(pki), datetime.datetime.now(datetime.UTC), devices=1, port=port)
    server = EstServer(
        tmp_path / "server", port, ["--config", str(pki / "est.ini"), *est_args]
    )
    if admin:
        server.admin_listen = f"tcp:{admin_port}:interface=127.0.0.1"
    try:
        server.start()
        server.wait_until_listening()
        # Logged once the reactor runs, so its SIGTERM/SIGHUP handlers are in
        # place ("starting on" comes before: a signal then kills twistd).
        poll(lambda: "serving EST on" in server.log_text(), "estd to run")
        yield Deployment(pki, server, admin_port, tmp_path / "work")
    finally:
        server.stop()


def issued_certificate(response: HttpResponse) -> x509.Certificate:
    """The first certificate of an enrollment response."""
    assert response.status_line == CREATED, response
    return pkcs7.load_der_pkcs7_certificates(base64.b64decode(response.body))[0]


def validity(certificate: x509.Certificate) -> datetime.timedelta:
    """The cert-duration a certificate was issued with (estd backdates notBefore)."""
    return certificate.not_valid_after_utc - certificate.not_valid_before_utc - BACKDATE


def hex_serial(certificate: x509.Certificate) -> str:
    """The serial as estd logs it (upper-case hex, even length)."""
    text = format(certificate.serial_number, "X")
    return "0" + text if len(text) % 2 else text


@contextlib.contextmanager
def ledger_writes_held(deployed: Deployment) -> Iterator[None]:
    """Hold the SQLite ledger's write lock: estd reads on, but waits to record.

    SQLite's busy timeout in estd is 10 s; every test lets go well before.
    """
    holder = sqlite3.connect(deployed.pki / "estd.sqlite3", isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        yield
    finally:
        holder.execute("ROLLBACK")
        holder.close()


@contextlib.contextmanager
def renewal_in_flight(
    deployed: Deployment,
) -> Iterator[concurrent.futures.Future[tuple[HttpResponse, str]]]:
    """A curl renewal that estd holds, signed but unrecorded, until the block ends.

    Yields once the request is in a signing thread (admin /metrics says so);
    the future gives the response after the block.
    """
    # The ledger's startup work (expiring pending requests) must not be the
    # busy thread this waits for.
    poll(
        lambda: deployed.metric("estd_threadpool_busy_threads") == 0,
        "an idle signing thread pool",
    )
    executor = concurrent.futures.ThreadPoolExecutor(1)
    try:
        with ledger_writes_held(deployed):
            future = executor.submit(deployed.renew, "in-flight")
            poll(
                lambda: deployed.metric("estd_threadpool_busy_threads") == 1,
                "the renewal to be in a signing thread",
            )
            yield future
    finally:
        executor.shutdown(wait=True)  # curl gives up after --max-time 10


def ledger_serials(deployed: Deployment) -> set[str]:
    """Serials ``estctl certs list --config est.ini --json`` reports."""
    done = run(
        [sys.executable, "-m", "estd.estctl", "certs", "list", "--config",
         str(deployed.ini), "--json"]
    )  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()
    return {row["serial"] for row in json.loads(done.stdout)}


# --- Reload under load ----------------------------------------------------------------


@dataclass
class Outcome:
    """One renewal of the client loop: when it started and what it got."""

    started: float
    finished: float = 0.0
    certificate: x509.Certificate | None = None
    error: str | None = None


class RenewalLoop:
    """A device renewing over and over in a thread, with estctl's EstClient."""

    def __init__(self, deployed: Deployment) -> None:
        self.client = EstClient(
            f"https://localhost:{deployed.server.port}/.well-known/est",
            cacert=str(deployed.pki / "factory_ca.pem"),
            cert=str(deployed.pki / "device.pem"),
            key=str(deployed.pki / "device.key"),
            timeout=10,
        )
        device = x509.load_pem_x509_certificate(
            (deployed.pki / "device.pem").read_bytes()
        )
        self.subject = device.subject
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="renewal-loop")

    def _run(self) -> None:
        while not self._stop.is_set():
            outcome = Outcome(time.monotonic())
            key = make_key("ec-p256")
            try:
                outcome.certificate = self.client.simplereenroll(
                    functools.partial(self._csr, key)
                )
            except Exception as error:
                outcome.error = f"{type(error).__name__}: {error}"
            outcome.finished = time.monotonic()
            self.outcomes.append(outcome)

    def _csr(self, key: Any, channel_binding: bytes | None) -> bytes:
        return build_csr(key, self.subject)

    def __enter__(self) -> RenewalLoop:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=15)
        assert not self._thread.is_alive(), "the renewal loop did not stop"

    def done_since(self, moment: float) -> list[Outcome]:
        """Renewals that started after ``moment`` and have finished."""
        return [each for each in list(self.outcomes) if each.started > moment]


def durations(outcomes: list[Outcome]) -> set[datetime.timedelta]:
    """The distinct cert-durations of the certificates these renewals got."""
    found = set()
    for each in outcomes:
        assert each.certificate is not None, each.error
        found.add(validity(each.certificate))
    return found


def new_tls_pair(pki: Path) -> Pair:
    """A new localhost server certificate from the factory root of the demo files."""
    root_key = serialization.load_pem_private_key(
        (pki / "factory_ca.key").read_bytes(), None
    )
    assert isinstance(root_key, ec.EllipticCurvePrivateKey)
    root = Pair(
        x509.load_pem_x509_certificate((pki / "factory_ca.pem").read_bytes()),
        root_key,
    )
    return make_pair(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]),
        root,
        ca=False,
        now=datetime.datetime.now(datetime.UTC),
        days=90,
        extended_usage=[ExtendedKeyUsageOID.SERVER_AUTH],
        alt_names=[
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        ],
    )


def test_reload_under_load_serves_the_new_certificate_without_a_failure(
    tmp_path: Path,
) -> None:
    """Rotating the TLS pair and cert-duration with estctl reload fails no renewal."""
    with deployment(tmp_path, admin=False) as deployed:
        port = deployed.server.port
        old_der = served_certificate(port)
        assert old_der == x509.load_pem_x509_certificate(
            (deployed.pki / "local-tls.pem").read_bytes()
        ).public_bytes(serialization.Encoding.DER)
        new = new_tls_pair(deployed.pki)
        new_der = new.certificate.public_bytes(serialization.Encoding.DER)
        with RenewalLoop(deployed) as loop:
            poll(lambda: len(loop.done_since(0)) >= 3, "three renewals", timeout=15)
            replace_file(deployed.pki / "local-tls.key", new.key_pem())
            replace_file(deployed.pki / "local-tls.pem", new.cert_pem())
            deployed.edit_ini("cert-duration = 26280h", "cert-duration = 2160h")
            sent = time.monotonic()
            done = run(
                [sys.executable, "-m", "estd.estctl", "reload",
                 "--pidfile", str(deployed.pidfile)]
            )  # fmt: skip
            assert done.returncode == 0, done.stderr.decode()
            assert b"sent SIGHUP to estd" in done.stdout
            poll(
                lambda: served_certificate(port) == new_der,
                "the new TLS certificate to be served",
                timeout=10,
            )
            switched = time.monotonic()
            poll(
                lambda: len(loop.done_since(switched)) >= 3,
                "three renewals after the switch",
                timeout=15,
            )
        failures = [each.error for each in loop.outcomes if each.error is not None]
        assert failures == []
        before = [each for each in loop.outcomes if each.finished < sent]
        after = loop.done_since(switched)
        assert len(before) >= 3 and len(after) >= 3
        assert durations(before) == {OLD_DURATION}
        assert durations(after) == {NEW_DURATION}
        log = deployed.server.log_text()
        assert f"configuration reloaded from {deployed.ini}" in log
        assert "reload failed" not in log


def test_failed_reload_keeps_serving_the_previous_configuration(
    tmp_path: Path,
) -> None:
    """A broken est.ini on SIGHUP is logged with key and file; renewals go on."""
    with deployment(tmp_path, admin=False) as deployed:
        tls_before = served_certificate(deployed.server.port)
        original = deployed.ini.read_text()
        prefix = "reload failed, still serving the previous configuration: "
        broken = {
            "unknown key": (
                ("[est]\n", "[est]\ncolour = blue\n"),
                f"{prefix}{deployed.ini}: colour: unknown key",
            ),
            "ca-key mismatch": (
                ("ca-key = est-ca.key", "ca-key = device-ca.key"),
                f"{prefix}{deployed.ini}: ca-key: the private key does not belong "
                f"to the CA certificate ({deployed.pki / 'est-ca.pem'})",
            ),
        }
        for number, (name, ((old, new), line)) in enumerate(broken.items()):
            replace_file(deployed.ini, original.encode())
            deployed.edit_ini("cert-duration = 26280h", "cert-duration = 1h")
            deployed.edit_ini(old, new)
            deployed.signal(signal.SIGHUP)
            poll(
                lambda line=line: line in deployed.server.log_text(),
                f"the failed reload ({name}) to be logged",
            )
            response, _ = deployed.renew(f"after-failure-{number}")
            assert validity(issued_certificate(response)) == OLD_DURATION
            assert served_certificate(deployed.server.port) == tls_before
        assert "configuration reloaded" not in deployed.server.log_text()
        # The next good reload still works.
        replace_file(deployed.ini, original.encode())
        deployed.edit_ini("cert-duration = 26280h", "cert-duration = 48h")
        deployed.signal(signal.SIGHUP)
        poll(
            lambda: "configuration reloaded" in deployed.server.log_text(),
            "the good reload",
        )
        response, _ = deployed.renew("after-good-reload")
        assert validity(issued_certificate(response)) == datetime.timedelta(hours=48)


# --- Graceful shutdown ----------------------------------------------------------------


def _stop_during_renewal(
    deployed: Deployment,
) -> tuple[concurrent.futures.Future[tuple[HttpResponse, str]], float]:
    """SIGTERM while a renewal is held in a signing thread; release it once estd
    says it waits.  The renewal's future and when SIGTERM was sent."""
    with renewal_in_flight(deployed) as future:
        stopping = time.monotonic()
        deployed.signal(signal.SIGTERM)
        poll(
            lambda: (
                "waiting up to 10.0s for 1 request(s) in flight"
                in deployed.server.log_text()
            ),
            "estd to wait for the request in flight",
        )
        assert deployed.process.poll() is None
        assert not future.done()
    concurrent.futures.wait([future], timeout=15)
    return future, stopping


def test_sigterm_waits_for_the_request_in_flight_and_records_it(
    tmp_path: Path,
) -> None:
    """SIGTERM during a renewal: estd finishes and records it, then exits cleanly."""
    with deployment(tmp_path, "--shutdown-timeout", "10s") as deployed:
        _, stopping = _stop_during_renewal(deployed)
        returncode = deployed.process.wait(timeout=15)
        assert time.monotonic() - stopping < 10
        assert returncode == 0
        assert not deployed.pidfile.exists()
        log = deployed.server.log_text()
        [line] = [each for each in log.splitlines() if "issued_serial=" in each]
        assert '"POST /.well-known/est/simplereenroll" 201 ' in line
        serial = line.split("issued_serial=")[1].split()[0]
        assert serial in ledger_serials(deployed)
        assert "shutdown timeout" not in log


def test_request_in_flight_at_sigterm_gets_its_certificate(tmp_path: Path) -> None:
    """The client whose renewal was in flight at SIGTERM receives its 201."""
    with deployment(tmp_path, "--shutdown-timeout", "10s") as deployed:
        future, _ = _stop_during_renewal(deployed)
        deployed.process.wait(timeout=15)
        response, _ = future.result()
        certificate = issued_certificate(response)
        assert hex_serial(certificate) in ledger_serials(deployed)


def test_readyz_is_503_shutting_down_while_draining(tmp_path: Path) -> None:
    """/readyz says ready before SIGTERM and 503 'shutting down' during the drain."""
    with deployment(tmp_path, "--shutdown-timeout", "10s") as deployed:
        assert deployed.admin("/readyz") == (
            200,
            b'{"status": "ready"}\n',
            "application/json",
        )
        with renewal_in_flight(deployed):
            assert deployed.admin("/readyz")[0] == 200
            deployed.signal(signal.SIGTERM)
            _, body, content_type = poll(
                lambda: (answer := deployed.admin("/readyz"))[0] == 503 and answer,
                "/readyz to answer 503",
            )
            assert content_type == "application/json"
            assert json.loads(body) == {
                "status": "not ready",
                "reason": "shutting down",
            }
            assert deployed.admin("/healthz")[0] == 200
            assert deployed.process.poll() is None
        assert deployed.process.wait(timeout=15) == 0


def test_shutdown_timeout_bounds_the_wait_for_a_slow_request(tmp_path: Path) -> None:
    """With shutdown-timeout = 1s and a longer request, estd exits after about 1s."""
    with deployment(tmp_path, "--shutdown-timeout", "1s") as deployed:
        with renewal_in_flight(deployed):
            stopping = time.monotonic()
            deployed.signal(signal.SIGTERM)
            poll(
                lambda: (
                    "shutdown timeout: requests in flight abandoned"
                    in deployed.server.log_text()
                ),
                "the shutdown timeout",
            )
            assert time.monotonic() - stopping >= 1.0
            try:
                returncode = deployed.process.wait(timeout=3)
            except subprocess.TimeoutExpired:
                pytest.fail("estd still runs 3s after its shutdown timeout")
        assert returncode == 0
        assert not deployed.pidfile.exists()


def test_request_abandoned_at_shutdown_timeout_does_not_crash_estd(
    tmp_path: Path,
) -> None:
    """A request still recording after shutdown-timeout ends cleanly, not in a crash."""
    with deployment(tmp_path, "--shutdown-timeout", "1s") as deployed:
        with renewal_in_flight(deployed):
            deployed.signal(signal.SIGTERM)
            poll(
                lambda: (
                    "shutdown timeout: requests in flight abandoned"
                    in deployed.server.log_text()
                ),
                "the shutdown timeout",
            )
        returncode = deployed.process.wait(timeout=15)
        assert returncode == 0, f"twistd ended with {returncode}"
        assert not deployed.pidfile.exists()


def test_sigterm_exit_status_is_0(tmp_path: Path) -> None:
    """An idle estd stopped with SIGTERM exits with status 0 and removes its pidfile."""
    # twistd alone re-raises SIGTERM after the stop: status -15, not 0.
    with deployment(tmp_path, admin=False) as deployed:
        deployed.signal(signal.SIGTERM)
        returncode = deployed.process.wait(timeout=10)
        assert not deployed.pidfile.exists()
        assert returncode == 0


# --- JSON logs ------------------------------------------------------------------------


def _json_log_traffic(deployed: Deployment) -> tuple[x509.Certificate, list[str]]:
    """A renewal, a failed handshake and a reload; the certificate and CSR bodies."""
    response, body = deployed.renew("json")
    certificate = issued_certificate(response)
    with socket.create_connection(("127.0.0.1", deployed.server.port), timeout=5):
        pass  # closed before any TLS: a handshake failure line
    poll(
        lambda: "tls_failure" in deployed.server.log_text(),
        "the handshake failure line",
    )
    deployed.signal(signal.SIGHUP)
    poll(
        lambda: "configuration reloaded" in deployed.server.log_text(),
        "the reload line",
    )
    return certificate, [body]


def _check_json_log(
    text: str, certificate: x509.Certificate, bodies: list[str], pki: Path
) -> None:
    lines = text.splitlines()
    assert lines, "the log is empty"
    objects = []
    for line in lines:
        try:
            objects.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"not a JSON line: {line!r}")
    for each in objects:
        assert isinstance(each, dict)
        assert {"time", "level", "namespace", "message"} <= set(each), each
        assert each["time"].endswith("Z")
    requests = [each for each in objects if "method" in each]
    assert len(requests) == 1, requests
    [request] = requests
    assert set(request) == REQUEST_FIELDS
    device = x509.load_pem_x509_certificate((pki / "device.pem").read_bytes())
    assert request["level"] == "info"
    assert request["namespace"] == "estd"
    assert request["client_address"] == "127.0.0.1"
    assert request["method"] == "POST"
    assert request["path"] == "/.well-known/est/simplereenroll"
    assert request["status"] == 201
    assert request["bytes"] > 0
    assert isinstance(request["duration_ms"], int | float)
    assert request["client_subject"] == device.subject.rfc4514_string()
    assert request["client_serial"] == hex_serial(device)
    assert request["issued_serial"] == hex_serial(certificate)
    assert request["issued_not_after"] == (
        certificate.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
    )
    assert request["client_gone"] is False
    [handshake] = [each for each in objects if "tls_failure" in each]
    assert handshake["level"] == "warn"
    assert handshake["client_address"] == "127.0.0.1"
    assert any(each["message"].startswith("configuration reloaded") for each in objects)
    assert "PRIVATE KEY" not in text
    for body in bodies:
        assert body[16:56] not in text


def test_json_logs_of_a_daemon_with_a_logfile(tmp_path: Path) -> None:
    """Daemonised with --logfile and --log-format json, every log line is JSON."""
    port = free_port()
    pki = tmp_path / "pki"
    write_demo(str(pki), datetime.datetime.now(datetime.UTC), devices=1, port=port)
    daemon = EstServer(tmp_path / "daemon", port, [])
    daemon.workdir.mkdir()
    deployed = Deployment(pki, daemon, 0, tmp_path / "work")
    pid: int | None = None
    try:
        started = run(
            [*twistd_command(), "--pidfile", str(deployed.pidfile),
             "--logfile", str(daemon.log_path), "est", "--config", str(deployed.ini),
             "--log-format", "json", "--admin-listen="],
            cwd=daemon.workdir,
        )  # fmt: skip
        assert started.returncode == 0, started.stderr.decode()
        assert started.stdout == b""
        pid = running = deployed.pid
        poll(lambda: "serving EST on" in daemon.log_text(), "estd to run")
        certificate, bodies = _json_log_traffic(deployed)
        deployed.signal(signal.SIGTERM)
        poll(lambda: process_gone(running), "the daemon to exit")
        assert not deployed.pidfile.exists()
        _check_json_log(daemon.log_text(), certificate, bodies, pki)
    finally:
        if pid is None and deployed.pidfile.exists():
            pid = int(deployed.pidfile.read_text().strip() or 0) or None
        if pid is not None:
            kill_pid(pid)


def test_json_logs_in_the_foreground_on_stdout(tmp_path: Path) -> None:
    """With -n and --log-format json, everything on stdout and stderr is JSON lines."""
    with deployment(tmp_path, "--log-format", "json", admin=False) as deployed:
        certificate, bodies = _json_log_traffic(deployed)
        deployed.signal(signal.SIGTERM)
        assert deployed.process.wait(timeout=10) == 0
        _check_json_log(deployed.server.log_text(), certificate, bodies, deployed.pki)
