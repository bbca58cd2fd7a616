"""End to end: the real ``twistd est`` on loopback, driven by curl and openssl.

This is what a Foundries device does when fioconfig renews its certificate,
replayed with the tools an operator has: openssl makes the key and CSR, curl
posts it over mutual TLS, openssl checks what came back.  Servers are shared
per module and always stopped in teardown, even when a test fails.
"""

from __future__ import annotations

import os
import re
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7

from tests.e2e_support import (
    EKU_CLIENT_AUTH_ONLY,
    KU_DIGITAL_SIGNATURE,
    OID_EXT_KEY_USAGE,
    OID_KEY_USAGE,
    Csr,
    EstServer,
    HttpResponse,
    body_certificates,
    certificate_extensions,
    certificate_subject_der,
    crlf_base64,
    csr_subject_der,
    curl,
    curl_response,
    fioconfig_csr,
    free_port,
    kill_pid,
    openssl,
    p256_key,
    poll,
    process_gone,
    reenroll,
    run,
    signed_by_another_key,
    subject_csr,
    twistd_command,
)

PKCS7_MIME = b"application/pkcs7-mime"
CERTS_ONLY = b"application/pkcs7-mime; smime-type=certs-only"
REQUEST_LINE = re.compile(r'\[estd#info\] 127\.0\.0\.1 "(\S+) (\S+)" (\d{3}) ')


@dataclass(frozen=True)
class DemoPki:
    """The demo PKI written by ``estctl demo`` and the port its est.ini names."""

    directory: Path
    port: int
    scratch: Path

    def __truediv__(self, name: str) -> Path:
        """A file of the PKI directory."""
        return self.directory / name


@dataclass(frozen=True)
class Renewal:
    """One fioconfig-style renewal against the shared server, and its result."""

    csr: Csr
    response: HttpResponse
    pkcs7_der: bytes
    cert_pem: Path
    cert_der: bytes


def _server(pki: DemoPki, name: str, port: int, *est_args: str) -> Iterator[EstServer]:
    server = EstServer(pki.scratch / name, port, list(est_args))
    try:
        server.start()
        server.wait_until_listening()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DemoPki:
    """A demo PKI made by the operator's command, ``estctl demo DIR --port P``."""
    scratch = tmp_path_factory.mktemp("e2e")
    port = free_port()
    done = run(
        [sys.executable, "-m", "estd.estctl", "demo", str(scratch / "pki"),
         "--port", str(port), "--devices", "2"]
    )  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()
    return DemoPki(scratch / "pki", port, scratch)


@pytest.fixture(scope="module")
def server(pki: DemoPki) -> Iterator[EstServer]:
    """``twistd -n est --config est.ini``, exactly as ``make run`` starts it."""
    yield from _server(pki, "server", pki.port, "--config", str(pki / "est.ini"))


@pytest.fixture(scope="module")
def rfc7030_server(pki: DemoPki) -> Iterator[EstServer]:
    """The same est.ini with the response profile overridden on the command line."""
    port = free_port()
    yield from _server(
        pki, "rfc7030", port,
        "--config", str(pki / "est.ini"),
        "--response-profile", "rfc7030",
        "--listen", f"tcp:{port}:interface=127.0.0.1",
    )  # fmt: skip


@pytest.fixture(scope="module")
def go_flags_server(pki: DemoPki) -> Iterator[EstServer]:
    """No est.ini: only the flags the Go server took (with twistd's dashes)."""
    port = free_port()
    yield from _server(
        pki, "go-flags", port,
        "--tls-cert", str(pki / "local-tls.pem"),
        "--tls-key", str(pki / "local-tls.key"),
        "--root-cert", str(pki / "factory_ca.pem"),
        "--ca-cert", str(pki / "est-ca.pem"),
        "--ca-key", str(pki / "est-ca.key"),
        "--client-cas", str(pki / "client-cas.pem"),
        "--port", str(port),
    )  # fmt: skip


def _renew(
    server: EstServer, pki: DemoPki, cert: Path, key: Path, name: str
) -> Renewal:
    work = server.workdir / name
    csr = fioconfig_csr(cert, work, name)
    response = reenroll(server, pki.directory, cert, key, csr.body, work)
    assert response.status_line.startswith(b"HTTP/1.1 20"), response
    cert_pem, pkcs7_der = body_certificates(response.body, work, f"{name}-issued")
    certificates = pkcs7.load_der_pkcs7_certificates(pkcs7_der)
    cert_der = certificates[0].public_bytes(serialization.Encoding.DER)
    return Renewal(csr, response, pkcs7_der, cert_pem, cert_der)


@pytest.fixture(scope="module")
def renewal(server: EstServer, pki: DemoPki) -> Renewal:
    """device.pem renewed once through the shared server."""
    return _renew(server, pki, pki / "device.pem", pki / "device.key", "renewal")


def _request_lines(server: EstServer) -> list[str]:
    return [
        line for line in server.log_text().splitlines() if REQUEST_LINE.search(line)
    ]


def _openssl_field(cert: Path, option: str) -> str:
    text = openssl("x509", "-in", str(cert), "-noout", option, "-nameopt", "RFC2253")
    return text.decode().strip().split("=", 1)[1]


# --- simplereenroll as fioconfig sees it ----------------------------------------------


def test_csr_subject_is_a_byte_copy_of_the_device_subject(
    renewal: Renewal, pki: DemoPki
) -> None:
    """The CSR the test posts carries device.pem's subject bytes, as fioconfig's."""
    device = x509.load_pem_x509_certificate((pki / "device.pem").read_bytes())
    device_der = device.public_bytes(serialization.Encoding.DER)
    assert csr_subject_der(renewal.csr.der) == certificate_subject_der(device_der)
    der_file = renewal.cert_pem.with_name("renewal.csr.der")
    der_file.write_bytes(renewal.csr.der)
    assert run(["base64", "-w0", str(der_file)]).stdout == renewal.csr.body


def test_reenroll_answers_201_created(renewal: Renewal) -> None:
    """A fioconfig renewal gets the status line old fioconfig releases require."""
    assert renewal.response.status_line == b"HTTP/1.1 201 Created"


def test_reenroll_headers_are_exact(renewal: Renewal) -> None:
    """The renewal response has the exact type, a true length and base64 CTE."""
    response = renewal.response
    assert response.header("Content-Type") == PKCS7_MIME
    assert response.header("Content-Length") == str(len(response.body)).encode()
    assert response.header_values("Transfer-Encoding") == []
    assert response.header("Content-Transfer-Encoding") == b"base64"


def test_reenroll_body_is_wrapped_base64_of_a_one_certificate_pkcs7(
    renewal: Renewal,
) -> None:
    """The body is 64-column CRLF base64 of a PKCS#7 holding just the new cert."""
    assert renewal.response.body == crlf_base64(renewal.pkcs7_der)
    assert len(pkcs7.load_der_pkcs7_certificates(renewal.pkcs7_der)) == 1
    printed = renewal.cert_pem.read_bytes()
    assert printed.count(b"-----BEGIN CERTIFICATE-----") == 1


def test_issued_certificate_passes_fioconfig_checks(renewal: Renewal) -> None:
    """Subject bytes, KeyUsage and ExtKeyUsage are exactly what fioconfig checks."""
    assert certificate_subject_der(renewal.cert_der) == csr_subject_der(renewal.csr.der)
    extensions = certificate_extensions(renewal.cert_der)
    assert extensions[OID_KEY_USAGE] == (True, KU_DIGITAL_SIGNATURE)
    assert extensions[OID_EXT_KEY_USAGE][1] == EKU_CLIENT_AUTH_ONLY
    issued = x509.load_der_x509_certificate(renewal.cert_der)
    csr = x509.load_der_x509_csr(renewal.csr.der)
    assert issued.public_key() == csr.public_key()


def test_issued_certificate_verifies_against_the_est_ca(
    renewal: Renewal, pki: DemoPki
) -> None:
    """openssl verifies the new certificate for client use with the EST CA alone."""
    out = openssl(
        "verify", "-partial_chain", "-purpose", "sslclient",
        "-CAfile", str(pki / "est-ca.pem"), str(renewal.cert_pem),
    )  # fmt: skip
    assert out.strip() == f"{renewal.cert_pem}: OK".encode()


def test_renewed_certificate_renews_again(
    renewal: Renewal, server: EstServer, pki: DemoPki
) -> None:
    """A device renews with the certificate it just got (the EST CA is an anchor)."""
    again = _renew(server, pki, renewal.cert_pem, renewal.csr.key, "second")
    assert again.response.status_line == b"HTTP/1.1 201 Created"
    assert certificate_subject_der(again.cert_der) == certificate_subject_der(
        renewal.cert_der
    )
    assert again.cert_der != renewal.cert_der


def test_device_sending_its_chain_renews(server: EstServer, pki: DemoPki) -> None:
    """A client.pem holding the device cert and its device CA still renews."""
    bundle = server.workdir / "device-bundle.pem"
    bundle.write_bytes(
        (pki / "device.pem").read_bytes() + (pki / "client-cas.pem").read_bytes()
    )
    csr = fioconfig_csr(pki / "device.pem", server.workdir / "bundle", "bundle")
    response = reenroll(
        server, pki.directory, bundle, pki / "device.key", csr.body, server.workdir
    )
    assert response.status_line == b"HTTP/1.1 201 Created"


# --- Other operations, profiles and command lines -------------------------------------


def test_cacerts_is_anonymous_and_holds_root_and_est_ca(
    server: EstServer, pki: DemoPki
) -> None:
    """GET /cacerts without a client certificate returns the root and EST CA."""
    response = curl_response(
        server, "--cacert", str(pki / "factory_ca.pem"), server.url("cacerts")
    )
    assert response.status_line == b"HTTP/1.1 200 OK"
    assert response.header("Content-Type") == PKCS7_MIME
    assert response.header("Content-Transfer-Encoding") == b"base64"
    assert response.header("Content-Length") == str(len(response.body)).encode()
    pem, der = body_certificates(response.body, server.workdir, "cacerts")
    assert response.body == crlf_base64(der)
    assert pem.read_bytes().count(b"-----BEGIN CERTIFICATE-----") == 2
    served = {
        c.public_bytes(serialization.Encoding.DER)
        for c in pkcs7.load_der_pkcs7_certificates(der)
    }
    expected = {
        x509.load_pem_x509_certificate((pki / name).read_bytes()).public_bytes(
            serialization.Encoding.DER
        )
        for name in ("factory_ca.pem", "est-ca.pem")
    }
    assert served == expected


def test_rfc7030_profile_on_the_command_line_wins_over_the_file(
    rfc7030_server: EstServer, pki: DemoPki
) -> None:
    """--response-profile rfc7030 answers 200 OK with the certs-only type."""
    result = _renew(rfc7030_server, pki, pki / "device.pem", pki / "device.key", "rfc")
    assert result.response.status_line == b"HTTP/1.1 200 OK"
    assert result.response.header("Content-Type") == CERTS_ONLY
    assert len(pkcs7.load_der_pkcs7_certificates(result.pkcs7_der)) == 1


def test_go_server_flags_work_without_a_config_file(
    go_flags_server: EstServer, pki: DemoPki
) -> None:
    """The Go server's flags alone serve /cacerts and renew a device."""
    cacerts = curl_response(
        go_flags_server, "--cacert", str(pki / "factory_ca.pem"),
        go_flags_server.url("cacerts"),
    )  # fmt: skip
    assert cacerts.status_line == b"HTTP/1.1 200 OK"
    result = _renew(go_flags_server, pki, pki / "device.pem", pki / "device.key", "go")
    assert result.response.status_line == b"HTTP/1.1 201 Created"


# --- Refusals -------------------------------------------------------------------------


def test_tls_1_1_is_refused(server: EstServer, pki: DemoPki) -> None:
    """A client capped at TLS 1.1 gets a protocol_version alert; TLS 1.2 works."""
    refused = curl(
        server, "--tlsv1.0", "--tls-max", "1.1", "--ciphers", "DEFAULT:@SECLEVEL=0",
        "--cacert", str(pki / "factory_ca.pem"), "-o", os.devnull,
        server.url("cacerts"),
    )  # fmt: skip
    assert refused.returncode == 35, refused.stderr
    assert b"alert protocol version" in refused.stderr
    poll(
        lambda: "unsupported protocol" in server.log_text(), "the handshake failure log"
    )
    allowed = curl_response(
        server, "--tlsv1.2", "--tls-max", "1.2",
        "--cacert", str(pki / "factory_ca.pem"), server.url("cacerts"),
    )  # fmt: skip
    assert allowed.status_line == b"HTTP/1.1 200 OK"


def test_certificate_request_names_no_cas(server: EstServer, pki: DemoPki) -> None:
    """The server asks for a client certificate without CA names (Go then sends it)."""
    done = run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{server.port}",
         "-servername", "localhost", "-CAfile", str(pki / "factory_ca.pem"),
         "-verify_return_error"]
    )  # fmt: skip
    assert b"No client certificate CA names sent" in done.stdout, done.stdout
    assert b"Verify return code: 0 (ok)" in done.stdout


def test_tls_1_2_without_aead_is_refused(server: EstServer, pki: DemoPki) -> None:
    """A TLS 1.2 client offering only a CBC suite gets a handshake_failure alert."""
    done = curl(
        server, "--tlsv1.2", "--tls-max", "1.2",
        "--ciphers", "ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES128-SHA",
        "--cacert", str(pki / "factory_ca.pem"), "-o", os.devnull,
        server.url("cacerts"),
    )  # fmt: skip
    assert done.returncode == 35, done.stderr
    assert b"alert handshake failure" in done.stderr


def test_device_key_not_matching_the_certificate_gets_nothing(
    server: EstServer, pki: DemoPki
) -> None:
    """With another device's key curl sends no request, so nothing is issued."""
    issued_before = server.log_text().count("issued_serial=")
    wrong_key = pki / "devices" / "device-1.key"
    csr = fioconfig_csr(pki / "device.pem", server.workdir / "wrong", "wrong")
    body = server.workdir / "wrong.b64"
    body.write_bytes(csr.body)
    server.posted_bodies.append(csr.body)
    done = curl(
        server, "-i", "--cacert", str(pki / "factory_ca.pem"),
        "--cert", str(pki / "device.pem"), "--key", str(wrong_key),
        "-H", "Content-Type: application/pkcs10", "--data-binary", f"@{body}",
        server.url("simplereenroll"),
    )  # fmt: skip
    assert done.returncode == 58, done.stderr  # curl: the client key is unusable
    assert b"HTTP/" not in done.stdout
    assert server.log_text().count("issued_serial=") == issued_before


def test_csr_signed_by_another_key_is_refused(server: EstServer, pki: DemoPki) -> None:
    """A CSR whose signature is not by its own key fails proof of possession (400)."""
    work = server.workdir / "pop"
    csr = fioconfig_csr(pki / "device.pem", work, "pop")
    forged = signed_by_another_key(csr.der, p256_key(work / "other.key"))
    body = Csr(csr.key, forged).body
    response = reenroll(
        server, pki.directory, pki / "device.pem", pki / "device.key", body, work
    )
    assert response.status_line == b"HTTP/1.1 400 Bad Request"
    assert response.header("Content-Type") == b"text/plain; charset=utf-8"
    assert (
        response.body == b"the CSR signature does not verify (no proof of possession)\n"
    )


def test_csr_for_another_subject_is_refused(server: EstServer, pki: DemoPki) -> None:
    """A device cannot renew into another subject (403, one plain sentence)."""
    work = server.workdir / "other-subject"
    csr = subject_csr("/CN=someone-else/OU=demo-factory", work, "other")
    response = reenroll(
        server, pki.directory, pki / "device.pem", pki / "device.key", csr.body, work
    )
    assert response.status_line == b"HTTP/1.1 403 Forbidden"
    assert response.body == b"CSR subject does not match the client certificate\n"


def test_client_certificate_from_the_factory_root_is_refused(
    server: EstServer, pki: DemoPki
) -> None:
    """The factory root is no client anchor: its device certs fail the handshake."""
    work = server.workdir / "rogue"
    work.mkdir()
    key = p256_key(work / "rogue.key")
    cert = work / "rogue.pem"
    openssl(
        "req", "-x509", "-new", "-key", str(key), "-subj", "/CN=rogue/OU=demo-factory",
        "-CA", str(pki / "factory_ca.pem"), "-CAkey", str(pki / "factory_ca.key"),
        "-days", "1", "-addext", "basicConstraints=critical,CA:FALSE",
        "-addext", "extendedKeyUsage=clientAuth", "-out", str(cert),
    )  # fmt: skip
    csr = fioconfig_csr(cert, work, "rogue-csr")
    body = work / "rogue.b64"
    body.write_bytes(csr.body)
    server.posted_bodies.append(csr.body)
    done = curl(
        server, "-i", "--cacert", str(pki / "factory_ca.pem"),
        "--cert", str(cert), "--key", str(key),
        "-H", "Content-Type: application/pkcs10", "--data-binary", f"@{body}",
        server.url("simplereenroll"),
    )  # fmt: skip
    assert done.returncode in (35, 56), done
    assert b"alert unknown ca" in done.stderr
    assert b"HTTP/" not in done.stdout


# --- The server log -------------------------------------------------------------------


def test_log_has_one_line_per_request_with_subject_and_serial(
    server: EstServer, pki: DemoPki
) -> None:
    """Each request logs one line; a renewal's names the client and the new serial."""
    before = len(_request_lines(server))
    curl_response(
        server, "--cacert", str(pki / "factory_ca.pem"), server.url("cacerts")
    )
    renewed = _renew(server, pki, pki / "device.pem", pki / "device.key", "logged")
    work = server.workdir / "logged-403"
    other = subject_csr("/CN=not-me/OU=demo-factory", work, "other")
    reenroll(
        server, pki.directory, pki / "device.pem", pki / "device.key", other.body, work
    )
    poll(lambda: len(_request_lines(server)) >= before + 3, "three request log lines")
    lines = _request_lines(server)[before:]
    assert len(lines) == 3, lines
    subject = _openssl_field(pki / "device.pem", "-subject")
    serial = _openssl_field(renewed.cert_pem, "-serial")
    cacerts, issued, refused = lines
    assert '"GET /.well-known/est/cacerts" 200 ' in cacerts
    assert "client=" not in cacerts
    assert '"POST /.well-known/est/simplereenroll" 201 ' in issued
    assert f'client="{subject}"' in issued
    assert f"issued_serial={serial} " in issued
    assert '"POST /.well-known/est/simplereenroll" 403 ' in refused
    assert f'client="{subject}"' in refused
    assert "issued_serial=" not in refused


def test_logs_never_contain_csrs_or_private_keys(
    renewal: Renewal,
    server: EstServer,
    rfc7030_server: EstServer,
    go_flags_server: EstServer,
) -> None:
    """No server log holds a posted CSR (or a piece of one) or a private key."""
    servers = (server, rfc7030_server, go_flags_server)
    bodies = [body for each in servers for body in each.posted_bodies]
    assert renewal.csr.body in bodies
    for each in servers:
        log = each.log_text()
        assert "starting on" in log
        assert "PRIVATE KEY" not in log
        for body in bodies:
            assert body[16:56].decode() not in log


# --- Configuration errors and daemon mode ---------------------------------------------


def _variant_ini(pki: DemoPki, name: str, old: str, new: str) -> Path:
    text = (pki / "est.ini").read_text()
    assert old in text
    path = pki / name
    path.write_text(text.replace(old, new))
    return path


@pytest.mark.parametrize("case", ["unknown-key", "ca-key-mismatch", "missing-flag"])
def test_config_error_exits_before_listening_with_one_line(
    case: str, pki: DemoPki, tmp_path: Path
) -> None:
    """A bad setting stops twistd with status 2 and one stderr line naming it."""
    port = free_port()
    if case == "unknown-key":
        ini = _variant_ini(pki, "unknown-key.ini", "[est]\n", "[est]\ncolour = blue\n")
        argv = ["--config", str(ini)]
        expected = f"estd: configuration error: {ini}: colour: unknown key"
    elif case == "ca-key-mismatch":
        ini = _variant_ini(pki, "wrong-ca-key.ini", "= est-ca.key", "= device-ca.key")
        argv = ["--config", str(ini)]
        expected = (
            f"estd: configuration error: {ini}: ca-key: the private key does not "
            f"belong to the CA certificate ({pki / 'est-ca.pem'})"
        )
    else:
        argv = [
            "--tls-cert", str(pki / "local-tls.pem"),
            "--tls-key", str(pki / "local-tls.key"),
            "--root-cert", str(pki / "factory_ca.pem"),
            "--ca-cert", str(pki / "est-ca.pem"),
        ]  # fmt: skip
        expected = (
            "estd: configuration error: the command line: ca-key: "
            "is required but not set"
        )
    done = run(
        [*twistd_command(), "-n", "--pidfile", str(tmp_path / "twistd.pid"), "est",
         *argv, "--listen", f"tcp:{port}:interface=127.0.0.1", "--admin-listen="],
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.decode().splitlines() == [expected]
    assert done.stderr.endswith(b"\n")
    assert b"starting on" not in done.stdout
    assert not (tmp_path / "twistd.pid").exists()


def test_daemon_mode_starts_serves_and_stops_on_sigterm(
    pki: DemoPki, tmp_path: Path
) -> None:
    """Without -n twistd daemonises, writes its pidfile, serves, stops on SIGTERM."""
    daemon = EstServer(tmp_path, free_port(), [])
    pidfile = tmp_path / "estd.pid"
    pid: int | None = None
    try:
        started = run(
            [*twistd_command(), "--pidfile", str(pidfile), "--logfile",
             str(daemon.log_path), "est", "--config", str(pki / "est.ini"),
             "--listen", f"tcp:{daemon.port}:interface=127.0.0.1",
             "--admin-listen="],
            cwd=tmp_path,
        )  # fmt: skip
        assert started.returncode == 0, started.stderr
        pid = int(
            poll(lambda: pidfile.exists() and pidfile.read_text().strip(), "pidfile")
        )
        poll(lambda: f"starting on {daemon.port}" in daemon.log_text(), "listening")
        renewed = _renew(daemon, pki, pki / "device.pem", pki / "device.key", "daemon")
        assert renewed.response.status_line == b"HTTP/1.1 201 Created"
        serial = _openssl_field(renewed.cert_pem, "-serial")
        os.kill(pid, signal.SIGTERM)
        poll(lambda: not pidfile.exists(), "the pidfile to be removed")
        poll(lambda: process_gone(pid), "the daemon to exit")
        log = daemon.log_text()
        lines = [line for line in log.splitlines() if REQUEST_LINE.search(line)]
        assert len(lines) == 1
        assert f"issued_serial={serial} " in lines[0]
        assert "PRIVATE KEY" not in log
    finally:
        if pid is None and pidfile.exists():
            pid = int(pidfile.read_text().strip() or 0) or None
        if pid is not None:
            kill_pid(pid)


@pytest.mark.parametrize("version", ["TLSv1_3", "TLSv1_2"])
def test_no_session_tickets(server: EstServer, pki: DemoPki, version: str) -> None:
    """The server sends no session ticket: devices never resume, tickets cost CPU."""
    import socket
    import ssl

    context = ssl.create_default_context(cafile=str(pki / "factory_ca.pem"))
    context.maximum_version = getattr(ssl.TLSVersion, version)
    with socket.create_connection(("127.0.0.1", server.port)) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(
                b"GET /.well-known/est/cacerts HTTP/1.1\r\nHost: localhost\r\n"
                b"Connection: close\r\n\r\n"
            )
            received = b""
            while chunk := tls.recv(65536):
                received += chunk
            assert received.startswith(b"HTTP/1.1 200 OK\r\n")
            assert tls.version() == version.replace("_", ".").replace(
                "TLSv1.", "TLSv1."
            )
            assert tls.session is not None
            assert not tls.session.has_ticket
