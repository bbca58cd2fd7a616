"""Unit tests of estd.config: est.ini and options in, a Config or a precise error."""

from __future__ import annotations

import dataclasses
import datetime
import functools
import os
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID

from estd.config import Config, load_config, parse_duration
from estd.demo import DemoPKI, make_pair
from estd.errors import ConfigError
from estd.policy import EnrollSubject
from estd.wire import ResponseProfile, decode_body
from tests.pki import NOW, demo_pki, write_pki


def write_ini(directory: Path, pki: DemoPKI | None = None) -> Path:
    """Write the (shared, unless given) demo PKI and its est.ini into ``directory``."""
    return Path(write_pki(str(directory), pki or demo_pki()))


def edit_ini(ini: Path, **changes: str | None) -> None:
    """Set (or with None, remove) est.ini keys; ``_`` in a name stands for ``-``."""
    lines = ini.read_text().splitlines()
    for name, value in changes.items():
        key = name.replace("_", "-")
        lines = [line for line in lines if not line.startswith(f"{key} =")]
        if value is not None:
            lines.append(f"{key} = {value}")
    ini.write_text("\n".join(lines) + "\n")


def load(ini: Path, now: datetime.datetime = NOW, **options: str) -> Config:
    """Load ``ini`` with command-line ``options`` (``_`` for ``-``)."""
    overrides = {name.replace("_", "-"): value for name, value in options.items()}
    return load_config(str(ini), overrides, now)


def config_error(
    ini: Path, now: datetime.datetime = NOW, **options: str
) -> ConfigError:
    """The ConfigError that loading ``ini`` raises."""
    with pytest.raises(ConfigError) as caught:
        load(ini, now, **options)
    return caught.value


@pytest.fixture
def ini(tmp_path: Path) -> Path:
    """A demo est.ini in a fresh directory."""
    return write_ini(tmp_path / "etc")


# --- A good configuration ----------------------------------------------------


def test_demo_config_loads(ini: Path) -> None:
    """The demo est.ini loads with the documented defaults for unset keys."""
    pki = demo_pki()
    config = load(ini)
    assert config.source == str(ini)
    assert config.listen == "tcp:8443:interface=127.0.0.1"
    assert config.threads == 4
    assert config.tls_certificates == (pki.tls.certificate,)
    label = config.default
    assert label.label == ""
    assert label.ca.certificate == pki.est_ca.certificate
    assert label.root_certificates == (pki.root.certificate,)
    assert label.client_cas == (pki.device_ca.certificate,)
    assert label.cert_duration == datetime.timedelta(hours=26280)
    assert label.response_profile is ResponseProfile.FIOCONFIG
    assert label.enroll_subject is EnrollSubject.MATCH
    assert label.base64_line_length == 64
    assert label.trust_anchors == (pki.est_ca.certificate, pki.device_ca.certificate)


def test_listen_defaults_to_port(ini: Path) -> None:
    """Without listen, estd listens on tcp:<port>."""
    edit_ini(ini, listen=None)
    assert load(ini).listen == "tcp:8443"
    edit_ini(ini, port="9443")
    assert load(ini).listen == "tcp:9443"


def test_cacerts_body_holds_root_and_est_ca(ini: Path) -> None:
    """The /cacerts body is 64-column CRLF base64 of a PKCS#7 with root and EST CA."""
    pki = demo_pki()
    body = load(ini).default.cacerts_body
    assert body.endswith(b"\r\n")
    assert all(len(line) == 64 for line in body.split(b"\r\n")[:-2])
    certificates = pkcs7.load_der_pkcs7_certificates(decode_body(body))
    der = functools.partial(
        x509.Certificate.public_bytes, encoding=serialization.Encoding.DER
    )
    assert sorted(map(der, certificates)) == sorted(
        map(der, [pki.root.certificate, pki.est_ca.certificate])
    )


def test_cacerts_body_one_line(ini: Path) -> None:
    """With base64-line-length 0 the /cacerts body is one line and a CRLF."""
    body = load(ini, base64_line_length="0").default.cacerts_body
    assert body.count(b"\r\n") == 1
    assert body.endswith(b"\r\n")


def test_command_line_wins(ini: Path) -> None:
    """A command-line option overrides the same key in est.ini."""
    edit_ini(ini, response_profile="fioconfig", cert_duration="90d")
    config = load(ini, response_profile="rfc7030", cert_duration="1h30m", threads="8")
    assert config.default.response_profile is ResponseProfile.RFC7030
    assert config.default.cert_duration == datetime.timedelta(minutes=90)
    assert config.threads == 8


def test_command_line_none_is_unset(ini: Path) -> None:
    """An option given as None (not passed to twistd) leaves the file's value."""
    edit_ini(ini, response_profile="rfc7030")
    config = load_config(str(ini), {"response-profile": None}, NOW)
    assert config.default.response_profile is ResponseProfile.RFC7030


def test_relative_paths_against_ini_directory(
    ini: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Relative paths in est.ini are read from the ini's directory, not the cwd."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert "ca-cert = est-ca.pem" in ini.read_text()
    config = load(ini)
    assert config.default.ca.certificate == demo_pki().est_ca.certificate


def test_relative_paths_in_subdirectory(
    ini: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relative path with a directory part is resolved under the ini's directory."""
    (ini.parent / "ca").mkdir()
    os.rename(ini.parent / "est-ca.pem", ini.parent / "ca" / "est-ca.pem")
    edit_ini(ini, ca_cert="ca/est-ca.pem")
    monkeypatch.chdir("/")
    assert load(ini).default.ca.certificate == demo_pki().est_ca.certificate


def test_command_line_paths_against_cwd(
    ini: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relative path on the command line is read from the working directory."""
    other = make_pair(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "other-root")]),
        None,
        ca=True,
        now=NOW,
    )
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "factory_ca.pem").write_bytes(other.cert_pem())
    monkeypatch.chdir(cwd)
    config = load(ini, root_cert="factory_ca.pem")
    assert config.default.root_certificates == (other.certificate,)


def test_encrypted_ca_key_with_passphrase_file(ini: Path) -> None:
    """An encrypted ca-key loads with the passphrase from ca-key-passphrase-file."""
    pki = demo_pki()
    (ini.parent / "est-ca.key").write_bytes(
        pki.est_ca.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"s3cret"),
        )
    )
    (ini.parent / "ca.pass").write_bytes(b"s3cret\n")
    edit_ini(ini, ca_key_passphrase_file="ca.pass")
    config = load(ini)
    assert config.default.ca.certificate == pki.est_ca.certificate


# --- Errors name the key and the file ----------------------------------------


@pytest.mark.parametrize(
    "key", ["tls-cert", "tls-key", "root-cert", "ca-cert", "ca-key"]
)
def test_missing_required_key_is_named(ini: Path, key: str) -> None:
    """Each required key left out is named in the error."""
    edit_ini(ini, **{key.replace("-", "_"): None})
    error = config_error(ini)
    assert error.key == key
    assert error.problem == "is required but not set"
    assert f"{key}: is required but not set" in str(error)


def test_missing_required_key_names_the_file(ini: Path) -> None:
    """A required key missing from est.ini is reported against est.ini."""
    edit_ini(ini, ca_key=None)
    error = config_error(ini)
    assert str(error) == f"{ini}: ca-key: is required but not set"


def test_unreadable_ini(tmp_path: Path) -> None:
    """A missing est.ini is named with the reason it cannot be read."""
    path = tmp_path / "nope" / "est.ini"
    with pytest.raises(ConfigError) as caught:
        load_config(str(path), {}, NOW)
    assert str(caught.value) == f"{path}: cannot read: No such file or directory"


def test_ini_is_a_directory(tmp_path: Path) -> None:
    """A directory given as est.ini is reported as unreadable."""
    with pytest.raises(ConfigError) as caught:
        load_config(str(tmp_path), {}, NOW)
    assert str(caught.value) == f"{tmp_path}: cannot read: Is a directory"


def test_unreadable_key_file(ini: Path) -> None:
    """A file named by a key that cannot be read names the key, the ini and the path."""
    edit_ini(ini, ca_key="missing.key")
    error = config_error(ini)
    path = ini.parent / "missing.key"
    assert str(error) == f"{ini}: ca-key: cannot read {path}: No such file or directory"


def test_unknown_key(ini: Path) -> None:
    """A misspelt key in est.ini is refused, naming it."""
    edit_ini(ini, cert_duraton="90d")
    error = config_error(ini)
    assert str(error) == f"{ini}: cert-duraton: unknown key"
    assert error.key == "cert-duraton"


def test_keys_are_case_sensitive(ini: Path) -> None:
    """Keys are lower-case; Port is not port."""
    with ini.open("a") as handle:
        handle.write("Port = 9443\n")
    assert str(config_error(ini)) == f"{ini}: Port: unknown key"


def test_unknown_option(ini: Path) -> None:
    """An unknown command-line option is refused, naming it and the command line."""
    assert (
        str(config_error(ini, colour="blue"))
        == "the command line: colour: unknown option"
    )


def test_unknown_section(ini: Path) -> None:
    """A section other than [est] is refused, naming it."""
    with ini.open("a") as handle:
        handle.write("[label:fleet]\nca-cert = est-ca.pem\n")
    error = config_error(ini)
    assert str(error) == f"{ini}: unknown section [label:fleet]; expected [est]"


def test_default_section_is_unknown(ini: Path) -> None:
    """A [DEFAULT] section gets no special meaning and is refused."""
    with ini.open("a") as handle:
        handle.write("[DEFAULT]\nport = 9443\n")
    assert str(config_error(ini)) == f"{ini}: unknown section [DEFAULT]; expected [est]"


def test_no_est_section(tmp_path: Path) -> None:
    """An est.ini without an [est] section is refused."""
    path = tmp_path / "est.ini"
    path.write_text("# empty\n")
    with pytest.raises(ConfigError) as caught:
        load_config(str(path), {}, NOW)
    assert str(caught.value) == f"{path}: has no [est] section"


def test_not_an_ini_file(tmp_path: Path) -> None:
    """A file that is not ini syntax is refused with the parser's first line."""
    path = tmp_path / "est.ini"
    path.write_text("port = 8443\n")
    with pytest.raises(ConfigError) as caught:
        load_config(str(path), {}, NOW)
    message = str(caught.value)
    assert message.startswith(f"{path}: not a valid ini file: ")
    assert "\n" not in message


def test_duplicate_key(ini: Path) -> None:
    """A key given twice in est.ini is refused, naming the key."""
    with ini.open("a") as handle:
        handle.write("port = 1\nport = 2\n")
    message = str(config_error(ini))
    assert message.startswith(f"{ini}: not a valid ini file: ")
    assert "'port'" in message


def test_tls_key_not_matching(ini: Path) -> None:
    """A tls-key that is not the tls-cert's key names tls-key."""
    edit_ini(ini, tls_key="est-ca.key")
    error = config_error(ini)
    assert (
        str(error)
        == f"{ini}: tls-key: does not belong to the first certificate in tls-cert"
    )


def test_ca_key_not_matching(ini: Path) -> None:
    """A ca-key that is not the ca-cert's key names ca-key and the certificate file."""
    edit_ini(ini, ca_key="local-tls.key")
    error = config_error(ini)
    ca_cert = ini.parent / "est-ca.pem"
    assert str(error) == (
        f"{ini}: ca-key: the private key does not belong to the CA certificate "
        f"({ca_cert})"
    )


def test_ca_cert_not_a_ca(ini: Path) -> None:
    """A ca-cert that is a device certificate is refused, naming ca-cert."""
    edit_ini(ini, ca_cert="device.pem", ca_key="device.key")
    error = config_error(ini)
    assert str(error) == (
        f"{ini}: ca-cert: the certificate is not a CA (BasicConstraints CA:FALSE)"
    )


def test_client_cas_not_a_ca(ini: Path) -> None:
    """A device certificate listed in client-cas is refused, naming it."""
    edit_ini(ini, client_cas="device.pem")
    subject = demo_pki().devices[0].certificate.subject.rfc4514_string()
    assert str(config_error(ini)) == (
        f"{ini}: client-cas: {subject}: the certificate is not a CA "
        "(BasicConstraints CA:FALSE)"
    )


def test_file_without_certificate(ini: Path) -> None:
    """A certificate key naming a key file says it holds no certificate."""
    edit_ini(ini, root_cert="est-ca.key")
    path = ini.parent / "est-ca.key"
    assert (
        str(config_error(ini)) == f"{ini}: root-cert: {path} holds no PEM certificate"
    )


def test_expired_ca(tmp_path: Path) -> None:
    """An EST CA expired at start-up is refused, naming ca-cert and the date."""
    pki = demo_pki()
    short_ca = make_pair(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "short-lived-ca")]),
        pki.root,
        ca=True,
        now=NOW,
        days=30,
    )
    ini = write_ini(tmp_path, dataclasses.replace(pki, est_ca=short_ca))
    later = NOW + datetime.timedelta(days=365)
    assert pki.tls.certificate.not_valid_after_utc > later
    expiry = short_ca.certificate.not_valid_after_utc
    assert str(config_error(ini, later)) == (
        f"{ini}: ca-cert: the certificate expired on {expiry:%Y-%m-%d}"
    )


def test_far_future_expires_tls_first(ini: Path) -> None:
    """Far in the future the TLS certificate is the first expired one reported."""
    later = NOW + datetime.timedelta(days=365 * 30)
    error = config_error(ini, later)
    assert error.key == "tls-cert"
    assert "the certificate expired on " in error.problem


def test_not_yet_valid(ini: Path) -> None:
    """A clock set before the certificates' start is reported with the start time."""
    earlier = NOW - datetime.timedelta(days=2)
    start = demo_pki().tls.certificate.not_valid_before_utc
    assert str(config_error(ini, earlier)) == (
        f"{ini}: tls-cert: the certificate is not valid before "
        f"{start:%Y-%m-%d %H:%M} UTC"
    )


def test_bad_duration(ini: Path) -> None:
    """A cert-duration without a unit names the key and shows the accepted form."""
    edit_ini(ini, cert_duration="10")
    assert str(config_error(ini)) == (
        f"{ini}: cert-duration: '10' is not a duration; use a number and a unit "
        "(d, h, m, s), e.g. 26280h or 1095d"
    )


@pytest.mark.parametrize(
    ("port", "problem"),
    [
        ("0", "0 is out of range 1..65535"),
        ("65536", "65536 is out of range 1..65535"),
        ("https", "'https' is not a whole number"),
    ],
)
def test_bad_port(ini: Path, port: str, problem: str) -> None:
    """A port outside 1..65535 or not a number names port."""
    edit_ini(ini, port=port)
    assert str(config_error(ini)) == f"{ini}: port: {problem}"


def test_bad_port_on_command_line(ini: Path) -> None:
    """A bad value from the command line is reported against the command line."""
    assert str(config_error(ini, port="-1")) == (
        "the command line: port: -1 is out of range 1..65535"
    )


def test_bad_response_profile(ini: Path) -> None:
    """An unknown response-profile lists the accepted ones."""
    edit_ini(ini, response_profile="libest")
    assert str(config_error(ini)) == (
        f"{ini}: response-profile: 'libest' is not one of fioconfig, rfc7030"
    )


def test_response_profile_case_insensitive(ini: Path) -> None:
    """response-profile values are matched case-insensitively."""
    edit_ini(ini, response_profile="RFC7030")
    assert load(ini).default.response_profile is ResponseProfile.RFC7030


def test_bad_enroll_subject(ini: Path) -> None:
    """An unknown enroll-subject lists the accepted ones."""
    edit_ini(ini, enroll_subject="some")
    assert (
        str(config_error(ini))
        == f"{ini}: enroll-subject: 'some' is not one of match, any"
    )


@pytest.mark.parametrize("length", ["30", "65", "2"])
def test_line_length_not_multiple_of_four(ini: Path, length: str) -> None:
    """A base64-line-length that is not a multiple of 4 is refused."""
    edit_ini(ini, base64_line_length=length)
    assert str(config_error(ini)) == (
        f"{ini}: base64-line-length: {length} is not a multiple of 4 (or 0)"
    )


@pytest.mark.parametrize("length", ["0", "4", "64", "76"])
def test_line_length_accepted(ini: Path, length: str) -> None:
    """0 and multiples of 4 are accepted line lengths."""
    edit_ini(ini, base64_line_length=length)
    assert load(ini).default.base64_line_length == int(length)


@pytest.mark.parametrize(("threads", "problem"), [("0", "0 is out of range 1..256")])
def test_bad_threads(ini: Path, threads: str, problem: str) -> None:
    """A thread pool size outside 1..256 names threads."""
    edit_ini(ini, threads=threads)
    assert str(config_error(ini)) == f"{ini}: threads: {problem}"


# --- Encrypted CA keys -------------------------------------------------------


def encrypt_ca_key(ini: Path, passphrase: bytes) -> Path:
    """Replace est-ca.key with the same key encrypted under ``passphrase``."""
    path = ini.parent / "est-ca.key"
    path.write_bytes(
        demo_pki().est_ca.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(passphrase),
        )
    )
    return path


def test_encrypted_ca_key_wrong_passphrase(ini: Path) -> None:
    """A wrong passphrase is reported against ca-key and its file."""
    key_path = encrypt_ca_key(ini, b"s3cret")
    (ini.parent / "ca.pass").write_bytes(b"guess\n")
    edit_ini(ini, ca_key_passphrase_file="ca.pass")
    assert str(config_error(ini)) == (
        f"{ini}: ca-key: {key_path}: wrong passphrase, or not a private key"
    )


def test_encrypted_ca_key_without_passphrase(ini: Path) -> None:
    """An encrypted ca-key without a passphrase says to set ca-key-passphrase-file."""
    key_path = encrypt_ca_key(ini, b"s3cret")
    assert str(config_error(ini)) == (
        f"{ini}: ca-key: {key_path} is encrypted; set ca-key-passphrase-file"
    )


def test_passphrase_for_plain_ca_key(ini: Path) -> None:
    """A passphrase for an unencrypted ca-key is refused rather than ignored."""
    (ini.parent / "ca.pass").write_bytes(b"s3cret\n")
    edit_ini(ini, ca_key_passphrase_file="ca.pass")
    key_path = ini.parent / "est-ca.key"
    assert str(config_error(ini)) == (
        f"{ini}: ca-key: {key_path} is not encrypted; remove the passphrase"
    )


def test_missing_passphrase_file(ini: Path) -> None:
    """A ca-key-passphrase-file that does not exist is named with its path."""
    encrypt_ca_key(ini, b"s3cret")
    edit_ini(ini, ca_key_passphrase_file="nope.pass")
    path = ini.parent / "nope.pass"
    assert str(config_error(ini)) == (
        f"{ini}: ca-key-passphrase-file: cannot read {path}: No such file or directory"
    )


def test_passphrase_crlf_stripped(ini: Path) -> None:
    """A passphrase file written on Windows (CRLF) still works."""
    encrypt_ca_key(ini, b"s3cret")
    (ini.parent / "ca.pass").write_bytes(b"s3cret\r\n")
    edit_ini(ini, ca_key_passphrase_file="ca.pass")
    assert load(ini).default.ca.certificate == demo_pki().est_ca.certificate


def test_encrypted_tls_key_message(ini: Path) -> None:
    """An encrypted tls-key error does not point at ca-key-passphrase-file."""
    path = ini.parent / "local-tls.key"
    path.write_bytes(
        demo_pki().tls.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"s3cret"),
        )
    )
    error = config_error(ini)
    assert error.key == "tls-key"
    assert "ca-key-passphrase-file" not in str(error)


# --- parse_duration ----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("26280h", datetime.timedelta(days=1095)),
        ("90m", datetime.timedelta(minutes=90)),
        ("1095d", datetime.timedelta(days=1095)),
        ("1h30m", datetime.timedelta(minutes=90)),
        ("1.5h", datetime.timedelta(minutes=90)),
        ("45s", datetime.timedelta(seconds=45)),
        ("1500ms", datetime.timedelta(seconds=1.5)),
        (" 2d ", datetime.timedelta(days=2)),
    ],
)
def test_parse_duration(text: str, expected: datetime.timedelta) -> None:
    """Go-style durations and day counts parse to the exact length."""
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "'' is not a positive duration"),
        ("0h", "'0h' is not a positive duration"),
        ("0d0h", "'0d0h' is not a positive duration"),
        (
            "10",
            "'10' is not a duration; use a number and a unit (d, h, m, s), "
            "e.g. 26280h or 1095d",
        ),
        (
            "-5h",
            "'-5h' is not a duration; use a number and a unit (d, h, m, s), "
            "e.g. 26280h or 1095d",
        ),
        (
            "10x",
            "'10x' is not a duration; use a number and a unit (d, h, m, s), "
            "e.g. 26280h or 1095d",
        ),
        (
            "1h 30m",
            "'1h 30m' is not a duration; use a number and a unit (d, h, m, s), "
            "e.g. 26280h or 1095d",
        ),
    ],
)
def test_parse_duration_rejects(text: str, message: str) -> None:
    """Empty, zero, negative, unitless and unknown-unit durations are refused."""
    with pytest.raises(ValueError) as caught:
        parse_duration(text)
    assert str(caught.value) == message


def test_command_line_port_beats_listen_from_the_file(tmp_path: Path) -> None:
    """--port on the command line wins over a listen key in est.ini."""
    ini = write_pki(str(tmp_path))
    assert load_config(ini, {}, NOW).listen == "tcp:8443:interface=127.0.0.1"
    assert load_config(ini, {"port": "9443"}, NOW).listen == "tcp:9443"
    both = {"port": "9443", "listen": "tcp:7443"}
    assert load_config(ini, both, NOW).listen == "tcp:7443"
