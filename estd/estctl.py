"""``estctl``: the operator's command-line companion of estd."""

from __future__ import annotations

import argparse
import datetime
import getpass
import ipaddress
import os
import sys
import tempfile
from collections.abc import Callable, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    PrivateKeyTypes,
)

from estd import __version__, admin, hsm
from estd.client import (
    KEY_TYPES,
    EstClient,
    EstClientError,
    EstFailure,
    build_csr,
    load_certificates,
    make_key,
)
from estd.csrattrs import decode_oid, oid_name
from estd.demo import write_demo
from estd.wire import (
    elements,
    raw_subject_of_certificate,
    raw_subject_of_csr,
    read_tlv,
)

PASSWORD_ENV = "ESTCTL_PASSWORD"  # noqa: S105 - a variable name, not a password
"""Environment variable with the HTTP Basic password (or the new one, passwd)."""


class UsageError(Exception):
    """The command line is wrong (exit status 2)."""


def _demo(args: argparse.Namespace) -> int:
    if os.path.exists(os.path.join(args.directory, "est.ini")) and not args.force:
        print(
            f"estctl: {args.directory}/est.ini exists; "
            "use --force to overwrite the demo PKI",
            file=sys.stderr,
        )
        return 1
    pki = write_demo(
        args.directory, datetime.datetime.now(datetime.UTC), args.devices, args.port
    )
    device = pki.devices[0].certificate.subject.rfc4514_string()
    print(f"demo PKI written to {args.directory}/")
    print(f"  est.ini          server settings (listens on 127.0.0.1:{args.port})")
    print("  factory_ca.pem   factory root (trust it to reach the server)")
    print("  est-ca.pem/.key  EST CA that signs renewed device certificates")
    print("  client-cas.pem   device CA trusted for client authentication")
    print("  local-tls.pem    server certificate for localhost and 127.0.0.1")
    print(f"  device.pem/.key  a device certificate: {device}")
    print(f"run: twistd -n est --config {os.path.join(args.directory, 'est.ini')}")
    return 0


# --- Input and output -----------------------------------------------------------------


def _read_password_file(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            line = handle.readline()
    except OSError as exc:
        raise EstFailure(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise EstFailure(f"{path}: the password is not UTF-8") from None
    password = line.rstrip("\r\n")
    if not password:
        raise EstFailure(f"{path}: the first line (the password) is empty")
    return password


def _password(args: argparse.Namespace, prompt: str, *, confirm: bool = False) -> str:
    """The password from --password-file, $ESTCTL_PASSWORD or a terminal prompt."""
    if args.password_file:
        return _read_password_file(args.password_file)
    if os.environ.get(PASSWORD_ENV):
        return os.environ[PASSWORD_ENV]
    if not sys.stdin.isatty():
        raise EstFailure(
            f"no password: give --password-file, set {PASSWORD_ENV} "
            "or run on a terminal"
        )
    password = getpass.getpass(prompt)
    if confirm and getpass.getpass("again: ") != password:
        raise EstFailure("the passwords differ")
    if not password:
        raise EstFailure("the password is empty")
    return password


def _write_file(path: str, data: bytes, mode: int) -> None:
    """Replace ``path`` atomically with ``data``; the file gets ``mode``."""
    directory = os.path.dirname(path) or "."
    try:
        fd, temporary = tempfile.mkstemp(
            dir=directory, prefix=f".{os.path.basename(path)}."
        )
    except OSError as exc:
        raise EstFailure(f"cannot write {path}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)
            handle.write(data)
        os.replace(temporary, path)
    except OSError as exc:
        os.unlink(temporary)
        raise EstFailure(f"cannot write {path}: {exc.strerror}") from None


def _certificate_pem(certificates: Sequence[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates)


def _write_key_and_certificate(
    prefix: str, key: PrivateKeyTypes, certificate: x509.Certificate
) -> None:
    """PREFIX.key (PKCS#8, mode 0600) and PREFIX.pem, then a summary line."""
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_file(f"{prefix}.key", key_pem, 0o600)
    _write_file(f"{prefix}.pem", _certificate_pem([certificate]), 0o644)
    not_after = certificate.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
    print(
        f"wrote {prefix}.key and {prefix}.pem: "
        f"{certificate.subject.rfc4514_string()} "
        f"serial {_hex_serial(certificate)} until {not_after}"
    )


def _hex_serial(certificate: x509.Certificate) -> str:
    digits = f"{certificate.serial_number:X}"
    return digits.zfill(len(digits) + len(digits) % 2)


def _subject(text: str) -> x509.Name:
    try:
        name = x509.Name.from_rfc4514_string(text)
    except ValueError:
        raise UsageError(f"--subject {text!r} is not an RFC 4514 name") from None
    if not name.rdns:
        raise UsageError("--subject is empty")
    return name


def _general_names(text: str) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        kind, _, value = item.partition(":")
        kind = kind.upper()
        if not value:
            raise UsageError(f"--san {item!r}: expected TYPE:VALUE")
        if kind == "DNS":
            names.append(x509.DNSName(value))
        elif kind == "IP":
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(value)))
            except ValueError:
                raise UsageError(f"--san {item!r}: not an IP address") from None
        elif kind == "URI":
            names.append(x509.UniformResourceIdentifier(value))
        elif kind == "EMAIL":
            names.append(x509.RFC822Name(value))
        else:
            raise UsageError(f"--san {item!r}: use DNS:, IP:, URI: or email:")
    if not names:
        raise UsageError("--san is empty")
    return names


def _client(args: argparse.Namespace) -> EstClient:
    if (args.cert is None) != (args.key is None):
        raise UsageError("--cert and --key go together")
    password = None
    if args.user is not None:
        password = _password(args, f"password for {args.user}: ")
    return EstClient(
        args.url,
        cacert=args.cacert,
        cert=args.cert,
        key=args.key,
        user=args.user,
        password=password,
        label=args.label,
        timeout=args.timeout,
        tls_max=args.tls_max,
    )


def _first_certificate(path: str) -> x509.Certificate:
    return load_certificates(path, "--cert file")[0]


def _san_of(certificate: x509.Certificate) -> x509.SubjectAlternativeName | None:
    try:
        return certificate.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value
    except x509.ExtensionNotFound:
        return None


def _csr_maker(
    key: CertificateIssuerPrivateKeyTypes,
    subject: x509.Name,
    san: x509.SubjectAlternativeName | list[x509.GeneralName] | None,
    pop: bool,
) -> Callable[[bytes | None], bytes]:
    def make_csr(channel_binding: bytes | None) -> bytes:
        # RFC 7030 §3.5: with --pop the CSR carries this connection's binding.
        return build_csr(
            key, subject, san=san, channel_binding=channel_binding if pop else None
        )

    return make_csr


def _new_key(kind: str) -> CertificateIssuerPrivateKeyTypes:
    try:
        return make_key(kind)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


# --- Commands -------------------------------------------------------------------------


def _cacerts(args: argparse.Namespace) -> int:
    certificates = _client(args).cacerts()
    pem = _certificate_pem(certificates)
    if args.out is None:
        sys.stdout.write(pem.decode("ascii"))
    else:
        _write_file(args.out, pem, 0o644)
        print(f"wrote {len(certificates)} CA certificate(s) to {args.out}")
    return 0


def _csrattrs(args: argparse.Namespace) -> int:
    der = _client(args).csrattrs()
    if der is None:
        print("none")
        return 0
    try:
        lines = describe_csrattrs(der)
    except ValueError as exc:
        raise EstFailure(f"csrattrs: the response is not DER: {exc}") from None
    print("\n".join(lines) if lines else "none (an empty list)")
    return 0


def _enroll(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.subject is not None:
        subject = _subject(args.subject)
    elif args.cert is not None:
        subject = _first_certificate(args.cert).subject
    else:
        raise UsageError("--subject is required without --cert")
    san = _general_names(args.san) if args.san else None
    key = _new_key(args.key_type)
    certificate = client.simpleenroll(_csr_maker(key, subject, san, args.pop))
    _write_key_and_certificate(args.out, key, certificate)
    return 0


def _reenroll(args: argparse.Namespace) -> int:
    current = _first_certificate(args.cert)
    client = _client(args)
    key = _new_key(args.key_type)
    build = _csr_maker(key, current.subject, _san_of(current), args.pop)
    wanted = raw_subject_of_certificate(current)

    def make_csr(channel_binding: bytes | None) -> bytes:
        der = build(channel_binding)
        # The server compares subjects byte for byte (so does fioconfig).
        if raw_subject_of_csr(x509.load_der_x509_csr(der)) != wanted:
            raise EstFailure(f"cannot copy the subject of {args.cert} byte for byte")
        return der

    certificate = client.simplereenroll(make_csr)
    _write_key_and_certificate(args.out, key, certificate)
    return 0


def _serverkeygen(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.subject is not None:
        subject = _subject(args.subject)
    elif args.cert is not None:
        subject = _first_certificate(args.cert).subject
    else:
        raise UsageError("--subject is required without --cert")
    san = _general_names(args.san) if args.san else None
    # RFC 7030 §4.4.1: the CSR's own key only signs the request; the server
    # makes the real one (of the CSR key's type, where it honours that).
    placeholder = _new_key(args.key_type)
    key, certificate = client.serverkeygen(
        _csr_maker(placeholder, subject, san, args.pop)
    )
    _write_key_and_certificate(args.out, key, certificate)
    return 0


def _passwd(args: argparse.Namespace) -> int:
    try:
        # Imported here so estctl works in an estd without estd.auth.
        from estd.auth import set_password
    except ImportError:
        raise EstFailure("this estd has no password files (estd.auth)") from None
    password = _password(args, f"new password for {args.user}: ", confirm=True)
    try:
        set_password(args.file, args.user, password, args.scheme)
    except ValueError as exc:
        raise EstFailure(str(exc)) from None
    print(f"{args.file}: password of {args.user} set ({args.scheme})")
    return 0


# --- csrattrs, readable --------------------------------------------------------------


def _oid_text(contents: bytes) -> str:
    oid = decode_oid(contents)
    name = oid_name(oid)
    return oid.dotted_string if name is None else f"{name} ({oid.dotted_string})"


_STRING_TAGS = {0x0C, 0x13, 0x14, 0x16, 0x1A, 0x1E}


def _value_text(der: bytes, tag: int, start: int, end: int, depth: int = 0) -> str:
    contents = der[start:end]
    if tag == 0x06:
        return _oid_text(contents)
    if tag == 0x02:
        return str(int.from_bytes(contents, "big", signed=True))
    if tag in _STRING_TAGS:
        return repr(contents.decode("utf-16-be" if tag == 0x1E else "utf-8", "replace"))
    if tag in (0x30, 0x31) and depth < 8:
        inner = ", ".join(
            _value_text(der, *child, depth + 1) for child in elements(der, start, end)
        )
        return "{" + inner + "}"
    return f"[tag 0x{tag:02x}] {contents.hex()}"


def describe_csrattrs(der: bytes) -> list[str]:
    """One line per entry of a CsrAttrs ``SEQUENCE OF AttrOrOID`` (RFC 7030 §4.5.2)."""
    tag, start, end = read_tlv(der, 0)
    if tag != 0x30:
        raise ValueError("not a SEQUENCE")
    lines = []
    for item_tag, item_start, item_end in elements(der, start, end):
        if item_tag == 0x06:
            lines.append(f"oid {_oid_text(der[item_start:item_end])}")
        elif item_tag == 0x30:
            fields = list(elements(der, item_start, item_end))
            if len(fields) != 2 or fields[0][0] != 0x06 or fields[1][0] != 0x31:
                raise ValueError("an Attribute is not SEQUENCE {OID, SET}")
            (_, oid_start, oid_end), (_, set_start, set_end) = fields
            values = [
                _value_text(der, *value) for value in elements(der, set_start, set_end)
            ]
            lines.append(
                f"attribute {_oid_text(der[oid_start:oid_end])}: " + ", ".join(values)
            )
        else:
            lines.append(_value_text(der, item_tag, item_start, item_end))
    return lines


# --- The parser -----------------------------------------------------------------------


def _add_connection_options(
    command: argparse.ArgumentParser, *, cert_required: bool = False
) -> None:
    command.add_argument(
        "url", metavar="URL", help="https://host:port[/.well-known/est]"
    )
    command.add_argument(
        "--cacert", required=True, help="PEM CA certificate(s) to verify the server"
    )
    command.add_argument(
        "--cert",
        required=cert_required,
        help="client certificate PEM; every certificate in it is sent",
    )
    command.add_argument(
        "--key", required=cert_required, help="private key of --cert (PEM)"
    )
    command.add_argument("--user", help="HTTP Basic user, sent when the server asks")
    command.add_argument(
        "--password-file",
        help=f"file whose first line is the password (or set {PASSWORD_ENV})",
    )
    command.add_argument("--label", help="CA label (RFC 7030 §3.2.2)")
    command.add_argument(
        "--timeout", type=float, default=30.0, help="seconds per operation"
    )
    command.add_argument(
        "--tls-max", choices=("1.2", "1.3"), help="highest TLS version to offer"
    )


def _add_csr_options(command: argparse.ArgumentParser, *, subject: bool) -> None:
    if subject:
        command.add_argument(
            "--subject",
            help="RFC 4514 subject, e.g. 'CN=dev-1,OU=factory' (default: --cert's)",
        )
        command.add_argument("--san", help="SubjectAltName, e.g. DNS:x,IP:192.0.2.1")
    command.add_argument(
        "--key-type", choices=KEY_TYPES, default="ec-p256", help="the new key"
    )
    command.add_argument(
        "--pop",
        action="store_true",
        help="put the TLS channel binding into the CSR (RFC 7030 §3.5)",
    )
    command.add_argument(
        "--out", required=True, metavar="PREFIX", help="write PREFIX.key, PREFIX.pem"
    )


def build_parser() -> argparse.ArgumentParser:
    """The estctl argument parser."""
    parser = argparse.ArgumentParser(prog="estctl", description=__doc__)
    parser.add_argument("--version", action="version", version=f"estctl {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="write a demo PKI and est.ini into a directory",
        description="Write a self-made PKI shaped like a Foundries factory's "
        "(root, EST CA, device CA, TLS certificate, device certificates) "
        "and an est.ini that uses it.",
    )
    demo.add_argument("directory", help="directory to write into (created if missing)")
    demo.add_argument(
        "--devices", type=int, default=1, help="device certificates to make"
    )
    demo.add_argument("--port", type=int, default=8443, help="port for est.ini")
    demo.add_argument("--force", action="store_true", help="overwrite an existing demo")
    demo.set_defaults(run=_demo)

    cacerts = commands.add_parser(
        "cacerts",
        help="fetch the CA certificates (PEM)",
        description="GET /cacerts and write the certificates as PEM.",
    )
    _add_connection_options(cacerts)
    cacerts.add_argument("--out", help="PEM file to write (default: stdout)")
    cacerts.set_defaults(run=_cacerts)

    csrattrs = commands.add_parser(
        "csrattrs",
        help="show the CSR attributes the server asks for",
        description="GET /csrattrs and print them, or 'none'.",
    )
    _add_connection_options(csrattrs)
    csrattrs.set_defaults(run=_csrattrs)

    enroll = commands.add_parser(
        "enroll",
        help="get a certificate for a fresh key (simpleenroll)",
        description="Make a key and a CSR (KeyUsage and ExtKeyUsage critical, as "
        "fioconfig does) and POST it to /simpleenroll.",
    )
    _add_connection_options(enroll)
    _add_csr_options(enroll, subject=True)
    enroll.set_defaults(run=_enroll)

    reenroll = commands.add_parser(
        "reenroll",
        help="renew a certificate like fioconfig renew-cert (simplereenroll)",
        description="Make a fresh key and a CSR with the subject and "
        "SubjectAltName of --cert copied byte for byte, and POST it to "
        "/simplereenroll over mutual TLS.",
    )
    _add_connection_options(reenroll, cert_required=True)
    _add_csr_options(reenroll, subject=False)
    reenroll.set_defaults(run=_reenroll)

    serverkeygen = commands.add_parser(
        "serverkeygen",
        help="have the server make the key and certificate",
        description="POST a CSR to /serverkeygen and write the key and "
        "certificate the server returns.",
    )
    _add_connection_options(serverkeygen)
    _add_csr_options(serverkeygen, subject=True)
    serverkeygen.set_defaults(run=_serverkeygen)

    passwd = commands.add_parser(
        "passwd",
        help="set a user's password in an HTTP Basic users file",
        description="Add USER to the users file or change their password. "
        f"The password comes from --password-file, ${PASSWORD_ENV} or a prompt.",
    )
    passwd.add_argument("file", help="the users file (created with mode 0600)")
    passwd.add_argument("user", help="the user name")
    passwd.add_argument(
        "--scheme", choices=("bcrypt", "scrypt"), default="bcrypt", help="hash scheme"
    )
    passwd.add_argument("--password-file", help="file whose first line is the password")
    passwd.set_defaults(run=_passwd)

    admin.add_commands(commands)
    hsm.add_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run estctl; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        status: int = args.run(args)
    except UsageError as exc:
        print(f"estctl: {exc}", file=sys.stderr)
        return 2
    except EstClientError as exc:
        print(f"estctl: the server refused {args.command}: {exc}", file=sys.stderr)
        return 1
    except (EstFailure, admin.CommandError) as exc:
        print(f"estctl: {exc}", file=sys.stderr)
        return 1
    return status


if __name__ == "__main__":
    sys.exit(main())
