"""Unit tests of estd.config: est.ini and options in, a Config or a precise error."""

from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import os
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID

from estd import auth
from estd.config import KEYS, OPERATION_NAMES, Config, load_config, parse_duration
from estd.demo import DemoPKI, Pair, make_pair
from estd.errors import ConfigError
from estd.identity import AuthMode
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
    assert list(config.labels) == [""]


def test_demo_config_defaults_of_new_keys(ini: Path) -> None:
    """csrattrs, serverkeygen, auth, PoP and grace default to off and cert-only."""
    label = load(ini).default
    assert label.csrattrs.items == ()
    assert label.csrattrs_enforce is False
    assert label.serverkeygen is False
    assert label.serverkeygen_key_type == "csr"
    assert label.auth is AuthMode.CERT
    assert label.users is None
    assert label.realm == "estd"
    assert label.require_pop is False
    assert label.reenroll_grace == datetime.timedelta()


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
    """A section other than [est] and [label NAME] is refused, naming it."""
    with ini.open("a") as handle:
        handle.write("[label:fleet]\nca-cert = est-ca.pem\n")
    error = config_error(ini)
    assert str(error) == (
        f"{ini}: unknown section [label:fleet]; expected [est] or [label NAME]"
    )


def test_default_section_is_unknown(ini: Path) -> None:
    """A [DEFAULT] section gets no special meaning and is refused."""
    with ini.open("a") as handle:
        handle.write("[DEFAULT]\nport = 9443\n")
    assert str(config_error(ini)) == (
        f"{ini}: unknown section [DEFAULT]; expected [est] or [label NAME]"
    )


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


def test_cpu_affinity(ini: Path) -> None:
    """cpu-affinity is off unless auto; anything else names the key and file."""
    assert load(ini).cpu_affinity is False
    edit_ini(ini, cpu_affinity="Auto")
    assert load(ini).cpu_affinity is True
    assert load(ini, cpu_affinity="none").cpu_affinity is False
    edit_ini(ini, cpu_affinity="all")
    assert str(config_error(ini)) == (f"{ini}: cpu-affinity: 'all' is not none or auto")


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


# --- [label NAME] sections ---------------------------------------------------


def add_label(ini: Path, name: str, **keys: str) -> None:
    """Append a [label NAME] section setting ``keys`` (``_`` for ``-``)."""
    lines = [f"[label {name}]"]
    lines += [f"{key.replace('_', '-')} = {value}" for key, value in keys.items()]
    with ini.open("a") as handle:
        handle.write("\n".join(lines) + "\n")


def add_section(ini: Path, header: str) -> None:
    """Append a section with this header and one harmless key."""
    with ini.open("a") as handle:
        handle.write(f"[{header}]\ncert-duration = 1h\n")


@functools.cache
def other_ca() -> Pair:
    """A second EST CA under the demo root, for labels with their own CA."""
    return make_pair(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "other-est-ca")]),
        demo_pki().root,
        ca=True,
        now=NOW,
    )


def write_other_ca(ini: Path) -> None:
    """Write other-ca.pem and other-ca.key next to est.ini."""
    (ini.parent / "other-ca.pem").write_bytes(other_ca().cert_pem())
    (ini.parent / "other-ca.key").write_bytes(other_ca().key_pem())


@pytest.fixture
def users(ini: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """users.htpasswd next to est.ini with one user (cheap bcrypt)."""
    monkeypatch.setattr(auth, "BCRYPT_ROUNDS", 4)
    path = ini.parent / "users.htpasswd"
    auth.set_password(str(path), "dev-1", "correct horse")
    return path


def sha256(certificate: x509.Certificate) -> bytes:
    """The SHA-256 fingerprint of a certificate."""
    return hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).digest()


def test_label_section_defines_label(ini: Path) -> None:
    """A [label fleet] section serves /.well-known/est/fleet/ next to the default."""
    add_label(ini, "fleet")
    config = load(ini)
    assert set(config.labels) == {"", "fleet"}
    fleet = config.labels["fleet"]
    assert fleet.label == "fleet"
    assert fleet.path == "/.well-known/est/fleet/"
    assert config.default.path == "/.well-known/est/"


@pytest.mark.parametrize(
    "name", ["a", "Fleet-2.prod_x", "x" * 128, "cacerts2", "-", "_", "..."]
)
def test_label_names_accepted(ini: Path, name: str) -> None:
    """Labels of 1-128 characters of A-Z a-z 0-9 . _ - are accepted."""
    add_label(ini, name)
    assert load(ini).labels[name].label == name


def test_label_inherits_every_unset_key(ini: Path, users: Path) -> None:
    """A label that sets nothing has every per-label setting of [est]."""
    changed = {
        "cert-duration": "90d",
        "response-profile": "rfc7030",
        "enroll-subject": "any",
        "base64-line-length": "76",
        "csrattrs": "challengePassword, ecPublicKey:secp384r1",
        "csrattrs-enforce": "yes",
        "serverkeygen": "yes",
        "serverkeygen-key-type": "ec-p384",
        "auth": "cert-or-basic",
        "users-file": users.name,
        "realm": "factory",
        "require-pop": "yes",
        "reenroll-grace": "30d",
        "approval": "manual",
        "approval-retry-after": "60",
        "pending-expiry": "2d",
        "max-issuance-per-day": "3",
        "revoke-superseded": "yes",
    }
    per_label = {key.name for key in KEYS if key.per_label}
    # Set in the demo est.ini already, or (the passphrase) not applicable:
    # every other per-label key must be in `changed`, so that a new key is
    # covered here too.
    assert per_label - set(changed) == {
        "root-cert",
        "ca-cert",
        "ca-key",
        "ca-key-passphrase-file",
        "client-cas",
        "pkcs11-module",  # with a pkcs11: ca-key only (tests/test_hsm.py)
        "pkcs11-pin-file",
    }
    edit_ini(ini, **{key.replace("-", "_"): value for key, value in changed.items()})
    add_label(ini, "fleet")
    config = load(ini)
    fleet = config.labels["fleet"]
    assert dataclasses.replace(fleet, label="") == config.default
    assert fleet.cert_duration == datetime.timedelta(days=90)
    assert fleet.auth is AuthMode.CERT_OR_BASIC
    assert fleet.users is config.default.users
    assert fleet.reenroll_grace == datetime.timedelta(days=30)
    assert fleet.cacerts_body == config.default.cacerts_body
    assert fleet.manual_approval is True
    assert fleet.approval_retry_after == 60
    assert fleet.pending_expiry == datetime.timedelta(days=2)
    assert fleet.max_issuance_per_day == 3
    assert fleet.revoke_superseded is True


def test_label_inherits_command_line_overrides(ini: Path) -> None:
    """A label inherits command-line values of [est] for keys it does not set."""
    add_label(ini, "fleet")
    config = load(ini, cert_duration="1h", response_profile="rfc7030")
    fleet = config.labels["fleet"]
    assert fleet.cert_duration == datetime.timedelta(hours=1)
    assert fleet.response_profile is ResponseProfile.RFC7030
    assert config.default.cert_duration == datetime.timedelta(hours=1)


def test_label_setting_beats_command_line(ini: Path) -> None:
    """A command-line option sets [est]; a label's own setting still wins there."""
    add_label(ini, "fleet", cert_duration="2h")
    config = load(ini, cert_duration="1h")
    assert config.labels["fleet"].cert_duration == datetime.timedelta(hours=2)
    assert config.default.cert_duration == datetime.timedelta(hours=1)


def test_label_overrides(ini: Path) -> None:
    """A label may set its own CA, client CAs, profile and duration."""
    pki = demo_pki()
    write_other_ca(ini)
    add_label(
        ini,
        "other",
        ca_cert="other-ca.pem",
        ca_key="other-ca.key",
        response_profile="rfc7030",
        client_cas="factory_ca.pem",
        cert_duration="720h",
    )
    config = load(ini)
    other = config.labels["other"]
    assert other.ca.certificate == other_ca().certificate
    assert other.response_profile is ResponseProfile.RFC7030
    assert other.client_cas == (pki.root.certificate,)
    assert other.cert_duration == datetime.timedelta(hours=720)
    assert other.root_certificates == (pki.root.certificate,)
    assert other.trust_anchors == (other_ca().certificate, pki.root.certificate)
    certificates = pkcs7.load_der_pkcs7_certificates(decode_body(other.cacerts_body))
    assert certificates == [pki.root.certificate, other_ca().certificate]
    default = config.default
    assert default.ca.certificate == pki.est_ca.certificate
    assert default.response_profile is ResponseProfile.FIOCONFIG
    assert default.client_cas == (pki.device_ca.certificate,)
    assert default.cert_duration == datetime.timedelta(hours=26280)


def test_labels_share_one_ca(ini: Path) -> None:
    """Labels naming the same CA files (however spelt) share one CA object."""
    write_other_ca(ini)
    add_label(ini, "a", ca_cert="other-ca.pem", ca_key="other-ca.key")
    add_label(ini, "b", ca_cert="./other-ca.pem", ca_key="other-ca.key")
    add_label(ini, "c")
    add_label(ini, "d", ca_cert="../etc/est-ca.pem")
    labels = load(ini).labels
    assert labels["a"].ca is labels["b"].ca
    assert labels["c"].ca is labels[""].ca
    assert labels["d"].ca is labels[""].ca
    assert labels["a"].ca is not labels[""].ca


def test_labels_share_one_users_file(ini: Path, users: Path) -> None:
    """Labels naming the same users file share one loaded copy."""
    add_label(ini, "a", auth="basic", users_file=users.name)
    add_label(ini, "b", auth="cert-or-basic", users_file=str(users))
    labels = load(ini).labels
    assert labels["a"].users is not None
    assert labels["a"].users is labels["b"].users
    assert labels[""].users is None


@pytest.mark.parametrize(
    "header",
    ["label", "label ", "label " + "x" * 129, "label a/b", "label a b", "label fl€et"],
    ids=["no-name", "empty", "129-chars", "slash", "space", "non-ascii"],
)
def test_bad_label_names(ini: Path, header: str) -> None:
    """A label name that is empty, too long or has other characters is refused."""
    add_section(ini, header)
    assert str(config_error(ini)) == (
        f"{ini}: [{header}]: a label is 1-128 characters of A-Z a-z 0-9 . _ -"
    )


@pytest.mark.parametrize("name", [".", ".."])
def test_dot_segment_label_is_refused(ini: Path, name: str) -> None:
    """A label of . or .. (which URLs cannot carry as a segment) is refused."""
    add_label(ini, name)
    assert str(config_error(ini)).startswith(f"{ini}: [label {name}]: ")


@pytest.mark.parametrize("operation", sorted(OPERATION_NAMES))
def test_operation_name_is_not_a_label(ini: Path, operation: str) -> None:
    """A label named like an EST operation (cacerts, ...) is refused."""
    add_label(ini, operation)
    assert str(config_error(ini)) == (
        f"{ini}: [label {operation}]: {operation} is an EST operation, not a label"
    )


def test_label_keyword_is_case_sensitive(ini: Path) -> None:
    """[Label fleet] is not a label section."""
    add_section(ini, "Label fleet")
    assert str(config_error(ini)) == (
        f"{ini}: unknown section [Label fleet]; expected [est] or [label NAME]"
    )


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("port", "9443"),
        ("listen", "tcp:9443"),
        ("tls-cert", "local-tls.pem"),
        ("tls-key", "local-tls.key"),
        ("threads", "8"),
    ],
)
def test_server_wide_key_in_label(ini: Path, key: str, value: str) -> None:
    """A server-wide key inside a label section is refused, naming the section."""
    add_label(ini, "fleet", **{key: value})
    error = config_error(ini)
    assert str(error) == (
        f"{ini} [label fleet]: {key}: is a server-wide key; set it in [est]"
    )
    assert error.source == f"{ini} [label fleet]"


def test_unknown_key_in_label(ini: Path) -> None:
    """A misspelt key in a label section is refused, naming the section."""
    add_label(ini, "fleet", cert_duraton="1h")
    assert str(config_error(ini)) == f"{ini} [label fleet]: cert-duraton: unknown key"


def test_bad_value_in_label_names_the_label(ini: Path) -> None:
    """A bad value in a label section is reported against that section."""
    add_label(ini, "fleet", cert_duration="10")
    error = config_error(ini)
    assert str(error) == (
        f"{ini} [label fleet]: cert-duration: '10' is not a duration; use a number "
        "and a unit (d, h, m, s), e.g. 26280h or 1095d"
    )
    assert error.key == "cert-duration"


def test_bad_profile_in_label_names_the_label(ini: Path) -> None:
    """An unknown response-profile in a label names the label section."""
    add_label(ini, "fleet", response_profile="libest")
    assert str(config_error(ini)) == (
        f"{ini} [label fleet]: response-profile: 'libest' is not one of "
        "fioconfig, rfc7030"
    )


def test_missing_file_in_label_names_the_label(ini: Path) -> None:
    """A label's unreadable ca-cert is reported against the label section."""
    add_label(ini, "fleet", ca_cert="missing.pem")
    path = ini.parent / "missing.pem"
    assert str(config_error(ini)) == (
        f"{ini} [label fleet]: ca-cert: cannot read {path}: No such file or directory"
    )


def test_client_cas_not_a_ca_in_label(ini: Path) -> None:
    """A device certificate in a label's client-cas names the label section."""
    add_label(ini, "fleet", client_cas="device.pem")
    subject = demo_pki().devices[0].certificate.subject.rfc4514_string()
    assert str(config_error(ini)) == (
        f"{ini} [label fleet]: client-cas: {subject}: the certificate is not a CA "
        "(BasicConstraints CA:FALSE)"
    )


def test_label_ca_cert_without_its_key_names_the_label(ini: Path) -> None:
    """A label setting ca-cert but not its ca-key is reported against the label."""
    write_other_ca(ini)
    add_label(ini, "fleet", ca_cert="other-ca.pem")
    error = config_error(ini)
    assert error.key == "ca-key"
    assert error.source == f"{ini} [label fleet]"


def test_label_defined_twice_is_refused(ini: Path) -> None:
    """Two sections for the same label (spelt with extra blanks) are refused."""
    add_label(ini, "fleet", cert_duration="1h")
    add_label(ini, " fleet", cert_duration="2h")
    error = config_error(ini)
    assert "fleet" in str(error)


# --- auth and users-file -----------------------------------------------------


def test_basic_auth_loads_users_file(ini: Path, users: Path) -> None:
    """auth = basic with users-file loads the users, checked by password."""
    edit_ini(ini, auth="basic", users_file=users.name, realm="factory line 1")
    label = load(ini).default
    assert label.auth is AuthMode.BASIC
    assert label.users is not None
    assert "dev-1" in label.users
    assert label.users.check("dev-1", "correct horse")
    assert not label.users.check("dev-1", "wrong")
    assert label.realm == "factory line 1"


@pytest.mark.parametrize("mode", ["basic", "cert-or-basic", "cert-and-basic"])
def test_basic_auth_without_users_file(ini: Path, mode: str) -> None:
    """An auth mode using Basic without a users-file is refused."""
    edit_ini(ini, auth=mode)
    assert (
        str(config_error(ini)) == f"{ini}: users-file: is required with auth = {mode}"
    )


def test_basic_auth_without_users_file_in_label(ini: Path) -> None:
    """A label with auth = basic and no users-file anywhere names the label."""
    add_label(ini, "bootstrap", auth="basic")
    assert str(config_error(ini)) == (
        f"{ini} [label bootstrap]: users-file: is required with auth = basic"
    )


def test_label_inherits_users_file(ini: Path, users: Path) -> None:
    """A label turning on Basic may use the users-file set in [est]."""
    edit_ini(ini, users_file=users.name)
    add_label(ini, "bootstrap", auth="basic")
    config = load(ini)
    assert config.labels["bootstrap"].auth is AuthMode.BASIC
    assert config.labels["bootstrap"].users is config.default.users
    assert config.default.auth is AuthMode.CERT


def test_bad_auth_mode(ini: Path) -> None:
    """An unknown auth mode lists the accepted ones."""
    edit_ini(ini, auth="digest")
    assert str(config_error(ini)) == (
        f"{ini}: auth: 'digest' is not one of cert, basic, cert-or-basic, "
        "cert-and-basic"
    )


def test_users_file_with_apr1_hash(ini: Path) -> None:
    """A users file with an Apache MD5 hash is refused, naming key and file."""
    path = ini.parent / "users.htpasswd"
    path.write_text("dev-1:$apr1$r31.....$HqJZimcKQFAMYayBlzkrA/\n")
    edit_ini(ini, auth="basic", users_file="users.htpasswd")
    assert str(config_error(ini)) == (
        f"{ini}: users-file: {path}: line 1 (user 'dev-1'): only bcrypt or scrypt "
        "hashes are accepted, this is an Apache MD5 ($apr1$) hash"
    )


def test_users_file_with_apr1_hash_in_label(ini: Path) -> None:
    """A label's bad users file is reported against the label section."""
    path = ini.parent / "users.htpasswd"
    path.write_text("# users\ndev-1:$apr1$r31.....$HqJZimcKQFAMYayBlzkrA/\n")
    add_label(ini, "bootstrap", auth="basic", users_file="users.htpasswd")
    assert str(config_error(ini)) == (
        f"{ini} [label bootstrap]: users-file: {path}: line 2 (user 'dev-1'): only "
        "bcrypt or scrypt hashes are accepted, this is an Apache MD5 ($apr1$) hash"
    )


def test_users_file_missing(ini: Path) -> None:
    """A users-file that does not exist is named with its path."""
    edit_ini(ini, auth="basic", users_file="nope.htpasswd")
    path = ini.parent / "nope.htpasswd"
    assert str(config_error(ini)) == (
        f"{ini}: users-file: cannot read {path}: No such file or directory"
    )


def test_bad_realm(ini: Path) -> None:
    """A realm with a double quote (it goes into WWW-Authenticate) is refused."""
    edit_ini(ini, realm='say "hi"')
    assert str(config_error(ini)) == (
        f"{ini}: realm: 'say \"hi\"' is not a usable realm (printable, no quotes)"
    )


# --- csrattrs, serverkeygen, require-pop -------------------------------------


def test_csrattrs_parsed(ini: Path) -> None:
    """csrattrs lists items by comma or on continuation lines."""
    with ini.open("a") as handle:
        handle.write(
            "csrattrs = challengePassword, ecPublicKey:secp384r1\n"
            "    extensionRequest:macAddress\n"
            "    ecdsa-with-SHA384\n"
        )
    label = load(ini).default
    assert label.csrattrs.describe() == (
        "challengePassword, ecPublicKey:secp384r1, extensionRequest:macAddress, "
        "ecdsa-with-SHA384"
    )


def test_bad_csrattrs(ini: Path) -> None:
    """An unknown csrattrs item is refused, naming the key and the item."""
    edit_ini(ini, csrattrs="challengePassword, bogus")
    assert str(config_error(ini)) == (
        f"{ini}: csrattrs: csrattrs item 'bogus': 'bogus' is neither a known name "
        "nor a dotted OID"
    )


def test_bad_csrattrs_in_label(ini: Path) -> None:
    """A label's bad csrattrs is reported against the label section."""
    add_label(ini, "fleet", csrattrs="ecPublicKey:")
    assert str(config_error(ini)) == (
        f"{ini} [label fleet]: csrattrs: csrattrs item 'ecPublicKey:': "
        "no value after ':'"
    )


@pytest.mark.parametrize("key", ["csrattrs-enforce", "serverkeygen", "require-pop"])
def test_bad_boolean(ini: Path, key: str) -> None:
    """Yes/no keys refuse anything else, naming the key."""
    edit_ini(ini, **{key.replace("-", "_"): "maybe"})
    assert str(config_error(ini)) == f"{ini}: {key}: 'maybe' is not yes or no"


@pytest.mark.parametrize(
    ("text", "expected"), [("yes", True), ("On", True), ("1", True), ("off", False)]
)
def test_boolean_spellings(ini: Path, text: str, expected: bool) -> None:
    """Yes/no keys take yes/true/on/1 and no/false/off/0, in any case."""
    edit_ini(ini, serverkeygen=text, require_pop=text, csrattrs_enforce=text)
    label = load(ini).default
    assert (label.serverkeygen, label.require_pop, label.csrattrs_enforce) == (
        expected,
        expected,
        expected,
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("csr", "csr"),
        ("ec-p256", "ec-p256"),
        ("EC-P384", "ec-p384"),
        ("ec-p521", "ec-p521"),
        ("rsa-2048", "rsa-2048"),
        ("rsa-3072", "rsa-3072"),
        ("rsa-4096", "rsa-4096"),
        ("ed25519", "ed25519"),
    ],
)
def test_serverkeygen_key_types(ini: Path, text: str, expected: str) -> None:
    """Every documented serverkeygen-key-type is accepted, case-insensitively."""
    edit_ini(ini, serverkeygen="yes", serverkeygen_key_type=text)
    label = load(ini).default
    assert label.serverkeygen is True
    assert label.serverkeygen_key_type == expected


def test_bad_serverkeygen_key_type(ini: Path) -> None:
    """An unknown serverkeygen-key-type lists the accepted ones."""
    edit_ini(ini, serverkeygen_key_type="dsa-2048")
    assert str(config_error(ini)) == (
        f"{ini}: serverkeygen-key-type: 'dsa-2048' is not one of csr, ec-p256, "
        "ec-p384, ec-p521, rsa-2048, rsa-3072, rsa-4096, ed25519"
    )


# --- reenroll-grace ----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", datetime.timedelta()),
        ("30d", datetime.timedelta(days=30)),
        ("36h", datetime.timedelta(hours=36)),
    ],
)
def test_reenroll_grace(ini: Path, text: str, expected: datetime.timedelta) -> None:
    """reenroll-grace takes 0 (no grace) or a duration."""
    edit_ini(ini, reenroll_grace=text)
    assert load(ini).default.reenroll_grace == expected


def test_bad_reenroll_grace(ini: Path) -> None:
    """A reenroll-grace without a unit names the key."""
    edit_ini(ini, reenroll_grace="30")
    assert str(config_error(ini)) == (
        f"{ini}: reenroll-grace: '30' is not a duration; use a number and a unit "
        "(d, h, m, s), e.g. 26280h or 1095d"
    )


@pytest.mark.parametrize("text", ["0d", "0h"])
def test_reenroll_grace_zero_with_unit(ini: Path, text: str) -> None:
    """A zero grace written with a unit (0d) means no grace, like 0."""
    edit_ini(ini, reenroll_grace=text)
    assert load(ini).default.reenroll_grace == datetime.timedelta()


def test_max_reenroll_grace(ini: Path) -> None:
    """The TLS layer's grace is the longest of all labels'."""
    assert load(ini).max_reenroll_grace == datetime.timedelta()
    add_label(ini, "a", reenroll_grace="30d")
    add_label(ini, "b", reenroll_grace="7d")
    add_label(ini, "c")
    assert load(ini).max_reenroll_grace == datetime.timedelta(days=30)


# --- Trust anchors -----------------------------------------------------------


def test_anchor_fingerprints(ini: Path) -> None:
    """A label's anchor fingerprints are the SHA-256 of the EST CA and client-cas."""
    pki = demo_pki()
    label = load(ini).default
    assert label.anchor_fingerprints == frozenset(
        {sha256(pki.est_ca.certificate), sha256(pki.device_ca.certificate)}
    )


def test_trust_anchors_union_without_duplicates(ini: Path) -> None:
    """TLS trusts every label's anchors, each certificate once."""
    pki = demo_pki()
    write_other_ca(ini)
    add_label(ini, "a")
    add_label(
        ini,
        "b",
        ca_cert="other-ca.pem",
        ca_key="other-ca.key",
        client_cas="client-cas.pem",
    )
    add_label(ini, "c", client_cas="factory_ca.pem")
    config = load(ini)
    assert config.trust_anchors == (
        pki.est_ca.certificate,
        pki.device_ca.certificate,
        other_ca().certificate,
        pki.root.certificate,
    )
    assert config.labels["c"].anchor_fingerprints == frozenset(
        {sha256(pki.est_ca.certificate), sha256(pki.root.certificate)}
    )


def test_sample_config_loads_and_names_every_key(tmp_path: Path) -> None:
    """contrib/est.ini.example is a working est.ini that mentions every key."""
    from estd.config import KEYS

    example = Path(__file__).parent.parent / "contrib" / "est.ini.example"
    write_pki(str(tmp_path))
    ini = tmp_path / "example.ini"
    ini.write_text(example.read_text())
    config = load_config(str(ini), {}, NOW)
    assert config.listen == "tcp:8443"
    text = example.read_text()
    missing = [key.name for key in KEYS if f"{key.name} =" not in text]
    assert missing == []


def test_readme_names_every_key() -> None:
    """README.rst's configuration table mentions every est.ini key."""
    from estd.config import KEYS

    readme = (Path(__file__).parent.parent / "README.rst").read_text()
    assert [key.name for key in KEYS if f"``{key.name}``" not in readme] == []
