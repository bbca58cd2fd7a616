"""Operator commands on the issuance ledger, for ``estctl``.

``estctl certs``, ``revoke``, ``crl``, ``pending``, ``approve`` and
``reject`` read the ledger named by est.ini (``ledger`` / ``state-dir``) or
by ``--ledger URL``.  Several estd instances sharing one PostgreSQL ledger
see a revocation at their next request, without a restart.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID

from estd.config import ledger_location, load_config
from estd.crl import CrlPublisher
from estd.errors import ConfigError
from estd.ledger import (
    REVOCATION_REASONS,
    CertificateRow,
    Ledger,
    LedgerError,
    NotFound,
    PendingRow,
)


class CommandError(Exception):
    """A one-line failure of an operator command (exit status 1)."""


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0)


def _config_path(args: argparse.Namespace) -> str:
    return str(args.config or os.environ.get("ESTD_CONFIG") or "est.ini")


def _open(args: argparse.Namespace) -> Ledger:
    url = args.ledger
    try:
        if url is None:
            url = ledger_location(_config_path(args))
        return Ledger.open(url)
    except ConfigError as error:
        raise CommandError(str(error)) from None
    except (LedgerError, ValueError, OSError) as error:
        raise CommandError(f"cannot open the ledger: {error}") from None


def parse_serial(text: str) -> int:
    """A serial as openssl prints it: hex, with or without colons or 0x."""
    cleaned = text.strip().lower().removeprefix("0x").replace(":", "")
    try:
        return int(cleaned, 16)
    except ValueError:
        raise CommandError(f"{text!r} is not a hexadecimal serial number") from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return value


def _date(text: str) -> datetime.datetime:
    """YYYY-MM-DD or an ISO 8601 time; UTC unless it says otherwise."""
    try:
        value = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a date (YYYY-MM-DD)"
        ) from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=datetime.UTC)
    return value


# --- Output ------------------------------------------------------------------


def _serial(serial: int | None) -> str:
    if serial is None:
        return "-"
    text = format(serial, "X")
    return "0" + text if len(text) % 2 else text


def _when(value: datetime.datetime | None) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%SZ") if value is not None else "-"


def _jsonable(row: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for field in dataclasses.fields(row):
        value = getattr(row, field.name)
        if field.name in ("der", "subject_der"):
            continue
        if isinstance(value, datetime.datetime):
            value = _when(value)
        elif field.name in ("serial", "certificate_serial") and value is not None:
            value = _serial(value)
        out[field.name] = value
    return out


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    for row in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    return "\n".join(line.rstrip() for line in lines)


def _certificate_line(row: CertificateRow) -> list[str]:
    state = f"revoked {row.revocation_reason}" if row.revoked_at else "valid"
    if row.revoked_at is None and row.not_after <= _now():
        state = "expired"
    return [
        _serial(row.serial),
        row.subject,
        row.label or "-",
        row.operation,
        _when(row.issued_at),
        _when(row.not_after),
        state,
    ]


def _print_certificates(rows: Sequence[CertificateRow], as_json: bool) -> None:
    if as_json:
        print(json.dumps([_jsonable(row) for row in rows], indent=2))
        return
    headers = (
        "SERIAL",
        "SUBJECT",
        "LABEL",
        "OPERATION",
        "ISSUED",
        "NOT AFTER",
        "STATE",
    )
    print(_table(headers, [_certificate_line(row) for row in rows]))


# --- Commands ----------------------------------------------------------------


def certs_list(args: argparse.Namespace) -> int:
    """estctl certs list: certificates on record, newest first."""
    ledger = _open(args)
    try:
        rows = ledger.certificates(
            subject=args.subject,
            label=args.label,
            issued_since=args.since,
            expiring_before=args.expiring_before,
            revoked=args.revoked,
            limit=args.limit,
        )
    finally:
        ledger.close()
    _print_certificates(rows, args.json)
    return 0


def certs_show(args: argparse.Namespace) -> int:
    """estctl certs show SERIAL: one certificate, as fields or PEM."""
    serial = parse_serial(args.serial)
    ledger = _open(args)
    try:
        row = ledger.certificate(serial)
    finally:
        ledger.close()
    if row is None:
        raise CommandError(f"no certificate with serial {_serial(serial)} on record")
    if args.pem:
        from cryptography.hazmat.primitives import serialization

        certificate = x509.load_der_x509_certificate(row.der)
        sys.stdout.write(certificate.public_bytes(serialization.Encoding.PEM).decode())
        return 0
    fields = _jsonable(row)
    if args.json:
        print(json.dumps(fields, indent=2))
        return 0
    width = max(len(name) for name in fields)
    for name, value in fields.items():
        shown = "-" if value is None or value == "" else value
        print(f"{name.ljust(width)}  {shown}")
    return 0


def _common_name(row: CertificateRow) -> str | None:
    certificate = x509.load_der_x509_certificate(row.der)
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if len(names) == 1 else None


def revoke(args: argparse.Namespace) -> int:
    """estctl revoke SERIAL | --subject CN: mark certificates revoked."""
    if (args.serial is None) == (args.subject is None):
        raise CommandError("give a SERIAL or --subject, not both")
    ledger = _open(args)
    try:
        if args.serial is not None:
            serials = ledger.revoke(
                serial=parse_serial(args.serial), reason=args.reason, at=_now()
            )
        else:
            serials = _revoke_subject(ledger, args.subject, args.reason)
    except NotFound as error:
        raise CommandError(str(error)) from None
    finally:
        ledger.close()
    if not serials:
        print("already revoked; nothing changed")
    for serial in serials:
        print(f"revoked {_serial(serial)} ({args.reason})")
    return 0


def _revoke_subject(ledger: Ledger, subject: str, reason: str) -> list[int]:
    """By common name (``dev-1``) or by full RFC 4514 subject (``CN=dev-1,...``)."""
    if "=" in subject:
        return ledger.revoke(subject=subject, reason=reason, at=_now())
    # Search for the escaped RFC 4514 form ("Line 3\\, Bay 2"), then check.
    escaped = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    rows = [
        row
        for row in ledger.certificates(subject=escaped.rfc4514_string())
        if _common_name(row) == subject
    ]
    if not rows:
        raise NotFound(f"no certificate with common name {subject!r}")
    revoked: list[int] = []
    for row in rows:
        if row.revoked_at is None:
            revoked += ledger.revoke(serial=row.serial, reason=reason, at=_now())
    return revoked


def crl(args: argparse.Namespace) -> int:
    """estctl crl: write the current CRL of a label's EST CA (DER or PEM)."""
    path = _config_path(args)
    now = _now()
    try:
        config = load_config(path, {}, now)
    except ConfigError as error:
        raise CommandError(str(error)) from None
    label = args.label or ""
    if label not in config.labels:
        raise CommandError(f"{path} has no label {label!r}")
    ca = config.labels[label].ca
    if not ca.can_sign_crls:
        raise CommandError("the EST CA's KeyUsage does not allow cRLSign")
    url = args.ledger or config.ledger_url
    try:
        ledger = Ledger.open(url)
    except (LedgerError, ValueError, OSError) as error:
        raise CommandError(f"cannot open the ledger: {error}") from None
    try:
        der = CrlPublisher(ledger).crl(ca, now)
    except LedgerError as error:
        raise CommandError(f"cannot read the ledger: {error}") from None
    finally:
        ledger.close()
    data = der
    if args.pem:
        import base64
        import textwrap

        body = "\n".join(textwrap.wrap(base64.b64encode(der).decode(), 64))
        data = f"-----BEGIN X509 CRL-----\n{body}\n-----END X509 CRL-----\n".encode()
    if args.out in (None, "-"):
        sys.stdout.buffer.write(data)
    else:
        with open(args.out, "wb") as handle:
            handle.write(data)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def pending_list(args: argparse.Namespace) -> int:
    """estctl pending list: requests waiting for (or past) a decision."""
    ledger = _open(args)
    try:
        # Requests past their expiry show as expired, as approve treats them.
        ledger.expire_pending(_now())
        rows = ledger.pending_list(args.status)
    except ValueError as error:
        raise CommandError(str(error)) from None
    finally:
        ledger.close()
    if args.json:
        print(json.dumps([_jsonable(row) for row in rows], indent=2))
        return 0
    headers = (
        "ID",
        "STATUS",
        "SUBJECT",
        "LABEL",
        "FROM",
        "CREATED",
        "EXPIRES",
        "SERIAL",
    )
    print(_table(headers, [_pending_line(row) for row in rows]))
    return 0


def _pending_line(row: PendingRow) -> list[str]:
    who = row.user or row.client_serial or row.client_address or "-"
    return [
        str(row.id),
        row.status,
        row.subject,
        row.label or "-",
        who,
        _when(row.created_at),
        _when(row.expires_at),
        _serial(row.certificate_serial),
    ]


def decide(args: argparse.Namespace) -> int:
    """estctl approve ID / estctl reject ID."""
    approve = args.command == "approve"
    by = os.environ.get("SUDO_USER") or os.environ.get("USER") or "estctl"
    ledger = _open(args)
    try:
        row = ledger.pending_decide(args.id, approve=approve, by=by, now=_now())
    except LedgerError as error:
        raise CommandError(str(error)) from None
    finally:
        ledger.close()
    verb = "approved" if approve else "rejected"
    print(f"request {row.id} ({row.subject}) {verb}")
    return 0


def reload(args: argparse.Namespace) -> int:
    """estctl reload: send SIGHUP to the estd whose pidfile is given."""
    import signal

    try:
        with open(args.pidfile, encoding="ascii") as handle:
            pid = int(handle.read().strip())
    except (OSError, ValueError) as error:
        raise CommandError(f"cannot read a pid from {args.pidfile}: {error}") from None
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        raise CommandError(f"no process {pid} (stale {args.pidfile}?)") from None
    except PermissionError:
        raise CommandError(f"not allowed to signal process {pid}") from None
    print(f"sent SIGHUP to estd (pid {pid}); its log says whether the reload worked")
    return 0


def _add_ledger_options(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--config", help="est.ini naming the ledger (default: $ESTD_CONFIG or est.ini)"
    )
    command.add_argument(
        "--ledger", help="ledger URL instead: sqlite:///PATH or postgresql://..."
    )


def add_commands(commands: Any) -> None:
    """Add the ledger commands to estctl's subcommand parser."""
    certs = commands.add_parser("certs", help="list or show issued certificates")
    certs_commands = certs.add_subparsers(dest="certs_command", required=True)
    listing = certs_commands.add_parser("list", help="certificates on record")
    _add_ledger_options(listing)
    listing.add_argument("--subject", help="subject contains this text")
    listing.add_argument("--label", help="issued through this label ('' = none)")
    listing.add_argument("--since", type=_date, help="issued on or after DATE")
    listing.add_argument("--expiring-before", type=_date, help="notAfter before DATE")
    state = listing.add_mutually_exclusive_group()
    state.add_argument("--revoked", action="store_const", const=True, default=None)
    state.add_argument(
        "--not-revoked", dest="revoked", action="store_const", const=False
    )
    listing.add_argument("--limit", type=_positive, help="at most N certificates")
    listing.add_argument("--json", action="store_true", help="JSON instead of a table")
    listing.set_defaults(run=certs_list)
    show = certs_commands.add_parser("show", help="one certificate")
    _add_ledger_options(show)
    show.add_argument("serial", help="serial in hex, as openssl prints it")
    show.add_argument("--json", action="store_true", help="JSON instead of fields")
    show.add_argument("--pem", action="store_true", help="the certificate as PEM")
    show.set_defaults(run=certs_show)

    revoking = commands.add_parser(
        "revoke",
        help="revoke certificates by serial or subject",
        description="Mark certificates revoked in the ledger: every estd sharing "
        "it refuses them at once and lists them in its CRL.",
    )
    _add_ledger_options(revoking)
    revoking.add_argument("serial", nargs="?", help="serial in hex")
    revoking.add_argument(
        "--subject", help="all certificates of this common name (or RFC 4514 subject)"
    )
    revoking.add_argument(
        "--reason",
        default="unspecified",
        # removeFromCRL belongs to delta CRLs (RFC 5280 §5.3.1), which estd
        # does not publish.
        choices=sorted(set(REVOCATION_REASONS) - {"removeFromCRL"}),
        help="RFC 5280 reason (default: unspecified)",
    )
    revoking.set_defaults(run=revoke)

    crl_command = commands.add_parser("crl", help="write the current CRL to a file")
    crl_command.add_argument(
        "--config", help="est.ini (default: $ESTD_CONFIG or est.ini)"
    )
    crl_command.add_argument("--ledger", help="ledger URL instead of est.ini's")
    crl_command.add_argument("--label", help="the label's CA (default: unlabelled)")
    crl_command.add_argument("--out", help="file to write (default: stdout)")
    crl_command.add_argument("--pem", action="store_true", help="PEM instead of DER")
    crl_command.set_defaults(run=crl)

    pending = commands.add_parser("pending", help="requests waiting for approval")
    pending_commands = pending.add_subparsers(dest="pending_command", required=True)
    pending_listing = pending_commands.add_parser("list", help="list requests")
    _add_ledger_options(pending_listing)
    pending_listing.add_argument(
        "--status", help="pending, approved, rejected, issued or expired"
    )
    pending_listing.add_argument("--json", action="store_true")
    pending_listing.set_defaults(run=pending_list)
    reloading = commands.add_parser(
        "reload",
        help="make a running estd re-read est.ini (SIGHUP)",
        description="Send SIGHUP to the estd of a pidfile: it re-reads est.ini and "
        "every file it names, and keeps the old settings if they are invalid.",
    )
    reloading.add_argument(
        "--pidfile", default="twistd.pid", help="estd's pidfile (default: twistd.pid)"
    )
    reloading.set_defaults(run=reload)

    for verb in ("approve", "reject"):
        deciding = commands.add_parser(verb, help=f"{verb} a pending request")
        _add_ledger_options(deciding)
        deciding.add_argument("id", type=int, help="request id (estctl pending list)")
        deciding.set_defaults(run=decide)
