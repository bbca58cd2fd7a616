"""contrib/mk-tls-keypair.sh: the server's TLS pair, signed by the factory root.

The script is run with ``sh`` (dash on Debian, so bashisms fail) against a
demo PKI written by :func:`estd.demo.write_demo`; its output is checked with
cryptography and openssl, and loaded by estd's own configuration code.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from estd.config import load_config
from estd.demo import write_demo
from estd.tls import build_context

SCRIPT = Path(__file__).resolve().parent.parent / "contrib" / "mk-tls-keypair.sh"
NAME = "est.example.com"


def now() -> datetime.datetime:
    """The real time: the script signs with the real clock."""
    return datetime.datetime.now(datetime.UTC)


def mk_tls_keypair(
    *args: str, days: str | None = None
) -> subprocess.CompletedProcess[bytes]:
    """Run the script with POSIX sh; DAYS only when given."""
    env = {key: value for key, value in os.environ.items() if key != "DAYS"}
    if days is not None:
        env["DAYS"] = days
    return subprocess.run(
        ["sh", str(SCRIPT), *args],
        capture_output=True,
        env=env,
        timeout=60,
        check=False,
    )


@pytest.fixture
def pkidir(tmp_path: Path) -> Path:
    """A demo PKI directory like a factory's (factory_ca.pem and .key)."""
    directory = tmp_path / "pki"
    write_demo(str(directory), now())
    return directory


def made_pair(prefix: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The certificate and key the script wrote at ``prefix``."""
    cert = x509.load_pem_x509_certificate(prefix.with_suffix(".pem").read_bytes())
    key = serialization.load_pem_private_key(
        prefix.with_suffix(".key").read_bytes(), None
    )
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return cert, key


def root_of(pkidir: Path) -> x509.Certificate:
    """The factory root certificate of a PKI directory."""
    return x509.load_pem_x509_certificate((pkidir / "factory_ca.pem").read_bytes())


def test_script_is_an_executable_posix_sh_script() -> None:
    """The script is executable, runs under /bin/sh and stops on any error."""
    text = SCRIPT.read_text()
    assert text.startswith("#!/bin/sh\n")
    assert "\nset -eu\n" in text
    assert SCRIPT.stat().st_mode & stat.S_IXUSR
    assert subprocess.run(["sh", "-n", str(SCRIPT)], check=False).returncode == 0


def test_makes_a_p256_server_certificate_signed_by_the_factory_root(
    pkidir: Path,
) -> None:
    """The certificate names the server, is for serverAuth only, chains to the root."""
    prefix = pkidir / "server"
    done = mk_tls_keypair(str(pkidir), NAME, str(prefix))
    assert done.returncode == 0, done.stderr
    cert, key = made_pair(prefix)
    root = root_of(pkidir)

    assert cert.subject == x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, NAME)])
    assert cert.issuer == root.subject
    cert.verify_directly_issued_by(root)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert list(san.value) == [x509.DNSName(NAME)]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert list(eku.value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical
    assert usage.value.digital_signature
    assert not (
        usage.value.key_encipherment
        or usage.value.key_agreement
        or usage.value.key_cert_sign
        or usage.value.crl_sign
        or usage.value.content_commitment
        or usage.value.data_encipherment
    )
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and not constraints.value.ca
    assert cert.serial_number > 0

    assert isinstance(key.curve, ec.SECP256R1)
    assert cert.public_key() == key.public_key()
    validity = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert validity == datetime.timedelta(days=825)

    verified = subprocess.run(
        ["openssl", "verify", "-CAfile", str(pkidir / "factory_ca.pem"),
         "-purpose", "sslserver", "-verify_hostname", NAME, str(prefix) + ".pem"],
        capture_output=True, check=False,
    )  # fmt: skip
    assert verified.returncode == 0, verified.stderr


def test_key_is_private_and_never_printed(pkidir: Path) -> None:
    """The key file has mode 600 and no key material reaches stdout or stderr."""
    prefix = pkidir / "server"
    done = mk_tls_keypair(str(pkidir), NAME, str(prefix))
    assert done.returncode == 0, done.stderr
    key_file = prefix.with_suffix(".key")
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    output = done.stdout + done.stderr
    assert b"PRIVATE KEY" not in output
    body = b"".join(key_file.read_bytes().splitlines()[1:-1])
    assert body[:32] not in output.replace(b"\n", b"")
    assert f"wrote {prefix}.key".encode() in done.stdout


def test_default_outprefix_is_local_tls_in_the_pki_directory(pkidir: Path) -> None:
    """Without OUTPREFIX the pair lands in PKIDIR/local-tls.pem and .key."""
    for name in ("local-tls.pem", "local-tls.key"):
        (pkidir / name).unlink()  # the demo's own pair
    done = mk_tls_keypair(str(pkidir), NAME)
    assert done.returncode == 0, done.stderr
    cert, _ = made_pair(pkidir / "local-tls")
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == NAME


def test_ipv4_address_is_a_dns_and_an_ip_name(pkidir: Path) -> None:
    """An IPv4 address as DNSNAME is put in the SAN as a DNS and an IP name."""
    prefix = pkidir / "by-address"
    done = mk_tls_keypair(str(pkidir), "192.0.2.10", str(prefix))
    assert done.returncode == 0, done.stderr
    cert, _ = made_pair(prefix)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert list(san.value) == [
        x509.DNSName("192.0.2.10"),
        x509.IPAddress(ipaddress.IPv4Address("192.0.2.10")),
    ]


def test_days_from_the_environment(pkidir: Path) -> None:
    """DAYS in the environment sets the validity period."""
    prefix = pkidir / "short"
    done = mk_tls_keypair(str(pkidir), NAME, str(prefix), days="30")
    assert done.returncode == 0, done.stderr
    cert, _ = made_pair(prefix)
    validity = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert validity == datetime.timedelta(days=30)


def test_estd_accepts_the_pair(pkidir: Path) -> None:
    """estd loads the pair as tls-cert/tls-key overrides and builds its TLS context."""
    prefix = pkidir / "server"
    assert mk_tls_keypair(str(pkidir), "localhost", str(prefix)).returncode == 0
    config = load_config(
        str(pkidir / "est.ini"),
        {"tls-cert": f"{prefix}.pem", "tls-key": f"{prefix}.key"},
        now(),
    )
    cert, key = made_pair(prefix)
    assert config.tls_certificates == (cert,)
    assert config.tls_key.public_key() == key.public_key()
    build_context(config)  # pyOpenSSL checks that key and certificate match


@pytest.mark.parametrize(
    ("args", "days", "message"),
    [
        ((), None, "usage: mk-tls-keypair.sh PKIDIR DNSNAME [OUTPREFIX]"),
        (("{pki}",), None, "usage: mk-tls-keypair.sh"),
        (("{pki}", NAME, "{pki}/a", "extra"), None, "usage: mk-tls-keypair.sh"),
        (("{pki}/missing", NAME, "{pki}/a"), None, "{pki}/missing is not a directory"),
        (("{pki}", NAME, "{pki}/a"), "0", "DAYS must be a whole number"),
        (("{pki}", NAME, "{pki}/a"), "ten", "DAYS must be a whole number"),
        (("{pki}", NAME, "{pki}/a"), "-5", "DAYS must be a whole number"),
        (("{pki}", "a/b", "{pki}/a"), None, "'a/b' is not a DNS name"),
        (("{pki}", "-bad.example", "{pki}/a"), None, "is not a DNS name"),
        (("{pki}", "", "{pki}/a"), None, "'' is not a DNS name"),
        (("{pki}", NAME, "{pki}/nowhere/a"), None, "{pki}/nowhere"),
    ],
    ids=[
        "no-args",
        "one-arg",
        "four-args",
        "no-pkidir",
        "days-zero",
        "days-word",
        "days-negative",
        "slash-in-name",
        "leading-hyphen",
        "empty-name",
        "no-outdir",
    ],
)
def test_bad_invocation_fails_with_a_message_and_writes_nothing(
    pkidir: Path, args: tuple[str, ...], days: str | None, message: str
) -> None:
    """Bad arguments exit non-zero, say what is wrong and leave no files behind."""
    before = sorted(pkidir.rglob("*"))
    done = mk_tls_keypair(*(arg.format(pki=pkidir) for arg in args), days=days)
    assert done.returncode != 0
    assert message.format(pki=pkidir).encode() in done.stderr
    assert done.stdout == b""
    assert sorted(pkidir.rglob("*")) == before


@pytest.mark.parametrize("missing", ["factory_ca.pem", "factory_ca.key"])
def test_missing_factory_root_file_is_named(pkidir: Path, missing: str) -> None:
    """Without the root certificate or key the script names the missing file."""
    (pkidir / missing).unlink()
    done = mk_tls_keypair(str(pkidir), NAME, str(pkidir / "server"))
    assert done.returncode != 0
    assert b"cannot read the factory root" in done.stderr
    assert str(pkidir / missing).encode() in done.stderr
    assert not (pkidir / "server.key").exists()


def test_root_key_not_matching_the_root_certificate_is_refused(pkidir: Path) -> None:
    """A factory_ca.key of another CA is refused before anything is signed."""
    (pkidir / "factory_ca.key").write_bytes((pkidir / "est-ca.key").read_bytes())
    done = mk_tls_keypair(str(pkidir), NAME, str(pkidir / "server"))
    assert done.returncode != 0
    assert b"factory_ca.key does not belong to" in done.stderr
    assert not (pkidir / "server.key").exists()
    assert not (pkidir / "server.pem").exists()


def test_existing_output_is_never_overwritten(pkidir: Path) -> None:
    """With the demo's local-tls pair present, the default run refuses and keeps it."""
    old_key = (pkidir / "local-tls.key").read_bytes()
    old_cert = (pkidir / "local-tls.pem").read_bytes()
    done = mk_tls_keypair(str(pkidir), NAME)
    assert done.returncode != 0
    assert b"local-tls.key exists" in done.stderr
    assert (pkidir / "local-tls.key").read_bytes() == old_key
    assert (pkidir / "local-tls.pem").read_bytes() == old_cert
