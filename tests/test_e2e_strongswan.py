"""End to end: strongSwan's ``pki --est`` against the real ``twistd est``.

strongSwan's ``pki`` tool is an EST client in the field (Debian 12 ships
5.9.8, package ``strongswan-pki``).  Here it makes its own keys and CSRs
(``pki --gen``, ``pki --req``) and talks to estd over real TLS:
``pki --estca`` fetches /cacerts, ``pki --est --userpass`` enrolls with HTTP
Basic, ``pki --est --cert --key`` re-enrolls over mutual TLS, and against a
server with ``approval = manual`` it polls a 202 until an operator approves.

5.9.8 knows no CA labels (it always asks for ``/.well-known/est/OP`` below
the URL's path), needs 200 rather than fioconfig's 201 and cannot decode
base64 with line breaks, so the servers here serve the unlabelled path with
``response-profile = rfc7030`` and ``base64-line-length = 0``.  The URL names
127.0.0.1 (the demo TLS certificate's IP SAN) because ``pki`` connects to the
first address a host name resolves to, which may be ::1.

Outside CI the tests skip when ``pki`` is not installed; with ``CI`` set
(``.ci/run`` sets it) they fail instead.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from estd.ca import serial_hex
from estd.demo import write_demo
from tests.e2e_support import EstServer, free_port, openssl, poll, run

ENROLL_USER = "strongswan-1"
"""The HTTP Basic user; estd lets it enroll for the subject CN=<user>."""
ENROLL_PASSWORD = "pki enrolls with basic auth"
MANUAL_USER = "strongswan-manual"
MANUAL_PASSWORD = "an operator says yes"
MANUAL_RETRY_AFTER = 2
"""The manual server's Retry-After; longer than ``pki --interval 1``, so the
poll interval ``pki`` reports shows that it read the header."""

MISSING = (
    "strongSwan's pki is not installed "
    "(apt-get install strongswan-pki libstrongswan-standard-plugins; "
    ".ci/run installs them)"
)
SETTINGS = """\
[est]
listen = tcp:{port}:interface=127.0.0.1
tls-cert = local-tls.pem
tls-key = local-tls.key
root-cert = factory_ca.pem
ca-cert = est-ca.pem
ca-key = est-ca.key
client-cas = client-cas.pem
# strongSwan pki 5.9.8: no labels, only 200 delivers, one-line base64.
response-profile = rfc7030
base64-line-length = 0
auth = cert-or-basic
users-file = users.htpasswd
"""
MANUAL_SETTINGS = f"approval = manual\napproval-retry-after = {MANUAL_RETRY_AFTER}\n"


# --- The client -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki_tool() -> str:
    """The ``pki`` binary, with the openssl plugin it needs for P-256 keys."""
    path = shutil.which("pki")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{MISSING}, and CI must run the strongSwan tests")
        pytest.skip(MISSING)
    done = run([path, "--help"])
    output = done.stdout.decode(errors="replace") + done.stderr.decode(errors="replace")
    plugins = re.search(r"^loaded plugins: (.*)$", output, re.MULTILINE)
    if plugins is None or "openssl" not in plugins.group(1).split():
        # Debian puts the openssl plugin in libstrongswan-standard-plugins, a
        # mere Recommends; without it pki cannot load ECDSA keys at all.
        pytest.fail(
            "strongSwan's openssl plugin is not loaded "
            f"(apt-get install libstrongswan-standard-plugins):\n{output}"
        )
    return path


@dataclass(frozen=True)
class Pki:
    """A ``pki`` invocation's exit status and its log (stderr)."""

    returncode: int
    log: str


def pki(tool: str, *args: str | Path, out: Path | None = None) -> Pki:
    """Run ``pki ARGS``, its stdout going to ``out`` as a shell redirect would."""
    argv = [tool, *map(str, args)]
    if out is None:
        done = run(argv)
        return Pki(done.returncode, done.stderr.decode(errors="replace"))
    with open(out, "wb") as stdout:
        finished = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=subprocess.PIPE,
            timeout=30,
            check=False,
        )
    return Pki(finished.returncode, finished.stderr.decode(errors="replace"))


@dataclass(frozen=True)
class Request:
    """A private key and PKCS#10 request, both DER, made by strongSwan's pki."""

    key: Path
    csr: Path

    @property
    def subject_der(self) -> bytes:
        """The subject Name the request asks for, byte for byte."""
        csr = x509.load_der_x509_csr(self.csr.read_bytes())
        return csr.subject.public_bytes()


def make_request(tool: str, directory: Path, name: str, dn: str) -> Request:
    """``pki --gen`` a P-256 key and ``pki --req`` a request for ``dn``."""
    directory.mkdir(parents=True, exist_ok=True)
    key, csr = directory / f"{name}.key.der", directory / f"{name}.csr.der"
    done = pki(tool, "--gen", "--type", "ecdsa", "--size", "256", out=key)
    assert done.returncode == 0, done.log
    done = pki(tool, "--req", "--in", key, "--type", "ecdsa", "--dn", dn, out=csr)
    assert done.returncode == 0, done.log
    return Request(key, csr)


# --- The servers ----------------------------------------------------------------------


@dataclass(frozen=True)
class Deployment:
    """A running estd set up for strongSwan, its demo PKI and a scratch directory."""

    server: EstServer
    pki: Path
    scratch: Path
    tool: str

    @property
    def url(self) -> str:
        """What ``pki --url`` gets: the server, without /.well-known/est."""
        return f"https://127.0.0.1:{self.server.port}"

    def certificate(self, name: str) -> x509.Certificate:
        """The certificate in PKI file ``name``."""
        return x509.load_pem_x509_certificate((self.pki / name).read_bytes())

    def est_command(self, request: Request, *args: str | Path) -> list[str]:
        """The ``pki --est`` command line enrolling ``request``."""
        return [
            self.tool, "--est", "--url", self.url,
            "--cacert", str(self.pki / "factory_ca.pem"),
            "--cacert", str(self.pki / "est-ca.pem"),
            "--in", str(request.csr), *map(str, args),
        ]  # fmt: skip

    def est(self, request: Request, out: Path, *args: str | Path) -> Pki:
        """``pki --est`` for ``request``, the certificate (DER) written to ``out``."""
        return pki(*self.est_command(request, *args), out=out)

    def estctl(self, *args: str) -> str:
        """Run this checkout's ``estctl`` on the server's est.ini; its stdout."""
        done = run(
            [sys.executable, "-m", "estd.estctl", *args,
             "--config", str(self.pki / "est.ini")]
        )  # fmt: skip
        assert done.returncode == 0, done.stderr.decode(errors="replace")
        return done.stdout.decode()

    def log_line(self, pattern: str, timeout: float = 15) -> str:
        """The first server log line matching ``pattern``, once it is written."""
        regex = re.compile(pattern)

        def found() -> str | None:
            for line in self.server.log_text().splitlines():
                if regex.search(line):
                    return line
            return None

        return poll(found, f"a log line matching {pattern!r}", timeout)


def _add_user(directory: Path, user: str, password: str) -> None:
    """Add ``user`` to ``users.htpasswd`` with ``estctl passwd`` (bcrypt)."""
    secret = directory / f"{user}.pass"
    secret.write_text(password + "\n")
    done = run(
        [sys.executable, "-m", "estd.estctl", "passwd",
         str(directory / "users.htpasswd"), user, "--password-file", str(secret)]
    )  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()


def _deploy(tool: str, scratch: Path, extra_settings: str = "") -> Iterator[Deployment]:
    """A demo PKI under ``scratch`` and estd serving it for strongSwan."""
    port = free_port()
    pki_dir = scratch / "pki"
    write_demo(str(pki_dir), datetime.datetime.now(datetime.UTC), port=port)
    (pki_dir / "est.ini").write_text(SETTINGS.format(port=port) + extra_settings)
    _add_user(pki_dir, ENROLL_USER, ENROLL_PASSWORD)
    _add_user(pki_dir, MANUAL_USER, MANUAL_PASSWORD)
    server = EstServer(scratch / "server", port, ["--config", str(pki_dir / "est.ini")])
    try:
        server.start()
        server.wait_until_listening()
        (scratch / "work").mkdir()
        yield Deployment(server, pki_dir, scratch / "work", tool)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def est(
    pki_tool: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    """estd issuing at once: rfc7030 profile, one-line base64, cert or Basic."""
    yield from _deploy(pki_tool, tmp_path_factory.mktemp("strongswan"))


@pytest.fixture(scope="module")
def manual(
    pki_tool: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    """The same, with ``approval = manual``: requests wait (202) for estctl."""
    yield from _deploy(
        pki_tool, tmp_path_factory.mktemp("strongswan-manual"), MANUAL_SETTINGS
    )


# --- Checks ---------------------------------------------------------------------------


def assert_issued(
    est: Deployment, done: Pki, out: Path, request: Request
) -> x509.Certificate:
    """pki succeeded and wrote a certificate for ``request`` issued by the EST CA."""
    assert done.returncode == 0, done.log
    assert out.is_file(), done.log
    certificate = x509.load_der_x509_certificate(out.read_bytes())
    assert certificate.subject.public_bytes() == request.subject_der
    key = serialization.load_der_private_key(request.key.read_bytes(), None)
    assert certificate.public_key() == key.public_key()
    est_ca = est.certificate("est-ca.pem")
    certificate.verify_directly_issued_by(est_ca)
    # The whole chain, as a TLS server would check the client later.
    pem = out.with_suffix(".pem")
    pem.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    verified = openssl(
        "verify", "-CAfile", str(est.pki / "factory_ca.pem"),
        "-untrusted", str(est.pki / "est-ca.pem"), "-purpose", "sslclient", str(pem),
    )  # fmt: skip
    assert verified == f"{pem}: OK\n".encode()
    # pki checks the new certificate against its --cacert chain, too.
    assert "Issued certificate is trusted" in done.log, done.log
    return certificate


def test_estca_stores_the_self_signed_root_and_the_est_ca(
    est: Deployment, pki_tool: str
) -> None:
    """``pki --estca`` fetches /cacerts over TLS and stores the factory root and
    the EST CA, byte for byte, recognising the root as the TLS trust anchor."""
    caout = est.scratch / "cacerts" / "ca.der"
    caout.parent.mkdir()
    done = pki(
        pki_tool, "--estca", "--url", est.url,
        "--cacert", est.pki / "factory_ca.pem", "--caout", caout,
    )  # fmt: skip
    assert done.returncode == 0, done.log
    root = est.certificate("factory_ca.pem").public_bytes(serialization.Encoding.DER)
    est_ca = est.certificate("est-ca.pem").public_bytes(serialization.Encoding.DER)
    assert caout.read_bytes() == root
    assert (caout.parent / "ca-1.der").read_bytes() == est_ca
    assert sorted(p.name for p in caout.parent.iterdir()) == ["ca-1.der", "ca.der"]
    assert "Root CA equals trusted TLS Root CA" in done.log, done.log
    assert re.search(r"negotiated TLS 1\.[23] using suite TLS_", done.log), done.log
    est.log_line(r'"GET /\.well-known/est/cacerts" 200 ')


def test_enroll_with_http_basic_auth(est: Deployment, pki_tool: str) -> None:
    """``pki --est --userpass`` enrolls a fresh key for CN=<user> and gets a
    certificate from the EST CA (200, one-line base64)."""
    request = make_request(
        pki_tool, est.scratch / "basic", "first", f"CN={ENROLL_USER}"
    )
    out = est.scratch / "basic" / "first.der"
    done = est.est(request, out, "--userpass", f"{ENROLL_USER}:{ENROLL_PASSWORD}")
    certificate = assert_issued(est, done, out, request)
    assert certificate.subject.rfc4514_string() == f"CN={ENROLL_USER}"
    est.log_line(
        r'"POST /\.well-known/est/simpleenroll" 200 .* '
        f"user={ENROLL_USER} issued_serial={serial_hex(certificate.serial_number)} "
    )


def test_wrong_password_gets_no_certificate(est: Deployment, pki_tool: str) -> None:
    """A wrong Basic password makes pki fail with HTTP 401 and write nothing."""
    request = make_request(pki_tool, est.scratch / "wrong", "req", f"CN={ENROLL_USER}")
    out = est.scratch / "wrong" / "cert.der"
    done = est.est(request, out, "--userpass", f"{ENROLL_USER}:not-the-password")
    assert done.returncode != 0
    assert "EST request failed: HTTP 401" in done.log, done.log
    assert out.read_bytes() == b""
    est.log_line(r'"POST /\.well-known/est/simpleenroll" 401 ')


def test_reenroll_over_mutual_tls(est: Deployment, pki_tool: str) -> None:
    """A certificate pki got by Basic auth re-enrolls a new key over mutual TLS
    (``--cert``/``--key``), for the same subject."""
    work = est.scratch / "reenroll"
    first = make_request(pki_tool, work, "first", f"CN={ENROLL_USER}")
    first_out = work / "first.der"
    done = est.est(first, first_out, "--userpass", f"{ENROLL_USER}:{ENROLL_PASSWORD}")
    old = assert_issued(est, done, first_out, first)

    renewal = make_request(pki_tool, work, "renewal", f"CN={ENROLL_USER}")
    out = work / "renewal.der"
    done = est.est(renewal, out, "--cert", first_out, "--key", first.key)
    new = assert_issued(est, done, out, renewal)
    assert f"sending TLS client certificate 'CN={ENROLL_USER}'" in done.log
    assert new.subject.public_bytes() == old.subject.public_bytes()
    assert new.serial_number != old.serial_number
    est.log_line(
        r'"POST /\.well-known/est/simplereenroll" 200 .* '
        f'client="CN={ENROLL_USER}" client_serial={serial_hex(old.serial_number)} '
        f"issued_serial={serial_hex(new.serial_number)} "
    )


def test_fioconfig_device_renews_with_pki(est: Deployment, pki_tool: str) -> None:
    """A Foundries device certificate (UTF8String subject) renews with pki when
    the request copies its subject bytes via ``pki --dn --format hex``."""
    device = est.pki / "device.pem"
    done = run([pki_tool, "--dn", "--in", str(device), "--format", "hex"])
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    subject_hex = done.stdout.decode().strip()
    device_certificate = est.certificate("device.pem")
    assert bytes.fromhex(subject_hex) == device_certificate.subject.public_bytes()
    work = est.scratch / "device"
    request = make_request(pki_tool, work, "renewal", f"asn1dn:#{subject_hex}")
    out = work / "renewal.der"
    renewed = est.est(request, out, "--cert", device, "--key", est.pki / "device.key")
    certificate = assert_issued(est, renewed, out, request)
    assert certificate.subject == device_certificate.subject
    est.log_line(
        r'"POST /\.well-known/est/simplereenroll" 200 .* '
        f"client_serial={serial_hex(device_certificate.serial_number)} "
        f"issued_serial={serial_hex(certificate.serial_number)} "
    )


def test_pki_polls_a_202_until_an_operator_approves(
    manual: Deployment, pki_tool: str
) -> None:
    """With manual approval pki gets 202, polls at the Retry-After interval, and
    gets its certificate once ``estctl approve`` has approved the request."""
    work = manual.scratch / "polling"
    request = make_request(pki_tool, work, "req", f"CN={MANUAL_USER}")
    out, log = work / "cert.der", work / "pki.log"
    command = manual.est_command(
        request, "--userpass", f"{MANUAL_USER}:{MANUAL_PASSWORD}",
        "--interval", "1", "--maxpolltime", "60",
    )  # fmt: skip
    with open(out, "wb") as stdout, open(log, "wb") as stderr:
        client = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr
        )
    try:
        manual.log_line(r'"POST /\.well-known/est/simpleenroll" 202 ')
        (pending,) = json.loads(manual.estctl("pending", "list", "--json"))
        assert (pending["status"], pending["subject"], pending["user"]) == (
            "pending",
            f"CN={MANUAL_USER}",
            MANUAL_USER,
        )
        manual.estctl("approve", str(pending["id"]))
        returncode = client.wait(timeout=60)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    done = Pki(returncode, log.read_text(errors="replace"))
    certificate = assert_issued(manual, done, out, request)
    assert (
        f"EST request pending, polling every {MANUAL_RETRY_AFTER} seconds "
        "up to 60 seconds" in done.log
    ), done.log
    manual.log_line(
        r'"POST /\.well-known/est/simpleenroll" 200 .* '
        f"user={MANUAL_USER} issued_serial={serial_hex(certificate.serial_number)} "
    )
    (issued,) = json.loads(
        manual.estctl("pending", "list", "--status", "issued", "--json")
    )
    assert issued["certificate_serial"] == serial_hex(certificate.serial_number)
