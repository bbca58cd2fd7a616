"""est.ini plus command-line options in, one frozen :class:`Config` out.

Every problem becomes a :class:`ConfigError` naming the key, the file it
came from and what is wrong, so that ``twistd`` stops before it listens.
A :class:`Config` is an immutable snapshot: a reload builds a new one and
swaps it in whole.
"""

from __future__ import annotations

import configparser
import datetime
import enum
import functools
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from estd.auth import UsersFile
from estd.ca import (
    CAPrivateKey,
    CertificateAuthority,
    Signer,
    check_ca_certificate,
    load_certificates,
    load_private_key,
    public_keys_match,
)
from estd.csrattrs import CsrAttrs, parse_csrattrs
from estd.errors import ConfigError
from estd.hsm import (
    HsmError,
    ModuleError,
    Pkcs11Signer,
    WrongPin,
    is_pkcs11_uri,
    pin_from_file,
)
from estd.identity import AuthMode
from estd.policy import EnrollSubject
from estd.serverkeygen import KEY_TYPES
from estd.wire import ResponseProfile, certs_only, encode_base64

SECTION = "est"
COMMAND_LINE = "the command line"


@dataclass(frozen=True)
class Key:
    """One est.ini key, which is also a twistd option of the same name.

    ``per_label`` keys may also be set in ``[label NAME]`` sections; a label
    inherits every per-label key it does not set from ``[est]``.
    """

    name: str
    help: str
    default: str | None = None
    required: bool = False
    is_path: bool = False
    per_label: bool = False


def _label_key(name: str, help: str, default: str | None = None, **kw: bool) -> Key:
    return Key(name, help, default, per_label=True, **kw)


KEYS: tuple[Key, ...] = (
    Key("port", "TCP port to listen on (all interfaces)", "8443"),
    Key(
        "listen",
        "Twisted server endpoint to listen on instead of port, e.g. "
        "tcp:8443:interface=127.0.0.1 or systemd:domain=INET:index=0; "
        "estd adds TLS itself",
    ),
    Key(
        "tls-cert",
        "server TLS certificate, PEM, leaf first",
        required=True,
        is_path=True,
    ),
    Key("tls-key", "server TLS private key, PEM", required=True, is_path=True),
    Key("threads", "size of the signing thread pool", "4"),
    Key(
        "admin-listen",
        "plain-HTTP endpoint for /metrics, /healthz and /readyz; empty = off",
        "tcp:9443:interface=127.0.0.1",
    ),
    Key("log-format", "text, or json (one JSON object per line)", "text"),
    Key(
        "shutdown-timeout",
        "how long SIGTERM waits for requests in flight (e.g. 30s)",
        "30s",
    ),
    Key(
        "workers",
        "processes serving the port: a number, or auto (one per CPU it may use)",
        "1",
    ),
    Key(
        "cpu-affinity",
        "none, or auto: pin each serving process to one CPU (worker N to the "
        "Nth CPU the service may use; a single process to the first)",
        "none",
    ),
    Key(
        "max-pending",
        "enrollments in flight before new ones get 503; default 8 per thread",
    ),
    Key("max-connections", "open connections per process; more are closed", "1024"),
    Key("handshake-timeout", "time allowed for the TLS handshake", "10s"),
    Key("header-timeout", "time allowed for the request line and headers", "10s"),
    Key("body-timeout", "time allowed for the request body", "10s"),
    Key(
        "state-dir",
        "directory for estd's state (the SQLite ledger); default: est.ini's",
        is_path=True,
    ),
    Key(
        "ledger",
        "where issued certificates are recorded: sqlite (in state-dir), "
        "sqlite:///PATH or postgresql://USER@HOST/DB",
        "sqlite",
    ),
    _label_key(
        "root-cert",
        "factory root CA certificate(s) served by /cacerts, PEM",
        required=True,
        is_path=True,
    ),
    _label_key(
        "ca-cert",
        "EST CA certificate that signs device certificates",
        required=True,
        is_path=True,
    ),
    _label_key(
        "ca-key",
        "EST CA private key (SEC1/PKCS#1/PKCS#8 PEM), or a pkcs11: URI "
        "(RFC 7512) of a key in a token",
        required=True,
        is_path=True,
    ),
    _label_key(
        "pkcs11-module",
        "PKCS#11 module of the token holding a pkcs11: ca-key, e.g. "
        "/usr/lib/softhsm/libsofthsm2.so",
        is_path=True,
    ),
    _label_key(
        "pkcs11-pin-file",
        "file whose first line is the token's user PIN (pkcs11: ca-key)",
        is_path=True,
    ),
    _label_key(
        "ca-key-passphrase-file",
        "file holding the passphrase of an encrypted ca-key",
        is_path=True,
    ),
    _label_key(
        "client-cas",
        "extra trust anchors for client certificates (device CAs), PEM",
        is_path=True,
    ),
    _label_key(
        "cert-duration", "validity of issued certificates: 26280h, 90m, 1095d", "26280h"
    ),
    _label_key(
        "response-profile",
        "enrollment response: fioconfig (201) or rfc7030 (200)",
        "fioconfig",
    ),
    _label_key(
        "enroll-subject",
        "simpleenroll CSR subject: match (the client certificate's) or any",
        "match",
    ),
    _label_key(
        "base64-line-length", "base64 line length of responses; 0 = one line", "64"
    ),
    _label_key(
        "csrattrs",
        "what /csrattrs asks for, e.g. challengePassword, ecPublicKey:secp384r1, "
        "ecdsa-with-SHA384, extensionRequest:macAddress",
        "",
    ),
    _label_key("csrattrs-enforce", "refuse CSRs lacking what csrattrs asks for", "no"),
    _label_key("serverkeygen", "serve /serverkeygen (the server makes the key)", "no"),
    _label_key(
        "serverkeygen-key-type",
        "key type /serverkeygen makes: csr (like the CSR's), ec-p256, ec-p384, "
        "ec-p521, rsa-2048, rsa-3072, rsa-4096, ed25519",
        "csr",
    ),
    _label_key(
        "auth",
        "how enrollment clients authenticate: cert, basic, cert-or-basic, "
        "cert-and-basic",
        "cert",
    ),
    _label_key(
        "users-file",
        "htpasswd file (bcrypt or scrypt hashes) for HTTP Basic auth",
        is_path=True,
    ),
    _label_key("realm", "HTTP Basic realm", "estd"),
    _label_key(
        "require-pop",
        "require the TLS channel binding in the CSR's challengePassword",
        "no",
    ),
    _label_key(
        "approval",
        "auto, or manual: requests wait (202) for estctl approve",
        "auto",
    ),
    _label_key("approval-retry-after", "Retry-After seconds of a 202", "300"),
    _label_key("pending-expiry", "how long a request waits for approval", "7d"),
    _label_key(
        "max-issuance-per-day",
        "certificates one subject may get per 24 hours; 0 = no limit",
        "0",
    ),
    _label_key(
        "revoke-superseded",
        "revoke a subject's earlier certificates when it renews",
        "no",
    ),
    _label_key(
        "reenroll-grace",
        "how long after expiry a certificate may still re-enroll (0 = never)",
        "0",
    ),
)
KEYS_BY_NAME = {key.name: key for key in KEYS}


@dataclass(frozen=True)
class LabelConfig:
    """The settings of one CA label ('' is the unlabelled path)."""

    label: str
    ca: CertificateAuthority
    root_certificates: tuple[x509.Certificate, ...]
    client_cas: tuple[x509.Certificate, ...]
    cert_duration: datetime.timedelta
    response_profile: ResponseProfile
    enroll_subject: EnrollSubject
    base64_line_length: int
    cacerts_body: bytes = field(repr=False)
    csrattrs: CsrAttrs = field(default_factory=lambda: parse_csrattrs(""))
    csrattrs_enforce: bool = False
    serverkeygen: bool = False
    serverkeygen_key_type: str = "csr"
    auth: AuthMode = AuthMode.CERT
    users: UsersFile | None = field(default=None, repr=False)
    realm: str = "estd"
    require_pop: bool = False
    reenroll_grace: datetime.timedelta = datetime.timedelta()
    manual_approval: bool = False
    approval_retry_after: int = 300
    pending_expiry: datetime.timedelta = datetime.timedelta(days=7)
    max_issuance_per_day: int = 0
    revoke_superseded: bool = False

    @property
    def trust_anchors(self) -> tuple[x509.Certificate, ...]:
        """Certificates a client certificate may chain to for this label."""
        return (self.ca.certificate, *self.client_cas)

    @functools.cached_property
    def anchor_fingerprints(self) -> frozenset[bytes]:
        """SHA-256 fingerprints of :attr:`trust_anchors`."""
        return frozenset(anchor.fingerprint(_SHA256) for anchor in self.trust_anchors)

    @property
    def path(self) -> str:
        """The URL path prefix of the label's operations."""
        return "/.well-known/est/" + (self.label + "/" if self.label else "")


@dataclass(frozen=True)
class Config:
    """A complete, validated snapshot of the server's settings."""

    source: str
    listen: str
    tls_certificates: tuple[x509.Certificate, ...]
    tls_key: CAPrivateKey = field(repr=False)
    threads: int
    labels: Mapping[str, LabelConfig]
    ledger_url: str = "sqlite:///estd.sqlite3"
    admin_listen: str = ""
    workers: int = 1
    cpu_affinity: bool = False
    """cpu-affinity = auto: each serving process runs on one CPU."""
    max_pending: int = 32
    max_connections: int = 1024
    handshake_timeout: float = 10.0
    header_timeout: float = 10.0
    body_timeout: float = 10.0
    log_format: str = "text"
    shutdown_timeout: datetime.timedelta = datetime.timedelta(seconds=30)

    @property
    def default(self) -> LabelConfig:
        """The settings of the unlabelled path."""
        return self.labels[""]

    @property
    def trust_anchors(self) -> tuple[x509.Certificate, ...]:
        """The union of every label's anchors, each certificate once."""
        return _unique(
            tuple(a for label in self.labels.values() for a in label.trust_anchors)
        )

    @property
    def max_reenroll_grace(self) -> datetime.timedelta:
        """The longest re-enrollment grace of any label (TLS lets these in)."""
        return max(label.reenroll_grace for label in self.labels.values())


_SHA256 = hashes.SHA256()

LABEL_NAME = re.compile(r"[A-Za-z0-9._-]{1,128}")
OPERATION_NAMES = frozenset(
    {
        "cacerts",
        "simpleenroll",
        "simplereenroll",
        "csrattrs",
        "serverkeygen",
        "fullcmc",
        "crl",
    }
)
"""RFC 7030 §3.2.2 operation path segments, and estd's ``crl``; none of
them can be a label."""


# --- Values ------------------------------------------------------------------

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION_UNITS = {
    "ms": datetime.timedelta(milliseconds=1),
    "s": datetime.timedelta(seconds=1),
    "m": datetime.timedelta(minutes=1),
    "h": datetime.timedelta(hours=1),
    "d": datetime.timedelta(days=1),
}


def parse_duration(text: str, allow_zero: bool = False) -> datetime.timedelta:
    """A Go-style duration (``26280h``, ``1h30m``, ``90m``) or days (``1095d``)."""
    text = text.strip()
    if allow_zero and text and text.strip("0") == "":
        return datetime.timedelta()
    pos, total = 0, datetime.timedelta()
    while pos < len(text):
        match = _DURATION_PART.match(text, pos)
        if match is None:
            raise ValueError(
                f"{text!r} is not a duration; use a number and a unit "
                "(d, h, m, s), e.g. 26280h or 1095d"
            )
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    if not text or (total == datetime.timedelta() and not allow_zero):
        raise ValueError(f"{text!r} is not a positive duration")
    return total


def _boolean(text: str) -> bool:
    value = text.strip().lower()
    if value in ("yes", "true", "on", "1"):
        return True
    if value in ("no", "false", "off", "0"):
        return False
    raise ValueError(f"{text!r} is not yes or no")


def _integer(text: str, low: int, high: int) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is not a whole number") from None
    if not low <= value <= high:
        raise ValueError(f"{value} is out of range {low}..{high}")
    return value


def _choice(text: str, kind: type[enum.Enum]):  # type: ignore[no-untyped-def]
    try:
        return kind(text.strip().lower())
    except ValueError:
        choices = ", ".join(member.value for member in kind)
        raise ValueError(f"{text!r} is not one of {choices}") from None


# --- Loading -----------------------------------------------------------------


@dataclass(frozen=True)
class _Value:
    text: str
    source: str
    base_dir: str


class _Settings:
    """Raw key values with where each came from, for precise error messages.

    A label's settings have the ``[est]`` settings as parent: a key the
    label does not set is looked up there.
    """

    def __init__(
        self,
        values: dict[str, _Value],
        default_source: str,
        parent: _Settings | None = None,
    ) -> None:
        self._values = values
        self._default_source = default_source
        self._parent = parent

    def _lookup(self, key: str) -> _Value | None:
        value = self._values.get(key)
        if value is None and self._parent is not None:
            return self._parent._lookup(key)
        return value

    def own(self, key: str) -> bool:
        """True if this section itself sets the key (not inherited)."""
        return key in self._values

    def where(self, key: str) -> str:
        """The file (or the command line) a key's value came from, or would."""
        value = self._lookup(key)
        return value.source if value else self._default_source

    def error(self, key: str, problem: str) -> ConfigError:
        """An error about ``key``, blamed on the section that uses its value.

        A label that inherits a key from [est] is the one whose combination
        fails (its own ca-cert with the inherited ca-key, say).
        """
        source = self.where(key)
        if self._parent is not None and not self.own(key):
            source = self._default_source
        return ConfigError(key, source, problem)

    def given(self, key: str) -> bool:
        """True if the key was set in the file or on the command line."""
        return self._lookup(key) is not None

    def text(self, key: str) -> str | None:
        value = self._lookup(key)
        if value is not None:
            return value.text
        spec = KEYS_BY_NAME[key]
        if spec.required:
            raise ConfigError(key, self.where(key), "is required but not set")
        return spec.default

    def parse(self, key: str, parser):  # type: ignore[no-untyped-def]
        text = self.text(key)
        try:
            return parser(text)
        except ValueError as exc:
            raise self.error(key, str(exc)) from None

    def path(self, key: str) -> str | None:
        value = self._lookup(key)
        if value is None:
            self.text(key)  # raises when required
            return None
        return os.path.normpath(os.path.join(value.base_dir, value.text))

    def read(self, key: str) -> bytes | None:
        path = self.path(key)
        if path is None:
            return None
        try:
            with open(path, "rb") as handle:
                return handle.read()
        except OSError as exc:
            raise self.error(key, f"cannot read {path}: {exc.strerror}") from None

    def certificates(self, key: str) -> tuple[x509.Certificate, ...]:
        data = self.read(key)
        if data is None:
            return ()
        try:
            certificates = load_certificates(data)
        except ValueError:
            certificates = []
        if not certificates:
            raise self.error(key, f"{self.path(key)} holds no PEM certificate")
        return tuple(certificates)

    def private_key(self, key: str, passphrase: bytes | None = None) -> CAPrivateKey:
        data = self.read(key)
        assert data is not None  # private keys are required keys
        path = self.path(key)
        try:
            return load_private_key(data, passphrase)
        except TypeError:
            if passphrase is None:
                hint = (
                    "set ca-key-passphrase-file"
                    if key == "ca-key"
                    else "estd needs it unencrypted"
                )
                raise self.error(key, f"{path} is encrypted; {hint}") from None
            raise self.error(
                key, f"{path} is not encrypted; remove the passphrase"
            ) from None
        except ValueError as exc:
            if str(exc).startswith("unsupported key type"):
                reason = str(exc)
            elif passphrase is not None:
                reason = "wrong passphrase, or not a private key"
            else:
                reason = "not a PEM private key (SEC1, PKCS#1 or PKCS#8)"
            raise self.error(key, f"{path}: {reason}") from None


def _gather(
    config_path: str | None, options: Mapping[str, str | None]
) -> tuple[_Settings, dict[str, _Settings]]:
    """The [est] settings (with command-line overrides) and each label's."""
    values: dict[str, _Value] = {}
    label_values: dict[str, dict[str, _Value]] = {}
    if config_path is not None:
        parser = configparser.ConfigParser(interpolation=None, default_section="\0")
        parser.optionxform = str  # type: ignore[assignment,method-assign]
        try:
            with open(config_path, encoding="utf-8") as handle:
                parser.read_file(handle)
        except OSError as exc:
            raise ConfigError(
                None, config_path, f"cannot read: {exc.strerror}"
            ) from None
        except configparser.Error as exc:
            problem = str(exc).splitlines()[0]
            raise ConfigError(
                None, config_path, f"not a valid ini file: {problem}"
            ) from None
        if not parser.has_section(SECTION):
            raise ConfigError(None, config_path, f"has no [{SECTION}] section")
        base_dir = os.path.dirname(os.path.abspath(config_path))
        for section in parser.sections():
            label = _label_of_section(section, config_path)
            source = config_path if label is None else f"{config_path} [{section}]"
            if label is not None and label in label_values:
                raise ConfigError(
                    None, config_path, f"[{section}]: label {label} is defined twice"
                )
            target = values if label is None else label_values.setdefault(label, {})
            for name, text in parser.items(section):
                spec = KEYS_BY_NAME.get(name)
                if spec is None:
                    raise ConfigError(name, source, "unknown key")
                if label is not None and not spec.per_label:
                    raise ConfigError(
                        name, source, f"is a server-wide key; set it in [{SECTION}]"
                    )
                target[name] = _Value(text, source, base_dir)
    for name, option in options.items():
        if option is None:
            continue
        if name not in KEYS_BY_NAME:
            raise ConfigError(name, COMMAND_LINE, "unknown option")
        values[name] = _Value(option, COMMAND_LINE, os.getcwd())
    server = _Settings(values, config_path or COMMAND_LINE)
    labels = {
        label: _Settings(own, f"{config_path} [label {label}]", parent=server)
        for label, own in label_values.items()
    }
    return server, labels


def _label_of_section(section: str, config_path: str) -> str | None:
    """None for [est], the label name for [label NAME]; anything else fails."""
    if section == SECTION:
        return None
    kind, _, name = section.partition(" ")
    name = name.strip()
    if kind != "label":
        raise ConfigError(
            None,
            config_path,
            f"unknown section [{section}]; expected [{SECTION}] or [label NAME]",
        )
    if not LABEL_NAME.fullmatch(name):
        raise ConfigError(
            None,
            config_path,
            f"[{section}]: a label is 1-128 characters of A-Z a-z 0-9 . _ -",
        )
    if name in (".", ".."):
        raise ConfigError(
            None, config_path, f"[{section}]: URLs cannot reach the label {name}"
        )
    if name in OPERATION_NAMES:
        raise ConfigError(
            None, config_path, f"[{section}]: {name} is an EST operation, not a label"
        )
    return name


def load_config(
    config_path: str | None,
    options: Mapping[str, str | None],
    now: datetime.datetime,
) -> Config:
    """Read est.ini (if any) and the command-line options into a :class:`Config`.

    Command-line values win over the file.  Relative paths in the file are
    relative to the file; on the command line, to the working directory.
    """
    settings, label_settings = _gather(config_path, options)
    source = config_path or COMMAND_LINE

    port = settings.parse("port", lambda text: _integer(text, 1, 65535))
    listen = settings.text("listen")
    if listen is None or (
        settings.where("port") == COMMAND_LINE
        and settings.where("listen") != COMMAND_LINE
        and settings.given("port")
    ):
        # `listen` wins over `port`, except that a --port on the command line
        # beats a `listen` from the file (the command line always wins).
        listen = f"tcp:{port}"

    tls_certificates = settings.certificates("tls-cert")
    tls_key = settings.private_key("tls-key")
    if not public_keys_match(tls_certificates[0].public_key(), tls_key.public_key()):
        raise settings.error(
            "tls-key", "does not belong to the first certificate in tls-cert"
        )
    _check_current("tls-cert", settings, tls_certificates[0], now)

    threads = settings.parse("threads", lambda text: _integer(text, 1, 256))
    loader = _LabelLoader(now)
    labels = {"": loader.load("", settings)}
    for name, own in sorted(label_settings.items()):
        labels[name] = loader.load(name, own)
    return Config(
        source=source,
        listen=listen,
        tls_certificates=tls_certificates,
        tls_key=tls_key,
        threads=threads,
        labels=MappingProxyType(labels),
        ledger_url=ledger_url(settings, config_path),
        admin_listen=(settings.text("admin-listen") or "").strip(),
        workers=settings.parse("workers", _workers),
        cpu_affinity=settings.parse("cpu-affinity", _cpu_affinity),
        max_pending=settings.parse(
            "max-pending",
            lambda t: 8 * threads if t is None else _integer(t, 1, 1_000_000),
        ),
        max_connections=settings.parse(
            "max-connections", lambda t: _integer(t, 1, 1_000_000)
        ),
        handshake_timeout=settings.parse("handshake-timeout", _seconds),
        header_timeout=settings.parse("header-timeout", _seconds),
        body_timeout=settings.parse("body-timeout", _seconds),
        log_format=settings.parse("log-format", _log_format),
        shutdown_timeout=settings.parse(
            "shutdown-timeout", lambda t: parse_duration(t, allow_zero=True)
        ),
    )


def _check_current(
    key: str, settings: _Settings, certificate: x509.Certificate, now: datetime.datetime
) -> None:
    if certificate.not_valid_after_utc <= now:
        raise settings.error(
            key,
            f"the certificate expired on {certificate.not_valid_after_utc:%Y-%m-%d}",
        )
    if certificate.not_valid_before_utc > now:
        raise settings.error(
            key,
            "the certificate is not valid before "
            f"{certificate.not_valid_before_utc:%Y-%m-%d %H:%M} UTC",
        )


class _LabelLoader:
    """Builds each label's settings, loading a file shared by labels once."""

    def __init__(self, now: datetime.datetime) -> None:
        self.now = now
        self._authorities: dict[tuple[str | None, ...], CertificateAuthority] = {}
        self._users: dict[str, UsersFile] = {}

    def load(self, label: str, settings: _Settings) -> LabelConfig:
        """The :class:`LabelConfig` of one label (or of [est] for '')."""
        ca = self._authority(settings)
        roots = settings.certificates("root-cert")
        client_cas = settings.certificates("client-cas")
        for anchor in client_cas:
            try:
                check_ca_certificate(anchor)
            except ValueError as exc:
                subject = anchor.subject.rfc4514_string()
                raise settings.error("client-cas", f"{subject}: {exc}") from None

        line_length = settings.parse(
            "base64-line-length", lambda t: _integer(t, 0, 4096)
        )
        if line_length % 4:
            raise settings.error(
                "base64-line-length", f"{line_length} is not a multiple of 4 (or 0)"
            )
        key_type = settings.parse("serverkeygen-key-type", _key_type)
        auth = settings.parse("auth", lambda t: _choice(t, AuthMode))
        users = self._users_file(settings, auth)
        cacerts = _unique((*roots, ca.certificate, *ca.chain))
        return LabelConfig(
            label=label,
            ca=ca,
            root_certificates=roots,
            client_cas=client_cas,
            cert_duration=settings.parse("cert-duration", parse_duration),
            response_profile=settings.parse(
                "response-profile", lambda t: _choice(t, ResponseProfile)
            ),
            enroll_subject=settings.parse(
                "enroll-subject", lambda t: _choice(t, EnrollSubject)
            ),
            base64_line_length=line_length,
            cacerts_body=encode_base64(certs_only(list(cacerts)), line_length),
            csrattrs=settings.parse("csrattrs", parse_csrattrs),
            csrattrs_enforce=settings.parse("csrattrs-enforce", _boolean),
            serverkeygen=settings.parse("serverkeygen", _boolean),
            serverkeygen_key_type=key_type,
            auth=auth,
            users=users,
            realm=settings.parse("realm", _realm),
            require_pop=settings.parse("require-pop", _boolean),
            reenroll_grace=settings.parse(
                "reenroll-grace", lambda t: parse_duration(t, allow_zero=True)
            ),
            manual_approval=settings.parse("approval", _approval),
            approval_retry_after=settings.parse(
                "approval-retry-after", lambda t: _integer(t, 1, 86400)
            ),
            pending_expiry=settings.parse("pending-expiry", parse_duration),
            max_issuance_per_day=settings.parse(
                "max-issuance-per-day", lambda t: _integer(t, 0, 1_000_000)
            ),
            revoke_superseded=settings.parse("revoke-superseded", _boolean),
        )

    def _authority(self, settings: _Settings) -> CertificateAuthority:
        # Two labels naming the same CA files (or token key) share one CA.
        in_token = is_pkcs11_uri(settings.text("ca-key") or "")
        cache_key: tuple[str | None, ...] = (
            settings.path("ca-cert"),
            *(
                (
                    settings.text("ca-key"),
                    settings.path("pkcs11-module"),
                    settings.path("pkcs11-pin-file"),
                )
                if in_token
                else (settings.path("ca-key"),)
            ),
        )
        if cache_key in self._authorities:
            return self._authorities[cache_key]
        ca_certificates = settings.certificates("ca-cert")
        ca_certificate = ca_certificates[0]
        try:
            check_ca_certificate(ca_certificate)
        except ValueError as exc:
            raise settings.error("ca-cert", str(exc)) from None
        _check_current("ca-cert", settings, ca_certificate, self.now)
        ca_key: CAPrivateKey | Signer
        if in_token:
            ca_key = _token_key(settings, ca_certificate)
        else:
            passphrase_data = settings.read("ca-key-passphrase-file")
            passphrase = (
                passphrase_data.rstrip(b"\r\n") if passphrase_data is not None else None
            )
            ca_key = settings.private_key("ca-key", passphrase)
        try:
            ca = CertificateAuthority(ca_certificate, ca_key, ca_certificates[1:])
        except ValueError as exc:
            raise settings.error(
                "ca-key", f"{exc} ({settings.path('ca-cert')})"
            ) from None
        self._authorities[cache_key] = ca
        return ca

    def _users_file(self, settings: _Settings, auth: AuthMode) -> UsersFile | None:
        path = settings.path("users-file")
        if path is None:
            if auth.uses_basic:
                raise settings.error(
                    "users-file", f"is required with auth = {auth.value}"
                )
            return None
        if path not in self._users:
            try:
                self._users[path] = UsersFile.load(path)
            except OSError as exc:
                raise settings.error(
                    "users-file", f"cannot read {path}: {exc.strerror}"
                ) from None
            except ValueError as exc:
                raise settings.error("users-file", f"{path}: {exc}") from None
        return self._users[path]


def _workers(text: str) -> int:
    if text.strip().lower() == "auto":
        return max(1, len(os.sched_getaffinity(0)))
    return _integer(text, 1, 256)


def _cpu_affinity(text: str) -> bool:
    value = text.strip().lower()
    if value not in ("none", "auto"):
        raise ValueError(f"{text!r} is not none or auto")
    if value == "auto" and not hasattr(os, "sched_setaffinity"):
        raise ValueError("auto needs an OS that can pin processes to CPUs (Linux)")
    return value == "auto"


def _seconds(text: str) -> float:
    return parse_duration(text).total_seconds()


def _log_format(text: str) -> str:
    value = text.strip().lower()
    if value not in ("text", "json"):
        raise ValueError(f"{text!r} is not text or json")
    return value


def _token_key(settings: _Settings, ca_certificate: x509.Certificate) -> Pkcs11Signer:
    """The pkcs11: ca-key, found and logged in to, checked against ca-cert."""
    uri = settings.text("ca-key") or ""
    for key in ("pkcs11-module", "pkcs11-pin-file"):
        if not settings.given(key):
            raise settings.error(key, "is required when ca-key is a pkcs11: URI")
    module = settings.path("pkcs11-module")
    pin_file = settings.path("pkcs11-pin-file")
    assert module is not None and pin_file is not None
    pin_data = settings.read("pkcs11-pin-file")
    assert pin_data is not None
    try:
        pin = pin_from_file(pin_data)
    except HsmError as exc:
        raise settings.error("pkcs11-pin-file", f"{pin_file}: {exc}") from None
    try:
        return Pkcs11Signer.open(module, uri, pin, certificate=ca_certificate)
    except ModuleError as exc:
        raise settings.error("pkcs11-module", str(exc)) from None
    except WrongPin as exc:
        raise settings.error("ca-key", f"{exc} (pkcs11-pin-file {pin_file})") from None
    except HsmError as exc:
        raise settings.error("ca-key", str(exc)) from None


def _approval(text: str) -> bool:
    value = text.strip().lower()
    if value not in ("auto", "manual"):
        raise ValueError(f"{text!r} is not auto or manual")
    return value == "manual"


def ledger_url(settings: _Settings, config_path: str | None) -> str:
    """The ledger's database URL; plain ``sqlite`` lives in the state dir."""
    text = (settings.text("ledger") or "sqlite").strip()
    if text.startswith(("postgresql://", "postgres://", "sqlite:///")):
        return text
    if text != "sqlite":
        raise settings.error(
            "ledger", f"{text!r} is not sqlite, sqlite:///PATH or postgresql://..."
        )
    state_dir = settings.path("state-dir")
    if state_dir is None:
        base = os.path.dirname(os.path.abspath(config_path)) if config_path else "."
        state_dir = os.path.abspath(base)
    if not os.path.isdir(state_dir):
        raise settings.error("state-dir", f"{state_dir} is not a directory")
    return "sqlite:///" + os.path.join(state_dir, "estd.sqlite3")


def ledger_location(config_path: str) -> str:
    """The ledger URL est.ini names, without loading certificates or keys."""
    settings, _ = _gather(config_path, {})
    return ledger_url(settings, config_path)


def _key_type(text: str) -> str:
    value = text.strip().lower()
    if value not in KEY_TYPES:
        raise ValueError(f"{text!r} is not one of {', '.join(KEY_TYPES)}")
    return value


def _realm(text: str) -> str:
    value = text.strip()
    if not value or '"' in value or "\\" in value or not value.isprintable():
        raise ValueError(f"{text!r} is not a usable realm (printable, no quotes)")
    return value


def _unique(certificates: tuple[x509.Certificate, ...]) -> tuple[x509.Certificate, ...]:
    seen: dict[bytes, x509.Certificate] = {}
    for certificate in certificates:
        seen.setdefault(certificate.fingerprint(_SHA256), certificate)
    return tuple(seen.values())
