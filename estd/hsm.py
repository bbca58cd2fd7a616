"""The EST CA key in a PKCS#11 token: a hardware security module, or SoftHSM2.

``ca-key = pkcs11:token=estd;object=est-ca`` (an RFC 7512 URI) names a
private key that never leaves the token.  :class:`Pkcs11Signer` hands the
token the bytes to sign and gives :class:`estd.ca.CertificateAuthority` an
X.509 signature value; :func:`import_key` (``estctl hsm-import``) puts an
existing EST CA key into a token.

PKCS#11 logs in per application, not per session: the first C_Login logs
every session of the process in, and a second one fails with
CKR_USER_ALREADY_LOGGED_IN.  So a token is opened and logged in once per
process and shared by every signer on it (two labels, the config after a
reload), and signing threads take turns at the module (see :class:`_Token`).
"""

from __future__ import annotations

import argparse
import contextlib
import hmac
import os
import re
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pkcs11
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass

from estd.ca import SignerPublicKey, encode_der, load_private_key
from estd.wire import _sequence_children, read_tlv

SCHEME = "pkcs11:"

CURVES: dict[str, str] = {"secp256r1": "p256", "secp384r1": "p384", "secp521r1": "p521"}
"""EC curves a token key may use (cryptography's name: estd's key-type suffix)."""

_RSA_MECHANISMS = {
    "sha256": Mechanism.SHA256_RSA_PKCS,
    "sha384": Mechanism.SHA384_RSA_PKCS,
    "sha512": Mechanism.SHA512_RSA_PKCS,
}
_EC_PUBLIC_KEY_OID = bytes.fromhex("06072a8648ce3d0201")  # RFC 5480 §2.1.1
_SELF_TEST = b"estd: does the token key belong to the CA certificate?"


class HsmError(ValueError):
    """A PKCS#11 problem, in one line that never contains the PIN."""


class ModuleError(HsmError):
    """The PKCS#11 module cannot be loaded."""


class WrongPin(HsmError):
    """The token refused the user PIN."""


def is_pkcs11_uri(text: str) -> bool:
    """True if ``text`` is meant as a PKCS#11 URI rather than a file name."""
    return text.strip().lower().startswith(SCHEME)


def pin_from_file(data: bytes) -> str:
    """The PIN in a PIN file: its first line, without the line ending."""
    line = data.split(b"\n", 1)[0].rstrip(b"\r")
    try:
        pin = line.decode("utf-8")
    except UnicodeDecodeError:
        raise HsmError("the PIN file's first line is not UTF-8") from None
    if not pin:
        raise HsmError("the PIN file is empty; its first line is the user PIN")
    return pin


# --- RFC 7512 URIs -----------------------------------------------------------

_PATH_ATTRIBUTES = ("token", "manufacturer", "serial", "model", "object", "id", "type")
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
# RFC 7512 §2.3: unreserved characters and pk11-res-avail stay as they are.
_SAFE = "-._~:[]@!$'()*+,="


@dataclass(frozen=True)
class Pkcs11Uri:
    """The parts of an RFC 7512 PKCS#11 URI that pick a token and a private key."""

    token: str | None = None
    manufacturer: str | None = None
    serial: str | None = None
    model: str | None = None
    object_label: str | None = None
    object_id: bytes | None = None

    @classmethod
    def parse(cls, text: str) -> Pkcs11Uri:
        """Parse ``pkcs11:token=...;object=...;id=%01;type=private``.

        Raises :class:`HsmError` for anything estd would not use exactly as
        written: unknown or repeated attributes, a type other than private,
        a URI naming no key, and any query, above all ``pin-value``: the PIN
        belongs in pkcs11-pin-file, not in est.ini.  Messages quote no
        attribute values.
        """
        text = text.strip()
        if not is_pkcs11_uri(text):
            raise HsmError("a PKCS#11 URI starts with pkcs11:")
        path, _, query = text[len(SCHEME) :].partition("?")
        if query:
            names = [
                part.partition("=")[0].strip().lower() for part in query.split("&")
            ]
            if "pin-value" in names:
                raise HsmError(
                    "the URI holds a PIN (pin-value); estd refuses PINs in est.ini: "
                    "put the PIN in pkcs11-pin-file"
                )
            raise HsmError(
                f"the URI query ({', '.join(names)}) is not supported; give the "
                "module as pkcs11-module and the PIN in pkcs11-pin-file"
            )
        values: dict[str, bytes] = {}
        for part in path.split(";") if path else ():
            name, equals, value = part.partition("=")
            name = name.strip().lower()
            if not equals:
                raise HsmError("a URI attribute lacks '=' (write NAME=VALUE)")
            if name not in _PATH_ATTRIBUTES:
                raise HsmError(
                    f"the URI attribute {name!r} is not one estd uses "
                    f"({', '.join(_PATH_ATTRIBUTES)})"
                )
            if name in values:
                # RFC 7512 §2.3: an attribute appears at most once.
                raise HsmError(f"the URI gives {name} twice")
            if _BAD_PERCENT.search(value):
                raise HsmError(
                    f"the URI's {name} has a % not followed by two hex digits"
                )
            values[name] = urllib.parse.unquote_to_bytes(value)
        kind = values.pop("type", b"private")
        if kind != b"private":
            raise HsmError(
                "the URI's type must be private: the CA key is a private key"
            )
        strings: dict[str, str] = {}
        for name, raw in values.items():
            if name != "id":
                try:
                    strings[name] = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise HsmError(f"the URI's {name} is not UTF-8") from None
        if "object" not in strings and "id" not in values:
            raise HsmError("the URI names no key: add object=LABEL or id=%XX")
        return cls(
            token=strings.get("token"),
            manufacturer=strings.get("manufacturer"),
            serial=strings.get("serial"),
            model=strings.get("model"),
            object_label=strings.get("object"),
            object_id=values.get("id"),
        )

    def __str__(self) -> str:
        parts = [
            f"{name}={urllib.parse.quote(value, safe=_SAFE)}"
            for name, value in (
                ("token", self.token),
                ("manufacturer", self.manufacturer),
                ("serial", self.serial),
                ("model", self.model),
                ("object", self.object_label),
            )
            if value is not None
        ]
        if self.object_id is not None:
            parts.append("id=" + "".join(f"%{byte:02X}" for byte in self.object_id))
        parts.append("type=private")
        return SCHEME + ";".join(parts)

    @property
    def token_description(self) -> str:
        """How error messages name the token, e.g. ``token 'estd'``."""
        parts = [
            f"{name} {value!r}"
            for name, value in (
                ("token", self.token),
                ("serial", self.serial),
                ("manufacturer", self.manufacturer),
                ("model", self.model),
            )
            if value is not None
        ]
        return ", ".join(parts) or "any token"

    @property
    def key_description(self) -> str:
        """How error messages name the key, e.g. ``private key 'est-ca'``."""
        parts = []
        if self.object_label is not None:
            parts.append(repr(self.object_label))
        if self.object_id is not None:
            parts.append(f"id {self.object_id.hex()}")
        return "private key " + " ".join(parts)

    def matches_token(self, token: pkcs11.Token) -> bool:
        """True if ``token`` has every token attribute the URI gives."""
        wanted = (
            (self.token, token.label),
            (self.serial, token.serial.decode("ascii", "replace")),
            (self.manufacturer, token.manufacturer_id),
            (self.model, token.model),
        )
        return all(value is None or value == actual for value, actual in wanted)

    def private_key_template(self) -> dict[Attribute, Any]:
        """The PKCS#11 search template of the key."""
        template: dict[Attribute, Any] = {Attribute.CLASS: ObjectClass.PRIVATE_KEY}
        if self.object_label is not None:
            template[Attribute.LABEL] = self.object_label
        if self.object_id is not None:
            template[Attribute.ID] = self.object_id
        return template


# --- Tokens, logins and sessions -------------------------------------------


@dataclass
class _Session:
    """One PKCS#11 session and the key objects found in it."""

    session: pkcs11.Session
    keys: dict[Pkcs11Uri, Any] = field(default_factory=dict)

    def private_key(self, uri: Pkcs11Uri) -> Any:
        """The key ``uri`` names, as an object of this session."""
        key = self.keys.get(uri)
        if key is None:
            found = list(self.session.get_objects(uri.private_key_template()))
            if not found:
                raise HsmError(f"{uri.token_description} has no {uri.key_description}")
            if len(found) > 1:
                raise HsmError(
                    f"{uri.token_description} has {len(found)} keys matching "
                    f"{uri.key_description}; add id= to the URI"
                )
            key = self.keys[uri] = found[0]
        return key


@dataclass(eq=False)
class _Module:
    """A loaded PKCS#11 module.

    python-pkcs11 calls C_Initialize without CKF_OS_LOCKING_OK, which
    promises the module that no two threads call it at once (PKCS#11 v2.40
    §5.4); SoftHSM2 then takes no locks of its own, and concurrent signing
    fails with CKR_GENERAL_ERROR even on separate sessions.  So every call
    into a module holds its ``lock``.
    """

    lib: Any
    lock: threading.Lock = field(default_factory=threading.Lock)
    pid: int = field(default_factory=os.getpid)

    def for_this_process(self) -> None:
        """Initialise the module again in a child process (hold the lock).

        ``twistd`` without ``-n`` forks after makeService loaded the config;
        the child must not use the parent's PKCS#11 state (PKCS#11 v2.40
        §5.5.1) and calls C_Finalize and C_Initialize itself.
        """
        if self.pid != os.getpid():
            self.lib.reinitialize()
            self.pid = os.getpid()


class _Token:
    """A token logged in for the life of the process, and its work session.

    The login session stays open (closing the last session would log the
    process out); signing uses one work session, under the module's lock.
    """

    def __init__(
        self, module: _Module, token: pkcs11.Token, login: pkcs11.Session, pin: str
    ) -> None:
        self.token = token
        self._module = module
        self._login = login
        # Kept to log in again in a child process after a fork.
        self._pin = pin
        self._pid = os.getpid()
        self._work: _Session | None = None

    def has_pin(self, pin: str) -> bool:
        """True if ``pin`` is the PIN this process logged in with."""
        return hmac.compare_digest(self._pin.encode("utf-8"), pin.encode("utf-8"))

    def _for_this_process(self) -> None:
        if self._pid != os.getpid():
            self._module.for_this_process()
            self._login = self.token.open(user_pin=self._pin)
            self._work = None
            self._pid = os.getpid()

    @contextlib.contextmanager
    def session(self) -> Iterator[_Session]:
        """The work session, for the calling thread alone until it is done.

        A session in which the token failed an operation is closed and
        replaced, not reused.
        """
        with self._module.lock:
            self._for_this_process()
            if self._work is None:
                self._work = _Session(self.token.open())
            try:
                yield self._work
            except pkcs11.PKCS11Error:
                with contextlib.suppress(pkcs11.PKCS11Error):
                    self._work.session.close()
                self._work = None
                raise

    @contextlib.contextmanager
    def read_write_session(self) -> Iterator[pkcs11.Session]:
        """A read/write session (to create objects), closed afterwards."""
        with self._module.lock:
            self._for_this_process()
            with self.token.open(rw=True) as session:
                yield session

    def __repr__(self) -> str:
        return f"<_Token {self.token.label!r}>"


_modules: dict[str, _Module] = {}
_tokens: dict[tuple[str, int], _Token] = {}
_tokens_lock = threading.Lock()
"""Held to load modules and log in; taken before a module's lock, never after."""


def _fresh_locks_after_fork() -> None:
    # A lock some other thread held at the fork stays locked in the child.
    global _tokens_lock
    _tokens_lock = threading.Lock()
    for module in _modules.values():
        module.lock = threading.Lock()


os.register_at_fork(after_in_child=_fresh_locks_after_fork)


def _reason(error: Exception) -> str:
    """What a python-pkcs11 exception says, or the CKR it stands for."""
    text = str(error).strip()
    return text.rsplit(": ", 1)[-1] if text else type(error).__name__


def _load_module(module_path: str) -> _Module:
    """The loaded module; C_Initialize runs once per file and process."""
    real = os.path.realpath(module_path)
    if real in _modules:
        return _modules[real]
    if not os.path.isfile(real):
        raise ModuleError(f"the PKCS#11 module {module_path} does not exist")
    try:
        module = _modules[real] = _Module(pkcs11.lib(real))
    except pkcs11.PKCS11Error as error:
        raise ModuleError(
            f"cannot load the PKCS#11 module {module_path}: {_reason(error)}"
        ) from None
    return module


def _find_token(lib: Any, uri: Pkcs11Uri, module_path: str) -> pkcs11.Token:
    tokens: list[pkcs11.Token] = list(lib.get_tokens())
    matching = [token for token in tokens if uri.matches_token(token)]
    if len(matching) == 1:
        return matching[0]
    if not matching:
        labels = ", ".join(sorted(repr(t.label) for t in tokens if t.label)) or "none"
        raise HsmError(
            f"no {uri.token_description} in {module_path} (tokens: {labels})"
        )
    raise HsmError(
        f"{len(matching)} tokens in {module_path} match {uri.token_description}; "
        "add token= or serial= to the URI"
    )


def _open_token(module_path: str, uri: Pkcs11Uri, pin: str) -> _Token:
    """The token ``uri`` names, logged in with ``pin`` once per process."""
    with _tokens_lock:
        module = _load_module(module_path)
        with module.lock:
            try:
                module.for_this_process()
                token = _find_token(module.lib, uri, module_path)
            except pkcs11.PKCS11Error as error:
                raise HsmError(
                    f"cannot list the tokens of {module_path}: {_reason(error)}"
                ) from None
            return _log_in(module, token, pin)


def _log_in(module: _Module, token: pkcs11.Token, pin: str) -> _Token:
    name = f"token {token.label!r}"
    key = (os.path.realpath(module.lib.so), token.slot.slot_id)
    opened = _tokens.get(key)
    if opened is not None:
        if not opened.has_pin(pin):
            # The token accepted another PIN from this process, and a second
            # C_Login cannot check this one.
            raise WrongPin(
                f"the PKCS#11 PIN of {name} is wrong (not the one estd "
                "logged in with; a changed PIN takes effect at restart)"
            )
        return opened
    try:
        login = token.open(user_pin=pin)
    except (pkcs11.PinIncorrect, pkcs11.PinInvalid, pkcs11.PinLenRange):
        raise WrongPin(f"the PKCS#11 PIN of {name} is wrong") from None
    except pkcs11.PinLocked:
        raise HsmError(f"the user PIN of {name} is locked") from None
    except pkcs11.UserPinNotInitialized:
        raise HsmError(f"{name} has no user PIN yet") from None
    except pkcs11.PKCS11Error as error:
        raise HsmError(f"cannot log in to {name}: {_reason(error)}") from None
    opened = _tokens[key] = _Token(module, token, login, pin)
    return opened


# --- Signing -----------------------------------------------------------------


class Pkcs11Signer:
    """A private key in a PKCS#11 token that signs certificates and CRLs.

    Satisfies :class:`estd.ca.Signer`.  Safe to use from many threads.
    """

    def __init__(
        self, token: _Token, uri: Pkcs11Uri, public_key: SignerPublicKey
    ) -> None:
        """Use :meth:`open`."""
        self._token = token
        self.uri = uri
        self._public_key = public_key

    @classmethod
    def open(
        cls,
        module_path: str,
        uri: str | Pkcs11Uri,
        pin: str,
        certificate: x509.Certificate | None = None,
    ) -> Pkcs11Signer:
        """Find the key ``uri`` names in a token of the module, logging in with ``pin``.

        The public key comes from the token (a public key object with the
        private key's CKA_ID or label, or an RSA key's own modulus), else
        from ``certificate``.  A test signature checks that the two halves
        belong together.  Every failure is an :class:`HsmError`.
        """
        if isinstance(uri, str):
            uri = Pkcs11Uri.parse(uri)
        token = _open_token(module_path, uri, pin)
        try:
            with token.session() as session:
                private = session.private_key(uri)
                public_key = _public_key_on_token(session.session, private)
                key_type = private.key_type
        except pkcs11.PKCS11Error as error:
            raise HsmError(
                f"cannot read the {uri.key_description} in {uri.token_description}: "
                f"{_reason(error)}"
            ) from None
        if key_type not in (KeyType.EC, KeyType.RSA):
            raise HsmError(f"the {uri.key_description} is not an EC or RSA key")
        from_certificate = public_key is None
        if public_key is None:
            if certificate is None:
                raise HsmError(
                    f"{uri.token_description} has no public key for the "
                    f"{uri.key_description}; give its certificate"
                )
            found = certificate.public_key()
            if not isinstance(found, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
                raise HsmError("the certificate's key is not an EC or RSA key")
            public_key = found
        signer = cls(token, uri, public_key)
        signer._self_test(from_certificate)
        return signer

    def _self_test(self, from_certificate: bool) -> None:
        # Checked once at start: a wrong key object, or a token public key
        # that is not the private key's, fails here and not in a device.
        if isinstance(self._public_key, ec.EllipticCurvePublicKey):
            if self._public_key.curve.name not in CURVES:
                raise HsmError(
                    f"the {self.uri.key_description} uses the curve "
                    f"{self._public_key.curve.name}; estd uses P-256, P-384, P-521"
                )
        signature = self.sign(_SELF_TEST, hashes.SHA256())
        try:
            if isinstance(self._public_key, ec.EllipticCurvePublicKey):
                self._public_key.verify(
                    signature, _SELF_TEST, ec.ECDSA(hashes.SHA256())
                )
            else:
                self._public_key.verify(
                    signature, _SELF_TEST, padding.PKCS1v15(), hashes.SHA256()
                )
        except InvalidSignature:
            whose = "the CA certificate" if from_certificate else "its public key"
            raise HsmError(
                f"the {self.uri.key_description} in {self.uri.token_description} "
                f"does not belong to {whose}"
            ) from None

    def public_key(self) -> SignerPublicKey:
        """The public half of the token's key."""
        return self._public_key

    @property
    def curve(self) -> ec.EllipticCurve | None:
        """The EC curve of the key; None for RSA."""
        if isinstance(self._public_key, ec.EllipticCurvePublicKey):
            return self._public_key.curve
        return None

    @property
    def key_type(self) -> str:
        """The key type as /serverkeygen names them: ec-p256, ec-p384, rsa-2048..."""
        if self.curve is not None:
            return "ec-" + CURVES.get(self.curve.name, self.curve.name)
        return f"rsa-{self._public_key.key_size}"

    def sign(self, data: bytes, hash_algorithm: hashes.HashAlgorithm) -> bytes:
        """The X.509 signature value of ``data``, made in the token.

        ECDSA: the token signs the hash (CKM_ECDSA, which every token has,
        unlike CKM_ECDSA_SHA384) and the r||s it returns becomes a DER
        ECDSA-Sig-Value (RFC 3279 §2.2.3).  RSA: CKM_SHA256_RSA_PKCS (or
        SHA-384/512), PKCS#1 v1.5 as X.509 wants it.
        """
        if self.curve is not None:
            digest = hashes.Hash(hash_algorithm)
            digest.update(data)
            payload, mechanism = digest.finalize(), Mechanism.ECDSA
        else:
            found = _RSA_MECHANISMS.get(hash_algorithm.name)
            if found is None:
                raise HsmError(
                    f"estd signs with RSA and SHA-2, not {hash_algorithm.name}"
                )
            payload, mechanism = data, found
        try:
            with self._token.session() as session:
                key = session.private_key(self.uri)
                raw: bytes = key.sign(payload, mechanism=mechanism)
        except pkcs11.PKCS11Error as error:
            raise HsmError(
                f"{self.uri.token_description} did not sign with the "
                f"{self.uri.key_description}: {_reason(error)}"
            ) from None
        if self.curve is None:
            return raw
        size = (self.curve.key_size + 7) // 8
        if len(raw) != 2 * size:
            raise HsmError(
                f"{self.uri.token_description} returned an ECDSA signature of "
                f"{len(raw)} bytes, not {2 * size}"
            )
        r = int.from_bytes(raw[:size], "big")
        s = int.from_bytes(raw[size:], "big")
        return encode_dss_signature(r, s)

    def __repr__(self) -> str:
        return f"<Pkcs11Signer {self.uri}>"


def _public_key_on_token(
    session: pkcs11.Session, private: Any
) -> SignerPublicKey | None:
    """The public half of ``private`` as the token holds it, if it does."""
    template: dict[Attribute, Any] = {
        Attribute.CLASS: ObjectClass.PUBLIC_KEY,
        Attribute.KEY_TYPE: private.key_type,
    }
    key_id = private[Attribute.ID]
    if key_id:
        template[Attribute.ID] = key_id
    else:
        template[Attribute.LABEL] = private.label
    found = list(session.get_objects(template))
    if private.key_type == KeyType.RSA:
        # An RSA private key object carries its modulus and public exponent.
        source = found[0] if len(found) == 1 else private
        try:
            modulus = int.from_bytes(source[Attribute.MODULUS], "big")
            exponent = int.from_bytes(source[Attribute.PUBLIC_EXPONENT], "big")
        except pkcs11.PKCS11Error:
            return None
        return rsa.RSAPublicNumbers(exponent, modulus).public_key()
    if private.key_type != KeyType.EC or len(found) != 1:
        return None
    return _ec_public_key(found[0][Attribute.EC_PARAMS], found[0][Attribute.EC_POINT])


def _ec_public_key(params: bytes, point: bytes) -> ec.EllipticCurvePublicKey | None:
    """An EC public key from CKA_EC_PARAMS and CKA_EC_POINT."""
    # CKA_EC_POINT is a DER OCTET STRING around the X9.62 point, but some
    # tokens store the bare point.  Both start with 04; only the right
    # reading gives a point on the curve.
    candidates = [point]
    with contextlib.suppress(ValueError):
        tag, start, end = read_tlv(point, 0)
        if tag == 0x04 and end == len(point):
            candidates.insert(0, point[start:end])
    for candidate in candidates:
        spki = encode_der(
            0x30,
            encode_der(0x30, _EC_PUBLIC_KEY_OID + params)
            + encode_der(0x03, b"\x00" + candidate),
        )
        with contextlib.suppress(ValueError, TypeError):
            key = serialization.load_der_public_key(spki)
            if isinstance(key, ec.EllipticCurvePublicKey):
                return key
    return None


# --- Importing a key ---------------------------------------------------------


def _big(value: int) -> bytes:
    return value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big")


def _key_templates(
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, label: str, key_id: bytes
) -> tuple[dict[Attribute, Any], dict[Attribute, Any]]:
    """PKCS#11 templates of the private and the public key object."""
    common: dict[Attribute, Any] = {
        Attribute.TOKEN: True,
        Attribute.LABEL: label,
        Attribute.ID: key_id,
    }
    private: dict[Attribute, Any] = {
        **common,
        Attribute.CLASS: ObjectClass.PRIVATE_KEY,
        Attribute.PRIVATE: True,
        # The point of the token: the key can sign and never be read back.
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: False,
        Attribute.SIGN: True,
        Attribute.DECRYPT: False,
        Attribute.UNWRAP: False,
        Attribute.DERIVE: False,
    }
    public: dict[Attribute, Any] = {
        **common,
        Attribute.CLASS: ObjectClass.PUBLIC_KEY,
        Attribute.PRIVATE: False,
        Attribute.VERIFY: True,
        Attribute.ENCRYPT: False,
        Attribute.WRAP: False,
        Attribute.DERIVE: False,
    }
    if isinstance(key, ec.EllipticCurvePrivateKey):
        public_key = key.public_key()
        spki = public_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        params = _sequence_children(_sequence_children(spki)[0])[1]
        point = public_key.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        size = (key.curve.key_size + 7) // 8
        private.update(
            {
                Attribute.KEY_TYPE: KeyType.EC,
                Attribute.EC_PARAMS: params,
                Attribute.VALUE: key.private_numbers().private_value.to_bytes(
                    size, "big"
                ),
            }
        )
        public.update(
            {
                Attribute.KEY_TYPE: KeyType.EC,
                Attribute.EC_PARAMS: params,
                Attribute.EC_POINT: encode_der(0x04, point),
            }
        )
        return private, public
    numbers = key.private_numbers()
    modulus = _big(numbers.public_numbers.n)
    exponent = _big(numbers.public_numbers.e)
    private.update(
        {
            Attribute.KEY_TYPE: KeyType.RSA,
            Attribute.MODULUS: modulus,
            Attribute.PUBLIC_EXPONENT: exponent,
            Attribute.PRIVATE_EXPONENT: _big(numbers.d),
            Attribute.PRIME_1: _big(numbers.p),
            Attribute.PRIME_2: _big(numbers.q),
            Attribute.EXPONENT_1: _big(numbers.dmp1),
            Attribute.EXPONENT_2: _big(numbers.dmq1),
            Attribute.COEFFICIENT: _big(numbers.iqmp),
        }
    )
    public.update(
        {
            Attribute.KEY_TYPE: KeyType.RSA,
            Attribute.MODULUS: modulus,
            Attribute.PUBLIC_EXPONENT: exponent,
        }
    )
    return private, public


def import_key(
    module: str,
    token_label: str,
    pin: str,
    key_pem_bytes: bytes,
    object_label: str,
    passphrase: bytes | None = None,
) -> str:
    """Store a private key (PEM or DER) in a token; return its ``pkcs11:`` URI.

    The token gets a sensitive, non-extractable private key object and its
    public key object, both labelled ``object_label``, with the key's
    RFC 5280 §4.2.1.2 key identifier (SHA-1 of the public key) as CKA_ID.
    A label already in use on the token is refused.
    """
    try:
        key = load_private_key(key_pem_bytes, passphrase)
    except TypeError:
        problem = "needs a passphrase" if passphrase is None else "is not encrypted"
        raise HsmError(f"the key {problem}") from None
    except ValueError as error:
        reason = "wrong passphrase, or not a private key"
        if str(error).startswith("unsupported"):
            reason = str(error)
        raise HsmError(f"cannot load the key: {reason}") from None
    if isinstance(key, ed25519.Ed25519PrivateKey):
        raise HsmError("estd signs with EC or RSA keys in a token, not Ed25519")
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name not in CURVES:
        raise HsmError(f"estd does not use the curve {key.curve.name}")
    if not object_label:
        raise HsmError("the key needs a label")
    uri = Pkcs11Uri(token=token_label, object_label=object_label)
    token = _open_token(module, uri, pin)
    key_id = x509.SubjectKeyIdentifier.from_public_key(key.public_key()).digest
    private, public = _key_templates(key, object_label, key_id)
    try:
        with token.read_write_session() as session:
            if list(session.get_objects({Attribute.LABEL: object_label})):
                raise HsmError(
                    f"token {token_label!r} already holds an object labelled "
                    f"{object_label!r}"
                )
            stored = session.create_object(private)
            try:
                session.create_object(public)
            except pkcs11.PKCS11Error:
                stored.destroy()
                raise
    except pkcs11.PKCS11Error as error:
        raise HsmError(
            f"cannot store the key in token {token_label!r}: {_reason(error)}"
        ) from None
    return str(uri)


# --- estctl hsm-import -------------------------------------------------------


def _first_line(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read().split(b"\n", 1)[0].rstrip(b"\r")


def hsm_import(args: argparse.Namespace) -> int:
    """estctl hsm-import: put the EST CA key into a token, print est.ini lines."""
    # estd.admin imports estd.config, which imports this module.
    from estd.admin import CommandError

    try:
        with open(args.pin_file, "rb") as handle:
            pin = pin_from_file(handle.read())
        with open(args.keyfile, "rb") as handle:
            key_data = handle.read()
        passphrase = _first_line(args.passphrase_file) if args.passphrase_file else None
        uri = import_key(args.module, args.token, pin, key_data, args.label, passphrase)
    except OSError as error:
        raise CommandError(f"cannot read {error.filename}: {error.strerror}") from None
    except ValueError as error:
        raise CommandError(str(error)) from None
    print(f"stored {args.keyfile} in token {args.token!r}; in est.ini:")
    print(f"ca-key = {uri}")
    print(f"pkcs11-module = {os.path.abspath(args.module)}")
    print(f"pkcs11-pin-file = {os.path.abspath(args.pin_file)}")
    print(
        f"estd no longer needs {args.keyfile}: keep it offline as a backup, "
        "not on the server."
    )
    return 0


def add_commands(commands: Any) -> None:
    """Add ``estctl hsm-import`` to estctl's subcommand parser."""
    command = commands.add_parser(
        "hsm-import",
        help="put the EST CA key into a PKCS#11 token",
        description="Store an EST CA private key (SEC1, PKCS#1 or PKCS#8; PEM "
        "or DER; EC or RSA) in a PKCS#11 token as a sensitive, non-extractable "
        "key with its public key, and print the est.ini lines that use it.",
    )
    command.add_argument("keyfile", help="the EST CA private key")
    command.add_argument(
        "--module",
        required=True,
        help="the PKCS#11 module, e.g. /usr/lib/softhsm/libsofthsm2.so",
    )
    command.add_argument("--token", required=True, help="the token's label")
    command.add_argument(
        "--pin-file", required=True, help="file whose first line is the user PIN"
    )
    command.add_argument(
        "--label",
        required=True,
        metavar="OBJECT",
        help="label of the new key objects (object= in the URI)",
    )
    command.add_argument(
        "--passphrase-file", help="file whose first line is the key's passphrase"
    )
    command.set_defaults(run=hsm_import)


__all__ = [
    "HsmError",
    "ModuleError",
    "Pkcs11Signer",
    "Pkcs11Uri",
    "WrongPin",
    "add_commands",
    "import_key",
    "is_pkcs11_uri",
    "pin_from_file",
]
