"""``estctl`` on the issuance ledger: certs, revoke, crl, pending, approve, reject.

Each test runs ``estd.estctl.main`` in-process against a real SQLite ledger
in the test's directory (and once against PostgreSQL, named by est.ini),
reading what it prints with ``capsys``; one test runs the real program for
its exit status.  The ledger is filled through its own API with
certificates the demo EST CA really signed, at fixed serial numbers.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from estd import admin
from estd.ca import CertificateAuthority, serial_hex
from estd.demo import device_name
from estd.estctl import main
from estd.ledger import IssuanceRecord, Ledger
from tests.pki import NOW, demo_pki, fioconfig_csr, write_pki

# Imported by pytest (not above) so that its fixtures register as a plugin.
pytest_plugins = ["tests.pg_support"]

DAY = datetime.timedelta(days=1)
HOUR = datetime.timedelta(hours=1)
OPERATOR_NOW = NOW + HOUR
"""What estctl's clock says in these tests (revocation and decision times)."""
DEVICE_UUID = "6ccd7de6-0267-4122-8a43-c3daee1c794a"
ADDRESS = "192.0.2.7"


def cn(common_name: str) -> x509.Name:
    """A subject holding only a common name."""
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def when(moment: datetime.datetime) -> str:
    """A time as estctl prints it."""
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Issued:
    """A certificate on record and the record made of it."""

    certificate: x509.Certificate
    record: IssuanceRecord

    @property
    def serial(self) -> int:
        """The certificate's serial number."""
        return self.certificate.serial_number

    @property
    def der(self) -> bytes:
        """The certificate's DER."""
        return self.certificate.public_bytes(serialization.Encoding.DER)


def record(
    ledger: Ledger,
    serial: int,
    subject: x509.Name,
    *,
    label: str = "",
    operation: str = "simplereenroll",
    issued_at: datetime.datetime,
    duration: datetime.timedelta,
    user: str | None = None,
    client: x509.Certificate | None = None,
) -> Issued:
    """Have the demo EST CA sign a certificate for ``subject`` and record it."""
    pki = demo_pki()
    ca = CertificateAuthority(pki.est_ca.certificate, pki.est_ca.key)
    csr = x509.load_der_x509_csr(fioconfig_csr(subject)[1])
    certificate = ca.issue(csr, issued_at, duration, serial=serial).certificate
    issued = IssuanceRecord.from_certificate(
        certificate,
        label=label,
        operation=operation,
        issuer_certificate=pki.est_ca.certificate,
        client_certificate=client,
        client_address=ADDRESS if client is not None else None,
        user=user,
        issued_at=issued_at,
    )
    ledger.record_issuance(issued)
    return Issued(certificate, issued)


@dataclass(frozen=True)
class Fleet:
    """The certificates on record, newest first, and where the ledger is."""

    ini: Path
    url: str
    device: Issued
    """0xABCDEF12, a Foundries-style subject, serverkeygen, revoked."""
    lab: Issued
    """0x0A0B0C, CN=dev-10 in label 'fleet', by an HTTP Basic user."""
    current: Issued
    """0x01F4, CN=dev-1, renewed by a device certificate, expires in 20 days."""
    expired: Issued
    """0x7F, CN=dev-1, expired long ago."""


def fill(ledger: Ledger) -> tuple[Issued, Issued, Issued, Issued]:
    """Four certificates (one revoked) in ``ledger``."""
    current = record(
        ledger,
        0x01F4,
        cn("dev-1"),
        issued_at=NOW - 10 * DAY,
        duration=30 * DAY,
        client=demo_pki().devices[0].certificate,
    )
    lab = record(
        ledger,
        0x0A0B0C,
        cn("dev-10"),
        label="fleet",
        operation="simpleenroll",
        issued_at=NOW - 5 * DAY,
        duration=365 * DAY,
        user="installer",
    )
    device = record(
        ledger,
        0xABCDEF12,
        device_name(DEVICE_UUID),
        operation="serverkeygen",
        issued_at=NOW - DAY,
        duration=365 * DAY,
    )
    expired = record(
        ledger,
        0x7F,
        cn("dev-1"),
        issued_at=NOW - 400 * DAY,
        duration=30 * DAY,
    )
    ledger.revoke(serial=device.serial, reason="keyCompromise", at=NOW - 12 * HOUR)
    return device, lab, current, expired


@pytest.fixture(autouse=True)
def operator(monkeypatch: pytest.MonkeyPatch) -> None:
    """estctl runs as user 'operator' (not under sudo) at OPERATOR_NOW."""
    monkeypatch.setattr(admin, "_now", lambda: OPERATOR_NOW)
    monkeypatch.setenv("USER", "operator")
    monkeypatch.delenv("SUDO_USER", raising=False)
    monkeypatch.delenv("ESTD_CONFIG", raising=False)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    """A demo est.ini with the SQLite ledger next to it, holding four certificates."""
    ini = Path(write_pki(str(tmp_path), demo_pki()))
    url = f"sqlite://{tmp_path / 'estd.sqlite3'}"
    ledger = Ledger.open(url)
    try:
        device, lab, current, expired = fill(ledger)
    finally:
        ledger.close()
    yield Fleet(ini, url, device, lab, current, expired)


def estctl(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run estctl in-process: (exit status, stdout, stderr)."""
    status = main(list(args))
    out, err = capsys.readouterr()
    return status, out, err


def listed(capsys: pytest.CaptureFixture[str], fleet: Fleet, *args: str) -> list[str]:
    """The serials ``estctl certs list --json ARGS`` prints, in order."""
    status, out, err = estctl(
        capsys, "certs", "list", "--ledger", fleet.url, "--json", *args
    )
    assert (status, err) == (0, "")
    return [row["serial"] for row in json.loads(out)]


def cells(table: str) -> list[list[str]]:
    """The cells of an estctl table, checking that its columns line up."""
    lines = table.rstrip("\n").split("\n")
    starts = [match.start() for match in re.finditer(r"(?:^|(?<=  ))\S", lines[0])]
    rows = []
    for line in lines:
        assert line == line.rstrip()
        row = [
            line[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)
        ]
        for start in starts[1:]:
            assert line[start - 2 : start] == "  ", (line, start)
        rows.append(row)
    return rows


def ledger_of(url: str) -> Ledger:
    """Open the ledger at ``url`` (the caller closes it)."""
    return Ledger.open(url)


def revocation(url: str, serial: int) -> tuple[datetime.datetime | None, str | None]:
    """(revoked_at, reason) of a certificate on record."""
    ledger = ledger_of(url)
    try:
        row = ledger.certificate(serial)
    finally:
        ledger.close()
    assert row is not None
    return row.revoked_at, row.revocation_reason


# --- certs list ----------------------------------------------------------------------


def test_certs_list_table(fleet: Fleet, capsys: pytest.CaptureFixture[str]) -> None:
    """estctl certs list prints every certificate, newest first, as an aligned
    table with hex serials, '-' for no label and each one's state."""
    status, out, err = estctl(capsys, "certs", "list", "--ledger", fleet.url)
    assert (status, err) == (0, "")
    assert cells(out) == [
        ["SERIAL", "SUBJECT", "LABEL", "OPERATION", "ISSUED", "NOT AFTER", "STATE"],
        [
            "ABCDEF12",
            f"OU=demo-factory,CN={DEVICE_UUID}",
            "-",
            "serverkeygen",
            when(NOW - DAY),
            when(NOW + 364 * DAY),
            "revoked keyCompromise",
        ],
        [
            "0A0B0C",
            "CN=dev-10",
            "fleet",
            "simpleenroll",
            when(NOW - 5 * DAY),
            when(NOW + 360 * DAY),
            "valid",
        ],
        [
            "01F4",
            "CN=dev-1",
            "-",
            "simplereenroll",
            when(NOW - 10 * DAY),
            when(NOW + 20 * DAY),
            "valid",
        ],
        [
            "7F",
            "CN=dev-1",
            "-",
            "simplereenroll",
            when(NOW - 400 * DAY),
            when(NOW - 370 * DAY),
            "expired",
        ],
    ]


def test_certs_list_json(fleet: Fleet, capsys: pytest.CaptureFixture[str]) -> None:
    """estctl certs list --json gives every field but the DER, serials in hex."""
    status, out, err = estctl(capsys, "certs", "list", "--ledger", fleet.url, "--json")
    assert (status, err) == (0, "")
    rows = json.loads(out)
    assert [row["serial"] for row in rows] == ["ABCDEF12", "0A0B0C", "01F4", "7F"]
    spki = fleet.current.certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    client = demo_pki().devices[0].certificate
    assert rows[2] == {
        "serial": "01F4",
        "label": "",
        "operation": "simplereenroll",
        "subject": "CN=dev-1",
        "san": None,
        "public_key_sha256": hashlib.sha256(spki).hexdigest(),
        "not_before": when(NOW - 10 * DAY - datetime.timedelta(minutes=1)),
        "not_after": when(NOW + 20 * DAY),
        "issuer": demo_pki().est_ca.certificate.fingerprint(hashes.SHA256()).hex(),
        "client_serial": serial_hex(client.serial_number),
        "client_issuer": client.issuer.rfc4514_string(),
        "client_address": ADDRESS,
        "user": None,
        "issued_at": when(NOW - 10 * DAY),
        "revoked_at": None,
        "revocation_reason": None,
    }
    assert (rows[0]["revoked_at"], rows[0]["revocation_reason"]) == (
        when(NOW - 12 * HOUR),
        "keyCompromise",
    )
    assert rows[1]["user"] == "installer"


@pytest.mark.parametrize(
    ("args", "serials"),
    [
        (["--subject", "dev-1"], ["0A0B0C", "01F4", "7F"]),
        (["--subject", f"CN={DEVICE_UUID}"], ["ABCDEF12"]),
        (["--label", "fleet"], ["0A0B0C"]),
        (["--label", ""], ["ABCDEF12", "01F4", "7F"]),
        (["--since", (NOW - 6 * DAY).date().isoformat()], ["ABCDEF12", "0A0B0C"]),
        (["--since", (NOW - 5 * DAY).isoformat()], ["ABCDEF12", "0A0B0C"]),
        (["--expiring-before", (NOW + 30 * DAY).isoformat()], ["01F4", "7F"]),
        (["--revoked"], ["ABCDEF12"]),
        (["--not-revoked"], ["0A0B0C", "01F4", "7F"]),
        (["--limit", "2"], ["ABCDEF12", "0A0B0C"]),
        (["--subject", "dev-1", "--not-revoked", "--limit", "1"], ["0A0B0C"]),
        (["--subject", "nobody"], []),
    ],
)
def test_certs_list_filters(
    fleet: Fleet,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    serials: list[str],
) -> None:
    """Each certs list filter keeps exactly the certificates it names."""
    assert listed(capsys, fleet, *args) == serials


def test_certs_list_zero_limit_is_one_line(
    fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    """certs list --limit 0 is a usage error (exit 2) saying why, not a traceback."""
    with pytest.raises(SystemExit) as raised:
        main(["certs", "list", "--ledger", fleet.url, "--limit", "0"])
    assert raised.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].endswith("'0' is not a positive whole number")


# --- certs show ----------------------------------------------------------------------


def test_certs_show_fields(fleet: Fleet, capsys: pytest.CaptureFixture[str]) -> None:
    """certs show prints one certificate's fields, one per line, '-' for none."""
    status, out, err = estctl(capsys, "certs", "show", "0a0b0c", "--ledger", fleet.url)
    assert (status, err) == (0, "")
    lab = fleet.lab.record
    assert out.split("\n") == [
        "serial             0A0B0C",
        "label              fleet",
        "operation          simpleenroll",
        "subject            CN=dev-10",
        "san                -",
        f"public_key_sha256  {lab.public_key_sha256}",
        f"not_before         {when(NOW - 5 * DAY - datetime.timedelta(minutes=1))}",
        f"not_after          {when(NOW + 360 * DAY)}",
        f"issuer             {lab.issuer}",
        "client_serial      -",
        "client_issuer      -",
        "client_address     -",
        "user               installer",
        f"issued_at          {when(NOW - 5 * DAY)}",
        "revoked_at         -",
        "revocation_reason  -",
        "",
    ]


def test_certs_show_json_and_pem(
    fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    """certs show --json gives the fields as JSON, --pem the certificate itself."""
    status, out, _ = estctl(
        capsys, "certs", "show", "AB:CD:EF:12", "--ledger", fleet.url, "--json"
    )
    assert status == 0
    fields = json.loads(out)
    assert (fields["serial"], fields["subject"], fields["operation"]) == (
        "ABCDEF12",
        f"OU=demo-factory,CN={DEVICE_UUID}",
        "serverkeygen",
    )
    assert (fields["revoked_at"], fields["revocation_reason"]) == (
        when(NOW - 12 * HOUR),
        "keyCompromise",
    )
    assert "der" not in fields
    assert "subject_der" not in fields
    status, out, err = estctl(
        capsys, "certs", "show", "0xabcdef12", "--ledger", fleet.url, "--pem"
    )
    assert (status, err) == (0, "")
    assert out.startswith("-----BEGIN CERTIFICATE-----\n")
    (certificate,) = x509.load_pem_x509_certificates(out.encode())
    assert certificate.public_bytes(serialization.Encoding.DER) == fleet.device.der


def test_certs_show_unknown_serial(
    fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    """certs show of a serial not on record, or not hex, exits 1 with one line."""
    assert estctl(capsys, "certs", "show", "99", "--ledger", fleet.url) == (
        1,
        "",
        "estctl: no certificate with serial 99 on record\n",
    )
    assert estctl(capsys, "certs", "show", "xyz", "--ledger", fleet.url) == (
        1,
        "",
        "estctl: 'xyz' is not a hexadecimal serial number\n",
    )


# --- revoke --------------------------------------------------------------------------


def test_revoke_by_serial(fleet: Fleet, capsys: pytest.CaptureFixture[str]) -> None:
    """revoke SERIAL (hex with colons) marks it revoked with the reason and the
    time; revoking it again changes nothing."""
    assert estctl(
        capsys, "revoke", "01:f4", "--reason", "keyCompromise", "--ledger", fleet.url
    ) == (0, "revoked 01F4 (keyCompromise)\n", "")
    assert revocation(fleet.url, 0x01F4) == (OPERATOR_NOW, "keyCompromise")
    assert estctl(
        capsys, "revoke", "01F4", "--reason", "superseded", "--ledger", fleet.url
    ) == (0, "already revoked; nothing changed\n", "")
    assert revocation(fleet.url, 0x01F4) == (OPERATOR_NOW, "keyCompromise")
    assert estctl(capsys, "revoke", "7f", "--ledger", fleet.url) == (
        0,
        "revoked 7F (unspecified)\n",
        "",
    )
    assert revocation(fleet.url, 0x0A0B0C) == (None, None)


def test_revoke_by_common_name(
    fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    """revoke --subject CN revokes every certificate with exactly that common
    name: dev-1's, not dev-10's."""
    assert estctl(
        capsys,
        "revoke",
        "--subject",
        "dev-1",
        "--reason",
        "superseded",
        "--ledger",
        fleet.url,
    ) == (0, "revoked 01F4 (superseded)\nrevoked 7F (superseded)\n", "")
    assert revocation(fleet.url, 0x01F4) == (OPERATOR_NOW, "superseded")
    assert revocation(fleet.url, 0x7F) == (OPERATOR_NOW, "superseded")
    assert revocation(fleet.url, 0x0A0B0C) == (None, None)
    assert estctl(
        capsys, "revoke", "--subject", DEVICE_UUID, "--ledger", fleet.url
    ) == (0, "already revoked; nothing changed\n", "")
    assert revocation(fleet.url, 0xABCDEF12) == (NOW - 12 * HOUR, "keyCompromise")


def test_revoke_by_full_subject(
    fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    """revoke --subject with a full RFC 4514 subject revokes exactly that subject."""
    assert estctl(
        capsys,
        "revoke",
        "--subject",
        "CN=dev-10",
        "--reason",
        "affiliationChanged",
        "--ledger",
        fleet.url,
    ) == (0, "revoked 0A0B0C (affiliationChanged)\n", "")
    assert revocation(fleet.url, 0x0A0B0C) == (OPERATOR_NOW, "affiliationChanged")
    assert revocation(fleet.url, 0x01F4) == (None, None)


def test_revoke_unknown(fleet: Fleet, capsys: pytest.CaptureFixture[str]) -> None:
    """revoke of an unknown serial, common name or subject exits 1 with one line
    and revokes nothing."""
    for args, message in (
        (["99"], "no certificate with serial 99"),
        (["--subject", "dev-2"], "no certificate with common name 'dev-2'"),
        (["--subject", "dev"], "no certificate with common name 'dev'"),
        (["--subject", "CN=dev-2"], "no certificate with subject 'CN=dev-2'"),
        (["01F4", "--subject", "dev-1"], "give a SERIAL or --subject, not both"),
    ):
        assert estctl(capsys, "revoke", *args, "--ledger", fleet.url) == (
            1,
            "",
            f"estctl: {message}\n",
        )
    assert listed(capsys, fleet, "--revoked") == ["ABCDEF12"]


def test_revoke_common_name_with_a_comma(
    fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    """revoke --subject finds a common name holding a comma ('Line 3, Bay 2')."""
    ledger = ledger_of(fleet.url)
    try:
        record(
            ledger,
            0x0C0FFE,
            cn("Line 3, Bay 2"),
            issued_at=NOW,
            duration=30 * DAY,
        )
    finally:
        ledger.close()
    assert estctl(
        capsys, "revoke", "--subject", "Line 3, Bay 2", "--ledger", fleet.url
    ) == (0, "revoked 0C0FFE (unspecified)\n", "")


def test_revoke_refuses_unknown_reason(
    fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    """A reason that is not an RFC 5280 CRLReason is a usage error (exit 2)."""
    with pytest.raises(SystemExit) as caught:
        main(["revoke", "01F4", "--reason", "lost", "--ledger", fleet.url])
    assert caught.value.code == 2
    assert "argument --reason: invalid choice: 'lost'" in capsys.readouterr().err
    assert revocation(fleet.url, 0x01F4) == (None, None)


# --- crl ------------------------------------------------------------------------------


def crl_entries(crl: x509.CertificateRevocationList) -> list[tuple[int, str | None]]:
    """(serial, reason name or None) of each CRL entry."""
    listed: list[tuple[int, str | None]] = []
    for entry in crl:
        try:
            reason: str | None = entry.extensions.get_extension_for_class(
                x509.CRLReason
            ).value.reason.name
        except x509.ExtensionNotFound:
            reason = None
        listed.append((entry.serial_number, reason))
    return listed


def test_crl_to_a_file(
    fleet: Fleet, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """crl --out writes the EST CA's current DER CRL to a file."""
    out = tmp_path / "est-ca.crl"
    assert estctl(capsys, "crl", "--config", str(fleet.ini), "--out", str(out)) == (
        0,
        "",
        f"wrote {out}\n",
    )
    crl = x509.load_der_x509_crl(out.read_bytes())
    est_ca = demo_pki().est_ca.certificate
    assert crl.is_signature_valid(est_ca.public_key())  # type: ignore[arg-type]
    assert crl.issuer == est_ca.subject
    assert crl.last_update_utc == OPERATOR_NOW
    assert crl.next_update_utc == OPERATOR_NOW + 7 * DAY
    assert crl_entries(crl) == [(0xABCDEF12, "key_compromise")]


def test_crl_as_pem_and_der_on_stdout(
    fleet: Fleet, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    """crl --pem prints a PEM CRL; without --out the DER goes to stdout."""
    assert main(["crl", "--config", str(fleet.ini), "--pem"]) == 0
    pem = capsysbinary.readouterr().out
    assert pem.startswith(b"-----BEGIN X509 CRL-----\n")
    assert pem.endswith(b"-----END X509 CRL-----\n")
    assert all(len(line) <= 64 for line in pem.split(b"\n"))
    from_pem = x509.load_pem_x509_crl(pem)
    assert main(["crl", "--config", str(fleet.ini), "--out", "-"]) == 0
    der = capsysbinary.readouterr().out
    # Each run makes a new CRL: the same entries under the next number.
    from_der = x509.load_der_x509_crl(der)
    assert crl_entries(from_der) == crl_entries(from_pem)
    number = x509.CRLNumber
    assert (
        from_der.extensions.get_extension_for_class(number).value.crl_number
        == from_pem.extensions.get_extension_for_class(number).value.crl_number + 1
    )
    assert crl_entries(from_pem) == [(0xABCDEF12, "key_compromise")]


def test_crl_errors(fleet: Fleet, capsys: pytest.CaptureFixture[str]) -> None:
    """crl for a label est.ini does not have exits 1 with one line."""
    assert estctl(capsys, "crl", "--config", str(fleet.ini), "--label", "nope") == (
        1,
        "",
        f"estctl: {fleet.ini} has no label 'nope'\n",
    )


# --- pending, approve, reject ---------------------------------------------------------


@pytest.fixture
def waiting(fleet: Fleet) -> Fleet:
    """Two requests waiting for approval (ids 1 and 2) in the fleet's ledger."""
    ledger = ledger_of(fleet.url)
    try:
        ledger.pending_submit(
            label="",
            csr_der=fioconfig_csr(cn("dev-1"))[1],
            subject="CN=dev-1",
            client_serial="0A1B",
            client_address=ADDRESS,
            user=None,
            now=NOW,
            expires_at=NOW + 7 * DAY,
        )
        ledger.pending_submit(
            label="fleet",
            csr_der=fioconfig_csr(cn("dev-2"))[1],
            subject="CN=dev-2",
            client_serial=None,
            client_address=ADDRESS,
            user="installer",
            now=NOW + HOUR,
            expires_at=NOW + HOUR + 7 * DAY,
        )
    finally:
        ledger.close()
    return fleet


def test_pending_list(waiting: Fleet, capsys: pytest.CaptureFixture[str]) -> None:
    """pending list shows each request, oldest first, with who sent it."""
    status, out, err = estctl(capsys, "pending", "list", "--ledger", waiting.url)
    assert (status, err) == (0, "")
    assert cells(out) == [
        ["ID", "STATUS", "SUBJECT", "LABEL", "FROM", "CREATED", "EXPIRES", "SERIAL"],
        ["1", "pending", "CN=dev-1", "-", "0A1B", when(NOW), when(NOW + 7 * DAY), "-"],
        [
            "2",
            "pending",
            "CN=dev-2",
            "fleet",
            "installer",
            when(NOW + HOUR),
            when(NOW + HOUR + 7 * DAY),
            "-",
        ],
    ]


def test_approve_and_reject(waiting: Fleet, capsys: pytest.CaptureFixture[str]) -> None:
    """approve and reject decide a pending request once, noting who and when;
    deciding it again or an unknown id exits 1 with one line."""
    assert estctl(capsys, "approve", "1", "--ledger", waiting.url) == (
        0,
        "request 1 (CN=dev-1) approved\n",
        "",
    )
    assert estctl(capsys, "reject", "2", "--ledger", waiting.url) == (
        0,
        "request 2 (CN=dev-2) rejected\n",
        "",
    )
    for command, request_id, message in (
        ("approve", "1", "request 1 is approved, no longer pending"),
        ("reject", "1", "request 1 is approved, no longer pending"),
        ("approve", "2", "request 2 is rejected, no longer pending"),
        ("approve", "99", "no pending request 99"),
    ):
        assert estctl(capsys, command, request_id, "--ledger", waiting.url) == (
            1,
            "",
            f"estctl: {message}\n",
        )
    status, out, _ = estctl(
        capsys, "pending", "list", "--ledger", waiting.url, "--json"
    )
    assert status == 0
    decisions = [
        (row["id"], row["status"], row["decided_by"], row["decided_at"])
        for row in json.loads(out)
    ]
    assert decisions == [
        (1, "approved", "operator", when(OPERATOR_NOW)),
        (2, "rejected", "operator", when(OPERATOR_NOW)),
    ]
    status, out, _ = estctl(
        capsys, "pending", "list", "--ledger", waiting.url, "--status", "rejected"
    )
    assert [row[0] for row in cells(out)] == ["ID", "2"]


def test_pending_list_json_and_bad_status(
    waiting: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    """pending list --json gives every field; an unknown --status exits 1."""
    status, out, _ = estctl(
        capsys, "pending", "list", "--ledger", waiting.url, "--json"
    )
    assert status == 0
    first = json.loads(out)[0]
    csr_sha256 = first.pop("csr_sha256")
    assert re.fullmatch("[0-9a-f]{64}", csr_sha256)
    assert first == {
        "id": 1,
        "label": "",
        "subject": "CN=dev-1",
        "client_serial": "0A1B",
        "client_address": ADDRESS,
        "user": None,
        "created_at": when(NOW),
        "expires_at": when(NOW + 7 * DAY),
        "status": "pending",
        "decided_at": None,
        "decided_by": None,
        "certificate_serial": None,
    }
    assert estctl(
        capsys, "pending", "list", "--ledger", waiting.url, "--status", "waiting"
    ) == (
        1,
        "",
        "estctl: 'waiting' is not one of approved, expired, issued, pending, "
        "rejected\n",
    )


# --- Finding the ledger ---------------------------------------------------------------


def add_to_ini(ini: Path, lines: str) -> None:
    """Append lines to est.ini's [est] section (it is the only section)."""
    with ini.open("a", encoding="utf-8") as handle:
        handle.write(lines)


def test_config_finds_sqlite_next_to_est_ini(
    fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    """--config est.ini reads the SQLite ledger in est.ini's directory."""
    status, out, _ = estctl(
        capsys, "certs", "list", "--config", str(fleet.ini), "--json"
    )
    assert status == 0
    assert [row["serial"] for row in json.loads(out)] == [
        "ABCDEF12",
        "0A0B0C",
        "01F4",
        "7F",
    ]


def test_config_state_dir(
    fleet: Fleet, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With state-dir set, estctl reads the ledger there (relative to est.ini)
    and not the one next to est.ini."""
    state = tmp_path / "state"
    state.mkdir()
    ledger = Ledger.open(f"sqlite://{state / 'estd.sqlite3'}")
    try:
        record(ledger, 0x5157, cn("dev-5"), issued_at=NOW, duration=DAY)
    finally:
        ledger.close()
    add_to_ini(fleet.ini, "state-dir = state\n")
    status, out, _ = estctl(
        capsys, "certs", "list", "--config", str(fleet.ini), "--json"
    )
    assert status == 0
    assert [row["serial"] for row in json.loads(out)] == ["5157"]
    assert estctl(capsys, "approve", "1", "--config", str(fleet.ini)) == (
        1,
        "",
        "estctl: no pending request 1\n",
    )


def test_config_missing_state_dir(
    fleet: Fleet, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A state-dir that does not exist exits 1 naming est.ini, the key and the
    directory."""
    add_to_ini(fleet.ini, "state-dir = missing\n")
    assert estctl(capsys, "certs", "list", "--config", str(fleet.ini)) == (
        1,
        "",
        f"estctl: {fleet.ini}: state-dir: {tmp_path / 'missing'} is not a directory\n",
    )


def test_ledger_url_wins_over_config(
    fleet: Fleet, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--ledger URL is read instead of the ledger est.ini names."""
    other = tmp_path / "other.sqlite3"
    ledger = Ledger.open(str(other))
    try:
        record(ledger, 0x0123, cn("dev-9"), issued_at=NOW, duration=DAY)
    finally:
        ledger.close()
    status, out, _ = estctl(
        capsys,
        "certs",
        "list",
        "--config",
        str(fleet.ini),
        "--ledger",
        f"sqlite://{other}",
        "--json",
    )
    assert status == 0
    assert [row["serial"] for row in json.loads(out)] == ["0123"]


def test_estd_config_and_working_directory(
    fleet: Fleet,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without --config, estctl uses $ESTD_CONFIG, else est.ini in the working
    directory, and says so when there is none."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert estctl(capsys, "certs", "list") == (
        1,
        "",
        "estctl: est.ini: cannot read: No such file or directory\n",
    )
    monkeypatch.setenv("ESTD_CONFIG", str(fleet.ini))
    assert estctl(capsys, "revoke", "7F")[:2] == (0, "revoked 7F (unspecified)\n")
    monkeypatch.delenv("ESTD_CONFIG")
    monkeypatch.chdir(tmp_path)
    status, out, _ = estctl(capsys, "certs", "list", "--revoked", "--json")
    assert status == 0
    assert [row["serial"] for row in json.loads(out)] == ["ABCDEF12", "7F"]
    status, out, _ = estctl(capsys, "certs", "show", "7F", "--json")
    assert status == 0
    assert json.loads(out)["revocation_reason"] == "unspecified"


def test_config_names_a_postgresql_ledger(
    postgresql_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With ledger = postgresql://... in est.ini, estctl lists, revokes and
    writes the CRL from that database."""
    ledger = Ledger.open(postgresql_url)
    try:
        fill(ledger)
    finally:
        ledger.close()
    ini = Path(write_pki(str(tmp_path), demo_pki()))
    add_to_ini(ini, f"ledger = {postgresql_url}\n")
    status, out, _ = estctl(capsys, "certs", "list", "--config", str(ini), "--json")
    assert status == 0
    assert [row["serial"] for row in json.loads(out)] == [
        "ABCDEF12",
        "0A0B0C",
        "01F4",
        "7F",
    ]
    assert estctl(capsys, "revoke", "--subject", "dev-10", "--config", str(ini)) == (
        0,
        "revoked 0A0B0C (unspecified)\n",
        "",
    )
    assert revocation(postgresql_url, 0x0A0B0C) == (OPERATOR_NOW, "unspecified")
    out_file = tmp_path / "crl.der"
    assert main(["crl", "--config", str(ini), "--out", str(out_file)]) == 0
    crl = x509.load_der_x509_crl(out_file.read_bytes())
    assert crl_entries(crl) == [(0x0A0B0C, None), (0xABCDEF12, "key_compromise")]
    assert not (tmp_path / "estd.sqlite3").exists()


# --- The real program -----------------------------------------------------------------


def test_exit_status_of_the_program(fleet: Fleet) -> None:
    """The estctl program exits 0 on success and 1 with one line on stderr for
    a serial not on record."""
    command = [sys.executable, "-m", "estd.estctl"]
    shown = subprocess.run(
        [*command, "certs", "show", "01F4", "--ledger", fleet.url, "--pem"],
        capture_output=True,
        check=False,
    )
    assert (shown.returncode, shown.stderr) == (0, b"")
    assert x509.load_pem_x509_certificate(shown.stdout) == fleet.current.certificate
    missing = subprocess.run(
        [*command, "certs", "show", "99", "--ledger", fleet.url],
        capture_output=True,
        check=False,
    )
    assert (missing.returncode, missing.stdout, missing.stderr) == (
        1,
        b"",
        b"estctl: no certificate with serial 99 on record\n",
    )
