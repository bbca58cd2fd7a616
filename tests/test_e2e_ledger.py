"""End to end: the issuance ledger behind real ``twistd est`` processes.

Servers are real ``twistd -n est`` processes on free loopback ports with a
demo PKI from ``estctl demo``; curl (mutual TLS) and openssl are the devices,
``estctl`` is the operator.  Tests on a shared PostgreSQL database (two
instances on one ledger, and the labelled server's PostgreSQL variant) skip
with pg_support's message when ``ESTD_TEST_POSTGRESQL`` is unset; the outage
test runs a private PostgreSQL server of its own (skipped only where the
server programs are not installed).  Races between instances are made
deterministic by holding a table lock until every request waits on it.  Every
server and database is stopped or dropped in teardown, even when a test
fails; waiting is always a bounded poll, never a fixed sleep.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import datetime
import json
import os
import re
import secrets
import sqlite3
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID
from psycopg import sql

from tests.e2e_support import (
    Csr,
    EstServer,
    HttpResponse,
    curl_response,
    fioconfig_csr,
    free_port,
    poll,
    run,
)

if TYPE_CHECKING:
    from tests.pg_support import PrivatePostgreSQL

# Imported by pytest (not above) so that its fixtures register as a plugin.
pytest_plugins = ["tests.pg_support"]

DEVICE_COUNT = 60
"""Device certificates ``estctl demo`` writes; each test below uses its own."""

CONCURRENT_DEVICES = range(1, 41)
SHARED_A, SHARED_B = 41, 42
OUTAGE_DEVICE = 43
DEFAULT_DIR_DEVICE, STATE_DIR_DEVICE = 44, 45
APPROVAL_DEVICE, EXPIRY_DEVICE = 46, 47
LIMITED_DEVICE, ROTATE_DEVICE = 48, 49
STALE_LISTING_DEVICE = 50
RACE_LIMIT_DEVICE, RACE_APPROVAL_DEVICE = 51, 52

CREATED = b"HTTP/1.1 201 Created"
ACCEPTED = b"HTTP/1.1 202 Accepted"
FORBIDDEN = b"HTTP/1.1 403 Forbidden"
TOO_MANY = b"HTTP/1.1 429 Too Many Requests"
UNAVAILABLE = b"HTTP/1.1 503 Service Unavailable"
TEXT = b"text/plain; charset=utf-8"
PENDING_BODY = re.compile(rb"request (\d+) is waiting for an operator's approval\n")
ISSUED_SERIAL = re.compile(r"issued_serial=([0-9A-F]+)")

LABELS = {
    "manual": "approval = manual\napproval-retry-after = 7",
    "expiring": "approval = manual\npending-expiry = 1s",
    "limited": "max-issuance-per-day = 2",
    "rotate": "revoke-superseded = yes",
}
"""The labels of the labelled servers (each inherits the [est] keys)."""


# --- Devices, requests and the operator's command ------------------------------


@dataclass(frozen=True)
class Device:
    """A client certificate and its key, as a device holds them."""

    cert: Path
    key: Path

    @property
    def certificate(self) -> x509.Certificate:
        """The certificate, parsed."""
        return x509.load_pem_x509_certificate(self.cert.read_bytes())

    @property
    def serial(self) -> int:
        """The certificate's serial number."""
        return self.certificate.serial_number

    @property
    def common_name(self) -> str:
        """The certificate's subject CN (the device UUID)."""
        (name,) = self.certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return str(name.value)


@dataclass(frozen=True)
class Pki:
    """The demo PKI directory ``estctl demo`` wrote."""

    directory: Path

    def __truediv__(self, name: str) -> Path:
        """A file of the PKI directory."""
        return self.directory / name

    def device(self, number: int) -> Device:
        """``devices/device-N.pem`` and its key (N >= 1)."""
        base = self.directory / "devices" / f"device-{number}"
        return Device(base.with_suffix(".pem"), base.with_suffix(".key"))

    @property
    def est_ca(self) -> x509.Certificate:
        """The EST CA that signs device certificates and CRLs."""
        return x509.load_pem_x509_certificate((self / "est-ca.pem").read_bytes())


def hex_serial(serial: int) -> str:
    """A serial as estctl prints and takes it (even-length upper-case hex)."""
    text = format(serial, "X")
    return "0" + text if len(text) % 2 else text


def estctl_command() -> list[str]:
    """The ``estctl`` entry point of the interpreter running the tests."""
    script = Path(sys.executable).with_name("estctl")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "estd.estctl"]


def estctl_run(*args: str) -> tuple[int, str, str]:
    """Run estctl: (exit status, stdout, stderr)."""
    done = run([*estctl_command(), *args])
    return (
        done.returncode,
        done.stdout.decode(errors="replace"),
        done.stderr.decode(errors="replace"),
    )


def estctl(*args: str) -> str:
    """Run estctl and return its stdout; fail the test on a non-zero exit."""
    status, out, err = estctl_run(*args)
    assert status == 0, f"estctl {' '.join(args)} exited {status}: {err}"
    return out


def estctl_json(*args: str) -> Any:
    """Run an estctl listing with ``--json`` and parse it."""
    return json.loads(estctl(*args, "--json"))


def operation(label: str, name: str) -> str:
    """The path of an operation under ``/.well-known/est/``, in a label."""
    return f"{label}/{name}" if label else name


def post(
    server: EstServer, pki: Pki, client: Device, csr: Csr, label: str = ""
) -> HttpResponse:
    """POST ``csr`` to simplereenroll over mutual TLS, as fioconfig does."""
    body_file = csr.key.with_suffix(".b64")
    body_file.write_bytes(csr.body)
    return curl_response(
        server,
        "--cacert", str(pki / "factory_ca.pem"),
        "--cert", str(client.cert),
        "--key", str(client.key),
        "-H", "Content-Type: application/pkcs10",
        "--data-binary", f"@{body_file}",
        server.url(operation(label, "simplereenroll")),
    )  # fmt: skip


def renew(
    server: EstServer, pki: Pki, client: Device, work: Path, label: str = ""
) -> tuple[HttpResponse, Csr]:
    """A fioconfig renewal: a new key and a CSR copying the client's subject."""
    name = f"csr-{len(list(work.glob('csr-*.key')))}" if work.exists() else "csr-0"
    csr = fioconfig_csr(client.cert, work, name)
    return post(server, pki, client, csr, label), csr


def received(response: HttpResponse, csr: Csr) -> Device:
    """The certificate a 201 carries, saved next to the CSR's key."""
    assert response.status_line == CREATED, response
    assert response.header("Content-Type") == b"application/pkcs7-mime"
    (certificate,) = pkcs7.load_der_pkcs7_certificates(base64.b64decode(response.body))
    pem = csr.key.with_suffix(".pem")
    pem.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return Device(pem, csr.key)


def renewed(
    server: EstServer, pki: Pki, client: Device, work: Path, label: str = ""
) -> Device:
    """Renew and return the new certificate (the renewal must succeed)."""
    return received(*renew(server, pki, client, work, label))


def assert_revoked_refused(response: HttpResponse) -> None:
    """The 403 a client presenting a revoked certificate gets."""
    assert response.status_line == FORBIDDEN, response
    assert response.header("Content-Type") == TEXT
    assert response.body.startswith(b"the client certificate was revoked on "), (
        response.body
    )


def assert_retry_after(response: HttpResponse) -> int:
    """The response's Retry-After, which must be a positive integer of seconds."""
    value = response.header("Retry-After")
    assert value.isdigit() and int(value) > 0, value
    return int(value)


def fetch_crl(
    server: EstServer, pki: Pki, label: str = ""
) -> tuple[bytes, x509.CertificateRevocationList]:
    """GET /crl anonymously; the DER and the CRL, whose signature must verify."""
    response = curl_response(
        server, "--cacert", str(pki / "factory_ca.pem"),
        server.url(operation(label, "crl")),
    )  # fmt: skip
    assert response.status_line == b"HTTP/1.1 200 OK", response
    assert response.header("Content-Type") == b"application/pkix-crl"
    assert response.header("Content-Length") == str(len(response.body)).encode()
    crl = x509.load_der_x509_crl(response.body)
    assert crl.is_signature_valid(pki.est_ca.public_key())  # type: ignore[arg-type]
    assert crl.issuer == pki.est_ca.subject
    return response.body, crl


def revoked_serials(crl: x509.CertificateRevocationList) -> set[int]:
    """The serial numbers a CRL lists."""
    return {entry.serial_number for entry in crl}


def crl_reason(crl: x509.CertificateRevocationList, serial: int) -> x509.ReasonFlags:
    """The reason code of ``serial``'s entry (absent means unspecified)."""
    entry = crl.get_revoked_certificate_by_serial_number(serial)
    assert entry is not None, f"{hex_serial(serial)} is not in the CRL"
    try:
        reason = entry.extensions.get_extension_for_class(x509.CRLReason)
    except x509.ExtensionNotFound:
        return x509.ReasonFlags.unspecified
    return reason.value.reason


def openssl_verify_with_crl(pki: Pki, crl_der: bytes, cert: Path, work: Path) -> str:
    """``openssl verify -crl_check`` of ``cert`` against the EST CA and a CRL."""
    crl_file = work / "crl.der"
    crl_file.write_bytes(crl_der)
    pem = work / "crl.pem"
    done = run(
        ["openssl", "crl", "-inform", "DER", "-in", str(crl_file), "-out", str(pem)]
    )
    assert done.returncode == 0, done.stderr
    done = run(
        ["openssl", "verify", "-partial_chain", "-crl_check",
         "-CAfile", str(pki / "est-ca.pem"), "-CRLfile", str(pem), str(cert)]
    )  # fmt: skip
    return (done.stdout + done.stderr).decode(errors="replace")


def ledger_serials(rows: list[dict[str, Any]]) -> Counter[int]:
    """How often each serial appears in ``estctl certs list --json`` rows."""
    return Counter(int(row["serial"], 16) for row in rows)


# --- Servers ------------------------------------------------------------------------


def write_ini(
    path: Path, pki: Pki, port: int, settings: str, labels: Mapping[str, str]
) -> None:
    """An est.ini on the demo PKI (absolute paths), listening on loopback."""
    lines = [
        "[est]",
        f"listen = tcp:{port}:interface=127.0.0.1",
        f"tls-cert = {pki / 'local-tls.pem'}",
        f"tls-key = {pki / 'local-tls.key'}",
        f"root-cert = {pki / 'factory_ca.pem'}",
        f"ca-cert = {pki / 'est-ca.pem'}",
        f"ca-key = {pki / 'est-ca.key'}",
        f"client-cas = {pki / 'client-cas.pem'}",
        "response-profile = fioconfig",
        settings,
    ]
    for name, body in labels.items():
        lines += ["", f"[label {name}]", body]
    path.write_text("\n".join(lines) + "\n")


class Launcher:
    """Starts estd servers from est.ini files and stops every one of them."""

    def __init__(self, pki: Pki) -> None:
        self.pki = pki
        self.started: list[EstServer] = []

    def __call__(
        self,
        *directories: Path,
        settings: str = "",
        labels: Mapping[str, str] | None = None,
    ) -> list[EstServer]:
        """One server per directory (its est.ini is written there), listening."""
        servers = []
        for directory in directories:
            directory.mkdir(parents=True, exist_ok=True)
            port = free_port()
            ini = directory / "est.ini"
            write_ini(ini, self.pki, port, settings, labels or {})
            server = EstServer(directory, port, ["--config", str(ini)])
            self.started.append(server)
            server.start()
            servers.append(server)
        for server in servers:
            server.wait_until_listening()
        return servers

    def stop_all(self) -> None:
        """Stop every server started (whatever state it is in)."""
        for server in reversed(self.started):
            server.stop()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A demo PKI with many devices, written by ``estctl demo DIR --devices N``."""
    directory = tmp_path_factory.mktemp("ledger-e2e") / "pki"
    estctl("demo", str(directory), "--devices", str(DEVICE_COUNT))
    return Pki(directory)


@pytest.fixture
def launch(pki: Pki) -> Iterator[Launcher]:
    """Start servers for one test; all are stopped after it."""
    launcher = Launcher(pki)
    try:
        yield launcher
    finally:
        launcher.stop_all()


@pytest.fixture
def pair(postgresql_url: str, launch: Launcher, tmp_path: Path) -> list[EstServer]:
    """Two estd processes sharing one PostgreSQL ledger (a fresh database)."""
    return launch(tmp_path / "a", tmp_path / "b", settings=f"ledger = {postgresql_url}")


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def ledger_setting(request: pytest.FixtureRequest) -> Iterator[str]:
    """The est.ini line choosing the ledger: the default SQLite, or a fresh
    database on the ESTD_TEST_POSTGRESQL server (dropped afterwards)."""
    if request.param == "sqlite":
        yield ""
        return
    # Imported here, once pytest has loaded (and rewritten) it as a plugin.
    from tests.pg_support import (
        ENVIRONMENT,
        SKIP_MESSAGE,
        database_url,
        drop_database,
    )

    server_url = os.environ.get(ENVIRONMENT)
    if not server_url:
        pytest.skip(SKIP_MESSAGE)
    name = "estd_e2e_" + secrets.token_hex(6)
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield f"ledger = {database_url(server_url, name)}"
    finally:
        drop_database(server_url, name)


@pytest.fixture(scope="module")
def labelled(
    pki: Pki, ledger_setting: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EstServer]:
    """One server with the labels of LABELS, on each kind of ledger."""
    launcher = Launcher(pki)
    try:
        (server,) = launcher(
            tmp_path_factory.mktemp("labelled"), settings=ledger_setting, labels=LABELS
        )
        yield server
    finally:
        launcher.stop_all()


def ini_of(server: EstServer) -> str:
    """The est.ini a server runs with."""
    return str(server.workdir / "est.ini")


# --- Two instances, one PostgreSQL ledger ---------------------------------------------


def test_two_instances_share_revocations_certificates_and_crls(
    pair: list[EstServer], pki: Pki, postgresql_url: str, tmp_path: Path
) -> None:
    """Both instances issue into one ledger, and an estctl revocation is enforced
    and published by both at once."""
    a, b = pair
    work = tmp_path / "clients"
    first = renewed(a, pki, pki.device(SHARED_A), work / "first")
    second = renewed(b, pki, pki.device(SHARED_B), work / "second")
    # A certificate one instance issued renews through the other.
    again = renewed(b, pki, first, work / "again")
    for server in (a, b):
        _, crl = fetch_crl(server, pki)  # cached while nothing is revoked
        assert revoked_serials(crl) == set()

    out = estctl(
        "revoke", hex_serial(first.serial), "--reason", "keyCompromise",
        "--ledger", postgresql_url,
    )  # fmt: skip
    assert out == f"revoked {hex_serial(first.serial)} (keyCompromise)\n"
    for server in (a, b):
        assert_revoked_refused(renew(server, pki, first, work / "refused-first")[0])

    out = estctl("revoke", "--subject", second.common_name, "--ledger", postgresql_url)
    assert out == f"revoked {hex_serial(second.serial)} (unspecified)\n"
    for server in (a, b):
        assert_revoked_refused(renew(server, pki, second, work / "refused-second")[0])
    # The renewed certificate of the first device was not revoked.
    assert renew(a, pki, again, work / "still")[0].status_line == CREATED

    rows = estctl_json("certs", "list", "--ledger", postgresql_url)
    by_serial = {int(row["serial"], 16): row for row in rows}
    # first, second, again and the renewal of `again`: one row each.
    assert len(rows) == 4 and set(ledger_serials(rows).values()) == {1}
    assert {first.serial, second.serial, again.serial} <= set(by_serial)
    assert by_serial[first.serial]["revocation_reason"] == "keyCompromise"
    assert by_serial[second.serial]["revocation_reason"] == "unspecified"
    assert by_serial[again.serial]["revoked_at"] is None
    assert by_serial[first.serial]["client_serial"] == hex_serial(
        pki.device(SHARED_A).serial
    )
    assert by_serial[again.serial]["client_serial"] == hex_serial(first.serial)
    shown = estctl(
        "certs", "show", hex_serial(again.serial), "--pem", "--ledger", postgresql_url
    )
    assert shown.encode() == again.cert.read_bytes()

    for server in (a, b):
        der, crl = fetch_crl(server, pki)
        assert revoked_serials(crl) == {first.serial, second.serial}
        assert crl_reason(crl, first.serial) == x509.ReasonFlags.key_compromise
    verdict = openssl_verify_with_crl(pki, der, first.cert, work)
    assert "certificate revoked" in verdict, verdict
    verdict = openssl_verify_with_crl(pki, der, again.cert, work)
    assert verdict.strip().endswith(": OK"), verdict


def test_concurrent_enrollments_on_two_instances_get_unique_recorded_serials(
    pair: list[EstServer], pki: Pki, postgresql_url: str, tmp_path: Path
) -> None:
    """Forty simultaneous renewals spread over both instances get forty distinct
    serials, each on record exactly once."""
    devices = [pki.device(number) for number in CONCURRENT_DEVICES]
    works = [tmp_path / f"device-{number}" for number in CONCURRENT_DEVICES]
    with concurrent.futures.ThreadPoolExecutor(max_workers=20) as pool:
        csrs = list(
            pool.map(
                lambda device, work: fioconfig_csr(device.cert, work, "csr"),
                devices,
                works,
            )
        )
        responses = list(
            pool.map(
                lambda index: post(pair[index % 2], pki, devices[index], csrs[index]),
                range(len(devices)),
            )
        )
    issued = [
        received(response, csr) for response, csr in zip(responses, csrs, strict=True)
    ]
    serials = [certificate.serial for certificate in issued]
    assert len(set(serials)) == len(devices)

    rows = estctl_json("certs", "list", "--ledger", postgresql_url)
    assert ledger_serials(rows) == Counter(serials)
    by_serial = {int(row["serial"], 16): row for row in rows}
    for device, certificate in zip(devices, issued, strict=True):
        row = by_serial[certificate.serial]
        assert row["client_serial"] == hex_serial(device.serial)
        assert row["subject"] == certificate.certificate.subject.rfc4514_string()
        assert row["operation"] == "simplereenroll"
        assert row["label"] == ""
    for server in pair:
        poll(
            lambda server=server: (
                len(ISSUED_SERIAL.findall(server.log_text())) == len(devices) // 2
            ),
            f"half of the issuances in the log of the server on {server.port}",
        )


# --- The database goes away and comes back ------------------------------------------


def renew_many(
    server: EstServer, pki: Pki, client: Device, work: Path, count: int
) -> list[tuple[HttpResponse, Csr]]:
    """``count`` simultaneous renewals of one device, each with its own CSR."""
    csrs = [fioconfig_csr(client.cert, work / f"r{i}", "csr") for i in range(count)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=count) as pool:
        responses = list(pool.map(lambda csr: post(server, pki, client, csr), csrs))
    return list(zip(responses, csrs, strict=True))


def test_database_outage_answers_503_issues_nothing_unrecorded_and_recovers(
    private_postgresql: PrivatePostgreSQL,
    launch: Launcher,
    pki: Pki,
    tmp_path: Path,
) -> None:
    """With its PostgreSQL server stopped estd answers 503 with Retry-After and
    hands out no certificate, and it issues again once the server is back."""
    url = private_postgresql.url
    (server,) = launch(tmp_path / "est", settings=f"ledger = {url}")
    device = pki.device(OUTAGE_DEVICE)
    got: set[int] = set()
    # Simultaneous renewals, so that every signing thread holds a connection.
    for response, csr in renew_many(server, pki, device, tmp_path / "before", 4):
        got.add(received(response, csr).serial)
    renewed_before = received(*renew(server, pki, device, tmp_path / "one"))
    got.add(renewed_before.serial)

    private_postgresql.stop()
    outage = renew_many(server, pki, device, tmp_path / "down", 4)
    outage.append(renew(server, pki, renewed_before, tmp_path / "down-renewed"))
    for response, _ in outage:
        assert response.status_line == UNAVAILABLE, response
        assert_retry_after(response)
        assert response.header("Content-Type") == TEXT
        assert response.body == b"the issuance ledger is unavailable; retry later\n"
    crl = curl_response(
        server, "--cacert", str(pki / "factory_ca.pem"), server.url("crl")
    )
    assert crl.status_line == UNAVAILABLE, crl
    assert_retry_after(crl)

    private_postgresql.start()
    # Without restarting estd: its connections were cut, new ones work.
    for response, csr in renew_many(server, pki, device, tmp_path / "after", 6):
        got.add(received(response, csr).serial)
    got.add(renewed(server, pki, renewed_before, tmp_path / "after-renewed").serial)
    assert len(got) == 12

    rows = estctl_json("certs", "list", "--ledger", url)
    recorded = ledger_serials(rows)
    assert set(recorded.values()) == {1}
    # Every certificate a client received is on record.
    assert got <= set(recorded), "a certificate left estd without a ledger row"
    # And every issuance the server logged is one a client received and recorded.
    poll(
        lambda: len(ISSUED_SERIAL.findall(server.log_text())) >= len(got),
        "the issuances in the server log",
    )
    logged = {int(text, 16) for text in ISSUED_SERIAL.findall(server.log_text())}
    assert logged == got
    assert logged <= set(recorded)


# --- The embedded SQLite ledger -------------------------------------------------------


def test_sqlite_ledger_lives_next_to_est_ini_or_in_state_dir(
    launch: Launcher, pki: Pki, tmp_path: Path
) -> None:
    """Without a ledger key the SQLite ledger (WAL) is estd.sqlite3 beside est.ini,
    state-dir moves it, and estctl --config finds it either way."""
    beside, moved = tmp_path / "beside", tmp_path / "moved"
    (moved / "state").mkdir(parents=True)
    (default_server,) = launch(beside)
    (state_server,) = launch(moved, settings="state-dir = state")

    first = renewed(
        default_server, pki, pki.device(DEFAULT_DIR_DEVICE), tmp_path / "c1"
    )
    database = beside / "estd.sqlite3"
    assert database.is_file()
    assert (beside / "estd.sqlite3-wal").is_file()
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as connection:
        (mode,) = connection.execute("PRAGMA journal_mode").fetchone()
    connection.close()
    assert mode == "wal"
    table = estctl("certs", "list", "--config", ini_of(default_server))
    header, *lines = table.splitlines()
    assert header.split() == [
        "SERIAL", "SUBJECT", "LABEL", "OPERATION", "ISSUED", "NOT", "AFTER", "STATE"
    ]  # fmt: skip
    assert len(lines) == 1
    fields = lines[0].split()
    assert fields[0] == hex_serial(first.serial)
    assert fields[1] == first.certificate.subject.rfc4514_string()
    assert fields[2:4] == ["-", "simplereenroll"] and fields[-1] == "valid"

    second = renewed(state_server, pki, pki.device(STATE_DIR_DEVICE), tmp_path / "c2")
    assert (moved / "state" / "estd.sqlite3").is_file()
    assert (moved / "state" / "estd.sqlite3-wal").is_file()
    assert not (moved / "estd.sqlite3").exists()
    rows = estctl_json("certs", "list", "--config", ini_of(state_server))
    assert [int(row["serial"], 16) for row in rows] == [second.serial]
    assert rows[0]["client_serial"] == hex_serial(pki.device(STATE_DIR_DEVICE).serial)


# --- Manual approval (RFC 7030 §4.2.3) ------------------------------------------------


def pending_id(response: HttpResponse) -> int:
    """The request id a 202 names in its text body."""
    assert response.status_line == ACCEPTED, response
    assert response.header("Content-Type") == TEXT
    match = PENDING_BODY.fullmatch(response.body)
    assert match is not None, response.body
    return int(match.group(1))


def test_manual_approval_202_then_approve_or_reject(
    labelled: EstServer, pki: Pki, tmp_path: Path
) -> None:
    """A manual label answers 202 until estctl approves (then the certificate,
    the same one each time) or rejects (then 403)."""
    ini = ini_of(labelled)
    device = pki.device(APPROVAL_DEVICE)
    csr = fioconfig_csr(device.cert, tmp_path, "first")
    waiting = post(labelled, pki, device, csr, "manual")
    request = pending_id(waiting)
    assert waiting.header("Retry-After") == b"7"
    assert waiting.header("Content-Length") == str(len(waiting.body)).encode()
    again = post(labelled, pki, device, csr, "manual")
    assert pending_id(again) == request
    assert again.header("Retry-After") == b"7"

    # ID STATUS SUBJECT LABEL FROM CREATED EXPIRES SERIAL
    listing = estctl("pending", "list", "--config", ini).splitlines()
    assert listing[0].split()[:5] == ["ID", "STATUS", "SUBJECT", "LABEL", "FROM"]
    (line,) = [row.split() for row in listing[1:] if row.split()[0] == str(request)]
    subject = device.certificate.subject.rfc4514_string()
    assert line[1:5] == ["pending", subject, "manual", hex_serial(device.serial)]
    assert line[-1] == "-"

    out = estctl("approve", str(request), "--config", ini)
    assert out.startswith(f"request {request} (") and out.endswith(") approved\n")
    answer = post(labelled, pki, device, csr, "manual")
    certificate = received(answer, csr)
    assert (
        certificate.certificate.public_key()
        == x509.load_der_x509_csr(csr.der).public_key()
    )
    repeat = post(labelled, pki, device, csr, "manual")
    assert repeat.status_line == CREATED and repeat.body == answer.body
    issued = estctl_json("pending", "list", "--status", "issued", "--config", ini)
    assert [(r["id"], r["certificate_serial"]) for r in issued] == [
        (request, hex_serial(certificate.serial))
    ]

    other = fioconfig_csr(device.cert, tmp_path, "second")
    second = pending_id(post(labelled, pki, device, other, "manual"))
    assert second != request
    out = estctl("reject", str(second), "--config", ini)
    assert out.endswith(") rejected\n")
    refused = post(labelled, pki, device, other, "manual")
    assert refused.status_line == FORBIDDEN, refused
    assert refused.body == f"request {second} was rejected by an operator\n".encode()
    # One certificate for this device in all: the repeat and the rejection made none.
    rows = estctl_json(
        "certs", "list", "--subject", device.common_name, "--config", ini
    )
    assert [int(r["serial"], 16) for r in rows] == [certificate.serial]


def test_pending_request_expires_and_the_csr_gets_a_new_request(
    labelled: EstServer, pki: Pki, tmp_path: Path
) -> None:
    """After pending-expiry the same CSR opens a new request and the old one is
    listed as expired (and can no longer be approved)."""
    ini = ini_of(labelled)
    device = pki.device(EXPIRY_DEVICE)
    csr = fioconfig_csr(device.cert, tmp_path, "csr")
    first = pending_id(post(labelled, pki, device, csr, "expiring"))

    def resubmitted() -> int | None:
        response = post(labelled, pki, device, csr, "expiring")
        number = pending_id(response)
        return number if number != first else None

    second = poll(
        resubmitted, "the pending request to expire", timeout=10, interval=0.2
    )
    assert second > first
    expired = estctl_json("pending", "list", "--status", "expired", "--config", ini)
    assert first in [row["id"] for row in expired]
    assert second not in [row["id"] for row in expired]
    status, _, err = estctl_run("approve", str(first), "--config", ini)
    assert status == 1
    assert f"request {first} is expired, no longer pending" in err


def epoch(text: str) -> float:
    """Seconds since the epoch of a time as estctl prints it (2030-05-01T12:00:00Z)."""
    moment = datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ")
    return moment.replace(tzinfo=datetime.UTC).timestamp()


def test_pending_list_shows_an_expired_request_as_expired(
    labelled: EstServer, pki: Pki, tmp_path: Path
) -> None:
    """Once its pending-expiry has passed, estctl pending list reports a request
    as expired, not as pending."""
    ini = ini_of(labelled)
    device = pki.device(STALE_LISTING_DEVICE)
    csr = fioconfig_csr(device.cert, tmp_path, "csr")
    request = pending_id(post(labelled, pki, device, csr, "expiring"))
    (row,) = [
        r for r in estctl_json("pending", "list", "--config", ini) if r["id"] == request
    ]
    expires = epoch(row["expires_at"])
    poll(lambda: time.time() >= expires, "the request's expiry time", timeout=10)
    status, _, err = estctl_run("approve", str(request), "--config", ini)
    assert (status, err) == (
        1,
        f"estctl: request {request} is expired, no longer pending\n",
    )
    (row,) = [
        r for r in estctl_json("pending", "list", "--config", ini) if r["id"] == request
    ]
    assert row["status"] == "expired"


# --- Limits and superseded certificates -----------------------------------------------


def test_third_renewal_in_a_day_gets_429(
    labelled: EstServer, pki: Pki, tmp_path: Path
) -> None:
    """With max-issuance-per-day = 2 the third renewal of one subject is 429 with
    Retry-After, and nothing is issued for it."""
    device = pki.device(LIMITED_DEVICE)
    first = renewed(labelled, pki, device, tmp_path / "1", "limited")
    second = renewed(labelled, pki, first, tmp_path / "2", "limited")
    response, _ = renew(labelled, pki, second, tmp_path / "3", "limited")
    assert response.status_line == TOO_MANY, response
    assert_retry_after(response)
    assert response.header("Content-Type") == TEXT
    rows = estctl_json(
        "certs", "list", "--subject", device.common_name, "--config", ini_of(labelled)
    )
    assert sorted(int(r["serial"], 16) for r in rows) == sorted(
        [first.serial, second.serial]
    )


def test_revoke_superseded_refuses_the_replaced_certificate(
    labelled: EstServer, pki: Pki, tmp_path: Path
) -> None:
    """With revoke-superseded = yes a second renewal revokes the first renewed
    certificate (superseded), which is then refused and listed in the CRL."""
    ini = ini_of(labelled)
    first = renewed(labelled, pki, pki.device(ROTATE_DEVICE), tmp_path / "1", "rotate")
    _, crl = fetch_crl(labelled, pki, "rotate")  # made (and cached) before
    assert first.serial not in revoked_serials(crl)
    second = renewed(labelled, pki, first, tmp_path / "2", "rotate")

    rows = estctl_json("certs", "list", "--subject", first.common_name, "--config", ini)
    by_serial = {int(row["serial"], 16): row for row in rows}
    assert set(by_serial) == {first.serial, second.serial}
    assert by_serial[first.serial]["revocation_reason"] == "superseded"
    assert by_serial[first.serial]["revoked_at"] is not None
    assert by_serial[second.serial]["revoked_at"] is None
    assert_revoked_refused(renew(labelled, pki, first, tmp_path / "3", "rotate")[0])
    _, crl = fetch_crl(labelled, pki, "rotate")
    assert crl_reason(crl, first.serial) == x509.ReasonFlags.superseded
    assert second.serial not in revoked_serials(crl)
    written = tmp_path / "estctl.crl"
    estctl("crl", "--config", ini, "--label", "rotate", "--out", str(written))
    from_estctl = x509.load_der_x509_crl(written.read_bytes())
    assert revoked_serials(from_estctl) == revoked_serials(crl)
    # The current certificate still renews.
    assert renew(labelled, pki, second, tmp_path / "4", "rotate")[0].status_line == (
        CREATED
    )


# --- Races between instances, made deterministic with a table lock --------------------


@pytest.fixture
def labelled_pair(
    postgresql_url: str, launch: Launcher, tmp_path: Path
) -> list[EstServer]:
    """Two estd processes with the labels of LABELS on one PostgreSQL ledger."""
    return launch(
        tmp_path / "a",
        tmp_path / "b",
        settings=f"ledger = {postgresql_url}",
        labels=LABELS,
    )


@contextlib.contextmanager
def inserts_held(url: str) -> Iterator[Callable[[int], None]]:
    """Hold an EXCLUSIVE lock on the ledger's certificates table: estd still
    reads it, but every INSERT waits until the block ends.

    Yields ``wait_for(n)``, which returns once ``n`` estd sessions wait.
    """
    with (
        psycopg.connect(url, autocommit=True) as holder,
        psycopg.connect(url, autocommit=True) as observer,
    ):
        holder.execute("BEGIN")
        holder.execute("LOCK TABLE certificates IN EXCLUSIVE MODE")

        def waiting() -> int:
            row = observer.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname ="
                " current_database() AND application_name = 'estd'"
                " AND wait_event_type = 'Lock'"
            ).fetchone()
            assert row is not None
            return int(row[0])

        def wait_for(count: int) -> None:
            poll(lambda: waiting() >= count, f"{count} estd sessions to wait")

        try:
            yield wait_for
        finally:
            holder.execute("ROLLBACK")


def test_daily_limit_holds_for_simultaneous_renewals_on_two_instances(
    labelled_pair: list[EstServer], pki: Pki, postgresql_url: str, tmp_path: Path
) -> None:
    """Three simultaneous renewals of one subject through two instances, with
    max-issuance-per-day = 2, give two certificates and one 429."""
    device = pki.device(RACE_LIMIT_DEVICE)
    csrs = [fioconfig_csr(device.cert, tmp_path / str(i), "csr") for i in range(3)]
    with concurrent.futures.ThreadPoolExecutor(len(csrs)) as pool:
        with inserts_held(postgresql_url) as wait_for:
            futures = [
                pool.submit(post, labelled_pair[i % 2], pki, device, csr, "limited")
                for i, csr in enumerate(csrs)
            ]
            wait_for(len(csrs))  # all three are in estd, waiting to record
        statuses = sorted(future.result().status_line for future in futures)
    rows = estctl_json(
        "certs", "list", "--subject", device.common_name, "--ledger", postgresql_url
    )
    assert (statuses, len(rows)) == ([CREATED, CREATED, TOO_MANY], 2)


def test_simultaneous_polls_of_an_approved_request_get_its_certificate(
    labelled_pair: list[EstServer], pki: Pki, postgresql_url: str, tmp_path: Path
) -> None:
    """Two simultaneous polls (one per instance) of an approved CSR both get the
    one certificate the request is answered with, never an error."""
    device = pki.device(RACE_APPROVAL_DEVICE)
    csr = fioconfig_csr(device.cert, tmp_path, "csr")
    request = pending_id(post(labelled_pair[0], pki, device, csr, "manual"))
    estctl("approve", str(request), "--ledger", postgresql_url)
    # Each poll gets its own copy of the body file (they run at once).
    copies = [Csr(tmp_path / f"poll-{i}.key", csr.der) for i in range(2)]
    with concurrent.futures.ThreadPoolExecutor(len(copies)) as pool:
        with inserts_held(postgresql_url) as wait_for:
            futures = [
                pool.submit(post, server, pki, device, copy, "manual")
                for server, copy in zip(labelled_pair, copies, strict=True)
            ]
            wait_for(len(copies))  # both are in estd, waiting to record
        responses = [future.result() for future in futures]
    assert [r.status_line for r in responses] == [CREATED, CREATED]
    assert responses[0].body == responses[1].body
    later = post(labelled_pair[1], pki, device, csr, "manual")
    assert (later.status_line, later.body) == (CREATED, responses[0].body)
    (row,) = [
        r
        for r in estctl_json("pending", "list", "--ledger", postgresql_url)
        if r["id"] == request
    ]
    assert row["status"] == "issued"
    (certificate,) = pkcs7.load_der_pkcs7_certificates(
        base64.b64decode(responses[0].body)
    )
    assert row["certificate_serial"] == hex_serial(certificate.serial_number)
