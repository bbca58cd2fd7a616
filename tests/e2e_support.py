"""Helpers for the end-to-end tests: a real ``twistd est``, curl and openssl.

Everything here drives real processes: the server is started through the
``twistd`` entry point with the plugin found via ``PYTHONPATH``, clients are
the ``curl`` and ``openssl`` binaries on ``PATH``.  Waiting is always a
bounded poll on a condition (a log line, a file), never a fixed sleep.
"""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

# One copy of these for the bench and the tests: the bench's (re-exported).
from bench.server import free_port as free_port
from bench.server import server_env as server_env
from bench.server import twistd_command as twistd_command

EST_PATH = "/.well-known/est"
START_TIMEOUT = 15.0
"""Seconds a server may take to listen; generous for loaded CI machines."""

T = TypeVar("T")


# --- Processes and polling ------------------------------------------------------------


def poll(
    condition: Callable[[], T], what: str, timeout: float = 5.0, interval: float = 0.02
) -> T:
    """Return ``condition()``'s first truthy value, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)  # a poll interval, not a synchronisation sleep


def run(
    argv: list[str], *, cwd: Path | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[bytes]:
    """Run a program and capture its output (never raises on exit status)."""
    return subprocess.run(
        argv,
        cwd=cwd,
        env=server_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=timeout,
        check=False,
    )


def openssl(*args: str, cwd: Path | None = None) -> bytes:
    """Run ``openssl`` and return its stdout; fail the test on a non-zero exit."""
    done = run(["openssl", *args], cwd=cwd)
    assert done.returncode == 0, (
        f"openssl {' '.join(args)} failed: {done.stderr.decode(errors='replace')}"
    )
    return done.stdout


def process_gone(pid: int) -> bool:
    """True if ``pid`` no longer runs (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def kill_pid(pid: int) -> None:
    """SIGKILL a process we started, if it still runs."""
    if not process_gone(pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# --- The server -----------------------------------------------------------------------


@dataclass
class EstServer:
    """One ``twistd -n est`` process on a loopback port, logging to a file."""

    workdir: Path
    port: int
    est_args: list[str]
    process: subprocess.Popen[bytes] | None = None
    posted_bodies: list[bytes] = field(default_factory=list)
    admin_listen: str = ""
    """``--admin-listen``; empty (off) by default, so that test servers do not
    all try to bind the default 127.0.0.1:9443.  ``est_args`` may override it."""

    @property
    def log_path(self) -> Path:
        """Where twistd's stdout and stderr (the server log) go."""
        return self.workdir / "twistd.log"

    def start(self) -> None:
        """Start twistd in the foreground (``-n``) in its own work directory."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [
                    *twistd_command(),
                    "-n",
                    "--pidfile",
                    str(self.workdir / "twistd.pid"),
                    "est",
                    f"--admin-listen={self.admin_listen}",
                    *self.est_args,
                ],
                cwd=self.workdir,
                env=server_env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def wait_until_listening(self) -> None:
        """Poll the log for Twisted's 'starting on PORT' (logged after listen())."""
        needle = f"starting on {self.port}"

        def listening() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(
                    f"twistd exited with {self.process.returncode}:\n{self.log_text()}"
                )
            # "serving EST on" comes once the reactor runs, after twistd
            # installed its signal handlers: signals are safe from then on.
            text = self.log_text()
            return needle in text and "serving EST on" in text

        poll(listening, f"twistd to listen on {self.port}", timeout=START_TIMEOUT)

    def stop(self) -> None:
        """Terminate the server (SIGTERM, then SIGKILL), whatever state it is in."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)

    def log_text(self) -> str:
        """Everything the server has logged so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def url(self, operation: str) -> str:
        """The URL of an EST operation, by host name as devices use it."""
        return f"https://localhost:{self.port}{EST_PATH}/{operation}"


# --- HTTP over curl -------------------------------------------------------------------


@dataclass(frozen=True)
class HttpResponse:
    """A response exactly as curl -i printed it."""

    status_line: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header_values(self, name: str) -> list[bytes]:
        """Every value of header ``name`` (matched case-insensitively)."""
        wanted = name.lower().encode()
        return [value for key, value in self.headers if key.lower() == wanted]

    def header(self, name: str) -> bytes:
        """The one value of header ``name``; fails if absent or repeated."""
        values = self.header_values(name)
        assert len(values) == 1, f"{name}: {values!r} in {self.headers!r}"
        return values[0]


def parse_curl_output(raw: bytes) -> HttpResponse:
    """Split ``curl -i`` output into status line, headers and body bytes."""
    while True:
        head, separator, rest = raw.partition(b"\r\n\r\n")
        assert separator, f"no header block in {raw[:200]!r}"
        lines = head.split(b"\r\n")
        if lines[0].split(b" ")[1:2] == [b"100"]:  # interim 100 Continue
            raw = rest
            continue
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers.append((name, value.strip()))
        return HttpResponse(lines[0], headers, rest)


def curl(server: EstServer, *args: str) -> subprocess.CompletedProcess[bytes]:
    """curl against ``server``: the demo host name pinned to 127.0.0.1."""
    return run(
        [
            "curl",
            "-sS",
            "--max-time",
            "10",
            "--resolve",
            f"localhost:{server.port}:127.0.0.1",
            *args,
        ]
    )


def curl_response(server: EstServer, *args: str) -> HttpResponse:
    """curl -i against ``server``; the transfer itself must succeed."""
    done = curl(server, "-i", *args)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return parse_curl_output(done.stdout)


def reenroll(
    server: EstServer, pki: Path, cert: Path, key: Path, body: bytes, workdir: Path
) -> HttpResponse:
    """POST ``body`` to simplereenroll the way fioconfig does, with curl."""
    workdir.mkdir(parents=True, exist_ok=True)
    body_file = workdir / f"body-{len(server.posted_bodies)}.b64"
    body_file.write_bytes(body)
    server.posted_bodies.append(body)
    return curl_response(
        server,
        "--cacert",
        str(pki / "factory_ca.pem"),
        "--cert",
        str(cert),
        "--key",
        str(key),
        "-H",
        "Content-Type: application/pkcs10",
        "--data-binary",
        f"@{body_file}",
        server.url("simplereenroll"),
    )


# --- Keys and CSRs with openssl -------------------------------------------------------

FIOCONFIG_EXTENSIONS = (
    "keyUsage=critical,digitalSignature\nextendedKeyUsage=critical,clientAuth\n"
)


@dataclass(frozen=True)
class Csr:
    """A CSR made with openssl, its key file and the body fioconfig posts."""

    key: Path
    der: bytes

    @property
    def body(self) -> bytes:
        """One-line padded base64, as ``base64 -w0`` writes it."""
        return base64.b64encode(self.der)


def p256_key(path: Path) -> Path:
    """A fresh P-256 private key written by openssl."""
    openssl(
        "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out",
        str(path),
    )  # fmt: skip
    return path


def fioconfig_csr(cert: Path, workdir: Path, name: str) -> Csr:
    """A CSR like fioconfig's: fresh P-256 key, the subject bytes of ``cert``.

    ``openssl x509 -x509toreq`` copies the certificate's subject Name as is;
    KeyUsage and ExtKeyUsage are requested critical, no SAN.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    key = p256_key(workdir / f"{name}.key")
    extensions = workdir / "fioconfig-ext.cnf"
    extensions.write_text(FIOCONFIG_EXTENSIONS)
    pem = workdir / f"{name}.csr.pem"
    openssl(
        "x509", "-x509toreq", "-in", str(cert), "-key", str(key),
        "-copy_extensions", "none", "-extfile", str(extensions), "-out", str(pem),
    )  # fmt: skip
    der = openssl("req", "-in", str(pem), "-outform", "DER")
    return Csr(key, der)


def subject_csr(subject: str, workdir: Path, name: str) -> Csr:
    """A fioconfig-shaped CSR for an arbitrary ``-subj`` subject."""
    workdir.mkdir(parents=True, exist_ok=True)
    key = p256_key(workdir / f"{name}.key")
    der = openssl(
        "req", "-new", "-key", str(key), "-subj", subject,
        "-addext", "keyUsage=critical,digitalSignature",
        "-addext", "extendedKeyUsage=critical,clientAuth",
        "-outform", "DER",
    )  # fmt: skip
    return Csr(key, der)


def body_certificates(body: bytes, workdir: Path, name: str) -> tuple[Path, bytes]:
    """Decode an EST PKCS#7 body; openssl writes its certificates as PEM.

    Returns the PEM file and the PKCS#7 DER.
    """
    der = base64.b64decode(body, validate=False)
    workdir.mkdir(parents=True, exist_ok=True)
    p7 = workdir / f"{name}.p7b"
    p7.write_bytes(der)
    pem = workdir / f"{name}.pem"
    openssl("pkcs7", "-inform", "DER", "-in", str(p7), "-print_certs", "-out", str(pem))
    return pem, der


def crlf_base64(der: bytes, line_length: int = 64) -> bytes:
    """The exact body estd promises: CRLF-joined base64 lines, one final CRLF."""
    text = base64.b64encode(der)
    lines = [text[i : i + line_length] for i in range(0, len(text), line_length)]
    return b"\r\n".join(lines) + b"\r\n"


# --- Raw DER, the way Go's crypto/x509 hands it to fioconfig --------------------------


def der_element(der: bytes, offset: int = 0) -> tuple[int, int, int]:
    """(tag, start of contents, end) of the DER element at ``offset``."""
    tag, length, pos = der[offset], der[offset + 1], offset + 2
    if length & 0x80:
        count = length & 0x7F
        length = int.from_bytes(der[pos : pos + count], "big")
        pos += count
    return tag, pos, pos + length


def der_children(der: bytes) -> list[bytes]:
    """The encoded elements inside the constructed element ``der``."""
    _, pos, end = der_element(der)
    children = []
    while pos < end:
        _, _, child_end = der_element(der, pos)
        children.append(der[pos:child_end])
        pos = child_end
    return children


def der_contents(der: bytes) -> bytes:
    """The contents octets of the element ``der``."""
    _, start, end = der_element(der)
    return der[start:end]


def der_length(length: int) -> bytes:
    """A DER length field."""
    if length < 0x80:
        return bytes([length])
    octets = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(octets)]) + octets


def certificate_subject_der(cert_der: bytes) -> bytes:
    """The subject Name of a DER certificate, byte for byte."""
    fields = der_children(der_children(cert_der)[0])
    if fields[0][0] == 0xA0:  # explicit version
        fields = fields[1:]
    return fields[4]  # serialNumber, signature, issuer, validity, subject


def csr_subject_der(csr_der: bytes) -> bytes:
    """The subject Name of a DER CSR, byte for byte."""
    return der_children(der_children(csr_der)[0])[1]


def certificate_extensions(cert_der: bytes) -> dict[bytes, tuple[bool, bytes]]:
    """Raw extensions of a DER certificate: OID DER -> (critical, extnValue)."""
    for item in der_children(der_children(cert_der)[0]):
        if item[0] == 0xA3:
            extensions = der_children(der_children(item)[0])
            break
    else:
        return {}
    found = {}
    for extension in extensions:
        parts = der_children(extension)
        critical = len(parts) == 3 and der_contents(parts[1]) == b"\xff"
        found[parts[0]] = (critical, der_contents(parts[-1]))
    return found


OID_KEY_USAGE = bytes.fromhex("0603551d0f")
OID_EXT_KEY_USAGE = bytes.fromhex("0603551d25")
EKU_CLIENT_AUTH_ONLY = bytes.fromhex("300a06082b06010505070302")
KU_DIGITAL_SIGNATURE = bytes.fromhex("03020780")


def signed_by_another_key(csr_der: bytes, other_key: Path) -> bytes:
    """``csr_der`` with its signature replaced by one from ``other_key``.

    The CSR still names its own public key, so its signature no longer
    proves possession of that key.
    """
    key = serialization.load_pem_private_key(other_key.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    info, algorithm, _ = der_children(csr_der)
    signature = b"\x00" + key.sign(info, ec.ECDSA(hashes.SHA256()))
    bit_string = b"\x03" + der_length(len(signature)) + signature
    contents = info + algorithm + bit_string
    return b"\x30" + der_length(len(contents)) + contents


# --- Operating a running server -------------------------------------------------------


def served_certificate(port: int, host: str = "127.0.0.1") -> bytes:
    """The DER certificate a new TLS connection to ``host:port`` is shown.

    The handshake is not verified (only the certificate is wanted); the
    server asks for a client certificate but does not require one.
    """
    import ssl

    pem = ssl.get_server_certificate((host, port), timeout=5)
    return ssl.PEM_cert_to_DER_cert(pem)


def http_get(url: str, timeout: float = 5) -> tuple[int, bytes, str]:
    """(status, body, Content-Type) of a plain-HTTP GET, error statuses included."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310
            return response.status, response.read(), response.headers["Content-Type"]
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read(), error.headers["Content-Type"]


def metric_value(text: str, name: str) -> float | None:
    """The value of the unlabelled sample ``name`` in Prometheus text, or None."""
    for line in text.splitlines():
        sample, _, value = line.partition(" ")
        if sample == name:
            return float(value)
    return None
