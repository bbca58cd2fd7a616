"""CSR Attributes: what ``/csrattrs`` tells clients to put in their CSRs.

RFC 7030 §4.5.2 defines the response body as the DER of::

    CsrAttrs ::= SEQUENCE SIZE (0..MAX) OF AttrOrOID
    AttrOrOID ::= CHOICE { oid OBJECT IDENTIFIER, attribute Attribute }
    Attribute ::= SEQUENCE { type OBJECT IDENTIFIER,
                             values SET SIZE(1..MAX) OF ANY }

cryptography has no public DER encoder for arbitrary structures, so this
module carries a tiny one for exactly these three types.  Every value estd
puts in an Attribute is an OBJECT IDENTIFIER, as in the RFC 7030 §4.5.2
example; RFC 9908 clarifies these semantics (and adds a CSR template form
that estd does not emit).

The est.ini syntax (``csrattrs = ...``) is a list of items separated by
commas and/or whitespace, so an ini multi-line value works:

* ``NAME`` or a dotted OID: a bare OID (``challengePassword``,
  ``ecdsa-with-SHA384``, ``1.3.6.1.1.1.1.22``);
* ``NAME:VALUE[+VALUE...]``: an Attribute of type NAME whose values are the
  OIDs of the VALUEs (``ecPublicKey:secp384r1``,
  ``extensionRequest:macAddress+subjectAltName``).

Names are matched case-insensitively; :data:`KNOWN_NAMES` lists them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import SignatureAlgorithmOID

from estd.wire import elements, read_tlv

RFC7030_EXAMPLE = (
    "challengePassword, ecPublicKey:secp384r1, extensionRequest:macAddress, "
    "ecdsa-with-SHA384"
)
"""The example of RFC 7030 §4.5.2 in est.ini syntax."""

# (canonical name, dotted OID, aliases).  The canonical names are the ones
# OpenSSL prints, so `openssl asn1parse` output reads like the config.
_NAME_TABLE: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    # PKCS#9 attributes (RFC 2985 §5.4)
    ("challengePassword", "1.2.840.113549.1.9.7", ()),
    ("extensionRequest", "1.2.840.113549.1.9.14", ()),
    # Public key algorithms (RFC 5480 §2.1.1, RFC 8017 App. A, RFC 8410 §3)
    ("ecPublicKey", "1.2.840.10045.2.1", ("id-ecPublicKey",)),
    ("rsaEncryption", "1.2.840.113549.1.1.1", ()),
    ("Ed25519", "1.3.101.112", ("id-Ed25519",)),
    # Named curves (RFC 5480 §2.1.1.1)
    ("secp256r1", "1.2.840.10045.3.1.7", ("P-256", "prime256v1")),
    ("secp384r1", "1.3.132.0.34", ("P-384",)),
    ("secp521r1", "1.3.132.0.35", ("P-521",)),
    # Signature algorithms (RFC 5758 §3.2, RFC 4055 §5); RFC 7030 spells
    # them ecdsaWithSHA384 and so on.
    ("ecdsa-with-SHA256", "1.2.840.10045.4.3.2", ("ecdsaWithSHA256",)),
    ("ecdsa-with-SHA384", "1.2.840.10045.4.3.3", ("ecdsaWithSHA384",)),
    ("ecdsa-with-SHA512", "1.2.840.10045.4.3.4", ("ecdsaWithSHA512",)),
    ("sha256WithRSAEncryption", "1.2.840.113549.1.1.11", ()),
    ("sha384WithRSAEncryption", "1.2.840.113549.1.1.12", ()),
    ("sha512WithRSAEncryption", "1.2.840.113549.1.1.13", ()),
    # RFC 2307 macAddress, which the RFC 7030 §4.5.2 example requests
    ("macAddress", "1.3.6.1.1.1.1.22", ()),
    # Certificate extensions (RFC 5280 §4.2.1)
    ("subjectAltName", "2.5.29.17", ()),
    ("keyUsage", "2.5.29.15", ()),
    ("extKeyUsage", "2.5.29.37", ()),
    # Subject attribute types (RFC 5280 App. A)
    ("serialNumber", "2.5.4.5", ()),
)

KNOWN_NAMES: tuple[str, ...] = tuple(name for name, _, _ in _NAME_TABLE)
"""The canonical names parse_csrattrs knows (aliases aside)."""

_OID_BY_NAME = {
    alias.lower(): x509.ObjectIdentifier(dotted)
    for name, dotted, aliases in _NAME_TABLE
    for alias in (name, *aliases)
}
_NAME_BY_OID = {x509.ObjectIdentifier(dotted): name for name, dotted, _ in _NAME_TABLE}

_CHALLENGE_PASSWORD = _OID_BY_NAME["challengepassword"]
_EXTENSION_REQUEST = _OID_BY_NAME["extensionrequest"]
# Microsoft's older extension request attribute; cryptography reads it as
# an extension request too, so requirements count extensions found there.
_MS_EXTENSION_REQUEST = x509.ObjectIdentifier("1.3.6.1.4.1.311.2.1.14")
_EC_PUBLIC_KEY = _OID_BY_NAME["ecpublickey"]
_RSA_ENCRYPTION = _OID_BY_NAME["rsaencryption"]
_ED25519 = _OID_BY_NAME["ed25519"]
_KEY_ALGORITHMS = frozenset({_EC_PUBLIC_KEY, _RSA_ENCRYPTION, _ED25519})
# Ed25519's OID names both the key and the signature (RFC 8410 §3); it is
# treated as a key requirement, which implies the signature.
_SIGNATURE_ALGORITHMS = (
    frozenset(
        value
        for value in vars(SignatureAlgorithmOID).values()
        if isinstance(value, x509.ObjectIdentifier)
    )
    - _KEY_ALGORITHMS
)
_EXTENSION_ARC = "2.5.29."  # id-ce (RFC 5280 §4.2.1)
_SUBJECT_ATTRIBUTE_ARC = "2.5.4."  # id-at (RFC 5280 App. A)

_Complaint = Callable[[str], ValueError]

_SEPARATORS = re.compile(r"[,\s]+")
_DOTTED_OID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+")


def _display(oid: x509.ObjectIdentifier) -> str:
    """The canonical name of ``oid``, or its dotted form when it has none."""
    return _NAME_BY_OID.get(oid, oid.dotted_string)


@dataclass(frozen=True)
class AttrOrOid:
    """One CsrAttrs element: a bare OID, or an Attribute whose values are OIDs."""

    oid: x509.ObjectIdentifier
    """The bare OID, or the Attribute's type."""
    values: tuple[x509.ObjectIdentifier, ...] = ()
    """The Attribute's values; empty for a bare OID."""

    @property
    def is_attribute(self) -> bool:
        """True for an Attribute, False for a bare OID."""
        return bool(self.values)

    @property
    def der(self) -> bytes:
        """The DER encoding of this AttrOrOID."""
        if not self.values:
            return _der_oid(self.oid)
        # X.690 §11.6: DER sorts the encodings of SET OF elements.
        values = b"".join(sorted(_der_oid(value) for value in self.values))
        return _der_tlv(0x30, _der_oid(self.oid) + _der_tlv(0x31, values))

    def __str__(self) -> str:
        """The item in est.ini syntax with canonical names."""
        if not self.values:
            return _display(self.oid)
        return _display(self.oid) + ":" + "+".join(map(_display, self.values))


@dataclass(frozen=True)
class CsrAttrs:
    """A parsed ``csrattrs`` setting and the DER body ``/csrattrs`` serves."""

    items: tuple[AttrOrOid, ...]
    """The elements, in the order the configuration lists them."""
    der: bytes
    """The DER ``CsrAttrs`` SEQUENCE (``30 00`` when there are no items)."""

    @classmethod
    def of(cls, items: tuple[AttrOrOid, ...]) -> CsrAttrs:
        """CsrAttrs holding ``items``, with their DER encoding computed."""
        return cls(items, _der_tlv(0x30, b"".join(item.der for item in items)))

    def describe(self) -> str:
        """A one-line summary for logs, in est.ini syntax with canonical names."""
        if not self.items:
            return "none"
        return ", ".join(map(str, self.items))


def parse_csrattrs(text: str) -> CsrAttrs:
    """Parse the est.ini ``csrattrs`` value.

    Raises ``ValueError`` with a one-line message naming the first bad item.
    Empty text gives a CsrAttrs without items.
    """
    words = [word for word in _SEPARATORS.split(text) if word]
    return CsrAttrs.of(tuple(_parse_item(word) for word in words))


def _parse_item(item: str) -> AttrOrOid:
    def bad(problem: str) -> ValueError:
        return ValueError(f"csrattrs item {item!r}: {problem}")

    name, colon, rest = item.partition(":")
    if not colon:
        if "+" in item:
            raise bad("'+' joins values after 'NAME:', as in extensionRequest:a+b")
        return AttrOrOid(_oid_of(item, bad))
    if not name:
        raise bad("nothing before ':'")
    if ":" in rest:
        raise bad("more than one ':'")
    if not rest:
        raise bad("no value after ':'")
    if "" in rest.split("+"):
        raise bad("an empty value between '+' signs")
    values = tuple(_oid_of(value, bad) for value in rest.split("+"))
    if len(set(values)) != len(values):
        raise bad("a value is listed twice")
    return AttrOrOid(_oid_of(name, bad), values)


def _oid_of(word: str, bad: _Complaint) -> x509.ObjectIdentifier:
    known = _OID_BY_NAME.get(word.lower())
    if known is not None:
        return known
    if not _DOTTED_OID.fullmatch(word):
        raise bad(f"{word!r} is neither a known name nor a dotted OID")
    first, second = (int(arc) for arc in word.split(".")[:2])
    # X.660: the first arc is 0, 1 or 2; under 0 and 1 the second is < 40.
    if first > 2 or (first < 2 and second >= 40):
        raise bad(f"{word!r} is not a valid OID")
    try:
        return x509.ObjectIdentifier(word)
    except ValueError:
        raise bad(f"{word!r} is not an OID cryptography accepts") from None


# --- DER ---------------------------------------------------------------------


def _der_tlv(tag: int, content: bytes) -> bytes:
    """One DER element: tag, definite length (X.690 §8.1.3), content."""
    size = len(content)
    if size < 0x80:
        return bytes([tag, size]) + content
    length = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(length)]) + length + content


def _base128(number: int) -> bytes:
    """X.690 §8.19.2: base-128 digits, high bit set on all but the last."""
    digits = [number & 0x7F]
    number >>= 7
    while number:
        digits.append(0x80 | (number & 0x7F))
        number >>= 7
    return bytes(reversed(digits))


def _der_oid(oid: x509.ObjectIdentifier) -> bytes:
    """The DER of an OBJECT IDENTIFIER (X.690 §8.19)."""
    arcs = [int(arc) for arc in oid.dotted_string.split(".")]
    # X.690 §8.19.4: the first two arcs share one subidentifier.
    body = _base128(40 * arcs[0] + arcs[1]) + b"".join(map(_base128, arcs[2:]))
    return _der_tlv(0x06, body)


def _decode_oid(content: bytes) -> x509.ObjectIdentifier:
    """The OBJECT IDENTIFIER whose DER contents are ``content``."""
    if not content or content[-1] & 0x80:
        raise ValueError("malformed OBJECT IDENTIFIER")
    numbers, value = [], 0
    for byte in content:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            numbers.append(value)
            value = 0
    first = min(numbers[0] // 40, 2)
    arcs = [first, numbers[0] - 40 * first, *numbers[1:]]
    return x509.ObjectIdentifier(".".join(map(str, arcs)))


# --- Enforcement -------------------------------------------------------------


@dataclass(frozen=True)
class _CsrContents:
    """The OIDs a CSR carries, read from its DER."""

    attributes: frozenset[x509.ObjectIdentifier]
    extensions: frozenset[x509.ObjectIdentifier]
    subject_fields: frozenset[x509.ObjectIdentifier]

    @classmethod
    def of(cls, csr: x509.CertificateSigningRequest) -> _CsrContents:
        attributes: set[x509.ObjectIdentifier] = set()
        extensions: set[x509.ObjectIdentifier] = set()
        subject: frozenset[x509.ObjectIdentifier] = frozenset()
        try:
            _collect(csr.tbs_certrequest_bytes, attributes, extensions)
            subject = frozenset(field.oid for field in csr.subject)
        except ValueError:
            # Whatever could not be read counts as absent, so a requirement
            # is reported unmet rather than the request failing with 500.
            pass
        return cls(frozenset(attributes), frozenset(extensions), subject)


def _collect(
    tbs: bytes,
    attributes: set[x509.ObjectIdentifier],
    extensions: set[x509.ObjectIdentifier],
) -> None:
    """Add the attribute and requested extension OIDs of a CSR's info."""
    # RFC 2986 §4.1: CertificationRequestInfo ::= SEQUENCE { version,
    # subject, subjectPKInfo, attributes [0] IMPLICIT SET OF Attribute }.
    # The DER is read directly because cryptography's csr.attributes raises
    # on a multi-valued attribute, which RFC 2986 allows.
    _, start, end = read_tlv(tbs, 0, len(tbs))
    fields = list(elements(tbs, start, end))
    for tag, field_start, field_end in fields[3:]:
        if tag != 0xA0:
            continue
        for _, attr_start, attr_end in elements(tbs, field_start, field_end):
            parts = list(elements(tbs, attr_start, attr_end))
            if len(parts) != 2 or parts[0][0] != 0x06:
                raise ValueError("malformed Attribute")
            oid = _decode_oid(tbs[parts[0][1] : parts[0][2]])
            attributes.add(oid)
            if oid in (_EXTENSION_REQUEST, _MS_EXTENSION_REQUEST):
                # RFC 2985 §5.4.2: the value is Extensions ::= SEQUENCE OF
                # Extension, each a SEQUENCE starting with its extnID.
                for _, seq_start, seq_end in elements(tbs, *parts[1][1:]):
                    for _, ext_start, ext_end in elements(tbs, seq_start, seq_end):
                        tag, id_start, id_end = read_tlv(tbs, ext_start, ext_end)
                        if tag == 0x06:
                            extensions.add(_decode_oid(tbs[id_start:id_end]))


def _key_matches(item: AttrOrOid, key: object) -> bool:
    if item.oid == _RSA_ENCRYPTION:
        return isinstance(key, rsa.RSAPublicKey)
    if item.oid == _ED25519:
        return isinstance(key, ed25519.Ed25519PublicKey)
    if not isinstance(key, ec.EllipticCurvePublicKey):
        return False
    return not item.values or key.curve.name in map(_curve_name, item.values)


def _curve_name(oid: x509.ObjectIdentifier) -> str:
    try:
        return ec.get_curve_for_oid(oid)().name
    except LookupError:
        return ""  # a curve cryptography does not know; no key is on it


def _key_description(item: AttrOrOid) -> str:
    if item.oid == _RSA_ENCRYPTION:
        return "an RSA key"
    if item.oid == _ED25519:
        return "an Ed25519 key"
    if item.values:
        return "a key on curve " + " or ".join(map(_display, item.values))
    return "an EC key"


def _missing_item(item: AttrOrOid, csr: _CsrContents) -> list[str]:
    """What a CSR lacks for one presence requirement (not key or signature)."""
    if item.oid == _CHALLENGE_PASSWORD:
        if _CHALLENGE_PASSWORD in csr.attributes:
            return []
        return ["the challengePassword attribute"]
    if item.oid == _EXTENSION_REQUEST and item.values:
        return [
            f"the extension {_display(value)}"
            for value in item.values
            if value not in csr.extensions
        ]
    if item.oid.dotted_string.startswith(_EXTENSION_ARC):
        if item.oid in csr.extensions:
            return []
        return [f"the extension {_display(item.oid)}"]
    if item.oid in csr.attributes | csr.extensions | csr.subject_fields:
        return []
    if item.oid.dotted_string.startswith(_SUBJECT_ATTRIBUTE_ARC):
        return [f"the subject field, attribute or extension {_display(item.oid)}"]
    return [f"the attribute or extension {_display(item.oid)}"]


def _is_signature(item: AttrOrOid) -> bool:
    return not item.values and item.oid in _SIGNATURE_ALGORITHMS


def missing_csrattrs(attrs: CsrAttrs, csr: x509.CertificateSigningRequest) -> list[str]:
    """Describe each ``csrattrs`` requirement ``csr`` does not meet.

    Used for ``csrattrs-enforce = yes``; an empty list means the CSR meets
    them all.  RFC 7030 §4.5.2 leaves the server free to refuse a CSR that
    ignores the attributes it asked for.  Key types (``ecPublicKey``,
    ``rsaEncryption``, ``Ed25519``) are alternatives, as a key has one type;
    so are signature algorithms.  Everything else must be present: a bare
    extension OID (``2.5.29.*``) as a requested extension, the values of
    ``extensionRequest:...`` as requested extensions, ``challengePassword``
    as an attribute, and any other OID as an attribute, a requested
    extension or a subject field.
    """
    if not attrs.items:
        return []
    contents = _CsrContents.of(csr)
    key = csr.public_key()
    keys = [item for item in attrs.items if item.oid in _KEY_ALGORITHMS]
    key_problem = []
    if keys and not any(_key_matches(choice, key) for choice in keys):
        key_problem = [", or ".join(dict.fromkeys(map(_key_description, keys)))]
    signatures = [item.oid for item in attrs.items if _is_signature(item)]
    signature_problem = []
    if signatures and csr.signature_algorithm_oid not in signatures:
        names = dict.fromkeys(map(_display, signatures))
        signature_problem = ["signature " + " or ".join(names)]
    missing: list[str] = []
    for item in attrs.items:
        # A group of alternatives is reported where its first member is
        # listed; the de-duplication below drops the repeats.
        if item.oid in _KEY_ALGORITHMS:
            missing.extend(key_problem)
        elif _is_signature(item):
            missing.extend(signature_problem)
        else:
            missing.extend(_missing_item(item, contents))
    return list(dict.fromkeys(missing))


__all__ = [
    "KNOWN_NAMES",
    "RFC7030_EXAMPLE",
    "AttrOrOid",
    "CsrAttrs",
    "missing_csrattrs",
    "parse_csrattrs",
]


def csr_attribute_values(
    csr: x509.CertificateSigningRequest, oid: x509.ObjectIdentifier
) -> list[tuple[int, bytes]]:
    """The (tag, contents) of each value of the CSR attributes of type ``oid``.

    Read from the DER for the same reason as :func:`_collect`: a CSR may
    legitimately carry multi-valued attributes.  Raises ``ValueError`` for
    a malformed attribute set.
    """
    tbs = csr.tbs_certrequest_bytes
    _, start, end = read_tlv(tbs, 0, len(tbs))
    values: list[tuple[int, bytes]] = []
    for tag, field_start, field_end in list(elements(tbs, start, end))[3:]:
        if tag != 0xA0:
            continue
        for _, attr_start, attr_end in elements(tbs, field_start, field_end):
            parts = list(elements(tbs, attr_start, attr_end))
            if len(parts) != 2 or parts[0][0] != 0x06:
                raise ValueError("malformed Attribute")
            if _decode_oid(tbs[parts[0][1] : parts[0][2]]) != oid:
                continue
            for value_tag, value_start, value_end in elements(tbs, *parts[1][1:]):
                values.append((value_tag, tbs[value_start:value_end]))
    return values


def decode_oid(content: bytes) -> x509.ObjectIdentifier:
    """The OBJECT IDENTIFIER whose DER contents are ``content``."""
    return _decode_oid(content)


def oid_name(oid: x509.ObjectIdentifier) -> str | None:
    """A readable name for ``oid`` (ours, else cryptography's), or None."""
    name = _NAME_BY_OID.get(oid) or getattr(oid, "_name", None)
    return None if name in (None, "Unknown OID") else str(name)
