"""Unit tests of estd.csrattrs: the csrattrs setting, its DER and enforcement."""

from __future__ import annotations

import base64
import functools
import re

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import AttributeOID, NameOID
from pyasn1.codec.der import decoder as der_decoder
from pyasn1.codec.der import encoder as der_encoder
from pyasn1_alt_modules import rfc7030

from estd.csrattrs import (
    KNOWN_NAMES,
    RFC7030_EXAMPLE,
    AttrOrOid,
    CsrAttrs,
    missing_csrattrs,
    parse_csrattrs,
)

# The CSR Attributes example of RFC 7030 §4.5.2, copied from the RFC text
# (RFC 9908 repeats it with its hex dump): challengePassword,
# ecPublicKey {secp384r1}, extensionRequest {macAddress}, ecdsaWithSHA384.
RFC7030_EXAMPLE_BASE64 = (
    "MEEGCSqGSIb3DQEJBzASBgcqhkjOPQIBMQcGBSuBBAAiMBYGCSqGSIb3DQEJDjEJ"
    "BgcrBgEBAQEWBggqhkjOPQQDAw=="
)

# DER of single OBJECT IDENTIFIERs, written out by hand from X.690 §8.19.
CHALLENGE_PASSWORD = bytes.fromhex("06092a864886f70d010907")
EXTENSION_REQUEST = bytes.fromhex("06092a864886f70d01090e")
EC_PUBLIC_KEY = bytes.fromhex("06072a8648ce3d0201")
SECP256R1 = bytes.fromhex("06082a8648ce3d030107")
SECP384R1 = bytes.fromhex("06052b81040022")
MAC_ADDRESS = bytes.fromhex("06072b060101010116")
SUBJECT_ALT_NAME = bytes.fromhex("0603551d11")
ECDSA_WITH_SHA384 = bytes.fromhex("06082a8648ce3d040303")


def sequence(*elements: bytes) -> bytes:
    """A DER SEQUENCE of short-form elements (content under 128 bytes)."""
    content = b"".join(elements)
    assert len(content) < 128
    return bytes([0x30, len(content)]) + content


def set_of(*elements: bytes) -> bytes:
    """A DER SET of short-form elements, given already in DER order."""
    content = b"".join(elements)
    assert len(content) < 128
    return bytes([0x31, len(content)]) + content


def pyasn1_reencoding(der: bytes) -> bytes:
    """``der`` decoded as CsrAttrs and re-encoded by pyasn1's DER encoder."""
    decoded, rest = der_decoder.decode(der, asn1Spec=rfc7030.CsrAttrs())
    assert rest == b""
    encoded: bytes = der_encoder.encode(decoded)
    return encoded


# --- DER ---------------------------------------------------------------------


def test_rfc7030_example_is_byte_exact() -> None:
    """The RFC 7030 §4.5.2 example in est.ini syntax encodes to the RFC's bytes."""
    attrs = parse_csrattrs(RFC7030_EXAMPLE)
    assert attrs.der == base64.b64decode(RFC7030_EXAMPLE_BASE64)
    assert attrs.der == sequence(
        CHALLENGE_PASSWORD,
        sequence(EC_PUBLIC_KEY, set_of(SECP384R1)),
        sequence(EXTENSION_REQUEST, set_of(MAC_ADDRESS)),
        ECDSA_WITH_SHA384,
    )


def test_rfc7030_example_items() -> None:
    """The RFC example parses into two bare OIDs and two single-valued Attributes."""
    items = parse_csrattrs(RFC7030_EXAMPLE).items
    oid = x509.ObjectIdentifier
    assert items == (
        AttrOrOid(oid("1.2.840.113549.1.9.7")),
        AttrOrOid(oid("1.2.840.10045.2.1"), (oid("1.3.132.0.34"),)),
        AttrOrOid(oid("1.2.840.113549.1.9.14"), (oid("1.3.6.1.1.1.1.22"),)),
        AttrOrOid(oid("1.2.840.10045.4.3.3")),
    )
    assert [item.is_attribute for item in items] == [False, True, True, False]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("challengePassword", sequence(CHALLENGE_PASSWORD)),
        ("ecdsa-with-SHA384", sequence(ECDSA_WITH_SHA384)),
        ("1.3.6.1.1.1.1.22", sequence(MAC_ADDRESS)),
        ("subjectAltName", sequence(SUBJECT_ALT_NAME)),
        (
            "ecPublicKey:secp384r1",
            sequence(sequence(EC_PUBLIC_KEY, set_of(SECP384R1))),
        ),
        # X.690 §8.19.5's own example: {2 100 3} is 06 03 81 34 03.
        ("2.100.3", sequence(bytes.fromhex("0603813403"))),
    ],
)
def test_single_item_der(text: str, expected: bytes) -> None:
    """A one-item setting encodes to exactly the hand-written DER."""
    assert parse_csrattrs(text).der == expected
    assert pyasn1_reencoding(expected) == expected


@pytest.mark.parametrize(
    "text",
    [
        "extensionRequest:macAddress+subjectAltName",
        "extensionRequest:subjectAltName+macAddress",
    ],
)
def test_attribute_values_are_sorted_as_der_requires(text: str) -> None:
    """Attribute values come out in DER SET OF order whatever order they are listed."""
    expected = sequence(
        sequence(EXTENSION_REQUEST, set_of(SUBJECT_ALT_NAME, MAC_ADDRESS))
    )
    assert parse_csrattrs(text).der == expected
    assert pyasn1_reencoding(expected) == expected


def test_long_setting_uses_long_form_length() -> None:
    """A setting over 127 bytes of DER gets a long-form length, as pyasn1 does."""
    attrs = parse_csrattrs(" ".join(KNOWN_NAMES))
    content_length = sum(len(item.der) for item in attrs.items)
    assert content_length > 127
    assert attrs.der[:3] == bytes([0x30, 0x81, content_length])
    assert pyasn1_reencoding(attrs.der) == attrs.der


def test_every_known_name_encodes_like_pyasn1() -> None:
    """Each known name's OID encodes to the same DER as pyasn1 produces."""
    for name in KNOWN_NAMES:
        der = parse_csrattrs(name).der
        assert pyasn1_reencoding(der) == der, name


# --- Syntax ------------------------------------------------------------------


def test_commas_newlines_and_blanks_separate_items() -> None:
    """Items may be separated by commas, newlines and blanks as in an ini value."""
    text = (
        "\n  challengePassword,\n\tecPublicKey:P-384\n"
        "  extensionRequest:macAddress ,, ecdsaWithSHA384,\n"
    )
    assert parse_csrattrs(text).der == base64.b64decode(RFC7030_EXAMPLE_BASE64)


@pytest.mark.parametrize("alias", ["secp256r1", "P-256", "prime256v1", "p-256"])
def test_curve_aliases(alias: str) -> None:
    """P-256, prime256v1 and secp256r1 (any case) all name the same curve."""
    expected = sequence(sequence(EC_PUBLIC_KEY, set_of(SECP256R1)))
    assert parse_csrattrs(f"ecPublicKey:{alias}").der == expected


def test_names_are_case_insensitive() -> None:
    """Names match whatever their case, and describe() uses the canonical spelling."""
    attrs = parse_csrattrs("CHALLENGEPASSWORD ECPUBLICKEY:P-521")
    assert attrs.describe() == "challengePassword, ecPublicKey:secp521r1"


@pytest.mark.parametrize("text", ["", "   ", "\n\n", " , ,\n"])
def test_empty_setting(text: str) -> None:
    """An empty setting has no items and encodes as an empty SEQUENCE."""
    attrs = parse_csrattrs(text)
    assert attrs.items == ()
    assert attrs.der == b"\x30\x00"
    assert attrs.describe() == "none"
    assert attrs == CsrAttrs.of(())


def test_describe_round_trips() -> None:
    """describe() is itself a valid setting that encodes to the same DER."""
    attrs = parse_csrattrs(
        "challengePassword ecPublicKey:P-384+P-256 extensionRequest:1.3.6.1.1.1.1.22 "
        "1.3.6.1.4.1.99999.7:2.5.29.15"
    )
    assert attrs.describe() == (
        "challengePassword, ecPublicKey:secp384r1+secp256r1, "
        "extensionRequest:macAddress, 1.3.6.1.4.1.99999.7:keyUsage"
    )
    assert parse_csrattrs(attrs.describe()).der == attrs.der


@pytest.mark.parametrize(
    ("item", "problem"),
    [
        ("bogus", "'bogus' is neither a known name nor a dotted OID"),
        ("ecPublicKey:P-999", "'P-999' is neither a known name nor a dotted OID"),
        ("3.1.2", "'3.1.2' is not a valid OID"),
        ("1.40.2", "'1.40.2' is not a valid OID"),
        ("1.02.3", "'1.02.3' is neither a known name nor a dotted OID"),
        ("1..2", "'1..2' is neither a known name nor a dotted OID"),
        ("ecPublicKey:", "no value after ':'"),
        (":secp384r1", "nothing before ':'"),
        ("ecPublicKey:secp384r1:x", "more than one ':'"),
        ("extensionRequest:macAddress++keyUsage", "an empty value between '+' signs"),
        ("ecPublicKey:P-384+secp384r1", "a value is listed twice"),
        ("macAddress+keyUsage", "'+' joins values after 'NAME:'"),
    ],
)
def test_parse_error_names_the_bad_item(item: str, problem: str) -> None:
    """A bad item is refused with a one-line message naming it and the problem."""
    text = f"challengePassword,\n{item}\necdsa-with-SHA384"
    with pytest.raises(ValueError, match=re.escape(f"csrattrs item {item!r}: ")) as e:
        parse_csrattrs(text)
    message = str(e.value)
    assert problem in message
    assert "\n" not in message


# --- Enforcement -------------------------------------------------------------

Key = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


@functools.cache
def key_of(kind: str) -> Key:
    """One private key per kind, shared by the tests (RSA is slow to make)."""
    if kind == "rsa":
        return rsa.generate_private_key(65537, 2048)
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    curve = {"p256": ec.SECP256R1(), "p384": ec.SECP384R1()}[kind]
    return ec.generate_private_key(curve)


def make_csr(
    kind: str = "p256",
    digest: hashes.HashAlgorithm | None = None,
    *,
    challenge: bool = False,
    extensions: tuple[x509.ExtensionType, ...] = (),
    attributes: tuple[str, ...] = (),
    subject: x509.Name | None = None,
) -> x509.CertificateSigningRequest:
    """A signed CSR with the given key kind, hash, attributes and extensions."""
    key = key_of(kind)
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        subject or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "device")])
    )
    if challenge:
        builder = builder.add_attribute(AttributeOID.CHALLENGE_PASSWORD, b"s3cret")
    for dotted in attributes:
        builder = builder.add_attribute(x509.ObjectIdentifier(dotted), b"value")
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return builder.sign(key, None)
    return builder.sign(key, digest or hashes.SHA256())


MAC_EXTENSION = x509.UnrecognizedExtension(
    x509.ObjectIdentifier("1.3.6.1.1.1.1.22"), bytes.fromhex("0406001122334455")
)
SAN = x509.SubjectAlternativeName([x509.DNSName("device.example")])
KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)


def test_rfc7030_example_met() -> None:
    """A CSR following the RFC example (P-384, SHA-384, password, MAC) meets it."""
    csr = make_csr("p384", hashes.SHA384(), challenge=True, extensions=(MAC_EXTENSION,))
    assert missing_csrattrs(parse_csrattrs(RFC7030_EXAMPLE), csr) == []


def test_rfc7030_example_missed_entirely() -> None:
    """A plain fioconfig-like CSR misses every RFC example requirement, in order."""
    assert missing_csrattrs(parse_csrattrs(RFC7030_EXAMPLE), make_csr()) == [
        "the challengePassword attribute",
        "a key on curve secp384r1",
        "the extension macAddress",
        "signature ecdsa-with-SHA384",
    ]


def test_empty_setting_requires_nothing() -> None:
    """With no csrattrs configured every CSR passes."""
    assert missing_csrattrs(parse_csrattrs(""), make_csr("rsa")) == []


@pytest.mark.parametrize(
    ("spec", "csr_args", "missing"),
    [
        ("challengePassword", {"challenge": True}, []),
        ("challengePassword", {}, ["the challengePassword attribute"]),
        ("ecPublicKey:secp384r1", {"kind": "p384"}, []),
        ("ecPublicKey:secp384r1", {"kind": "p256"}, ["a key on curve secp384r1"]),
        ("ecPublicKey:P-256+P-384", {"kind": "p256"}, []),
        (
            "ecPublicKey:P-256+P-384",
            {"kind": "rsa"},
            ["a key on curve secp256r1 or secp384r1"],
        ),
        ("ecPublicKey", {"kind": "p256"}, []),
        ("ecPublicKey", {"kind": "ed25519"}, ["an EC key"]),
        ("rsaEncryption", {"kind": "rsa"}, []),
        ("rsaEncryption", {"kind": "p256"}, ["an RSA key"]),
        ("Ed25519", {"kind": "ed25519"}, []),
        ("Ed25519", {"kind": "rsa"}, ["an Ed25519 key"]),
        ("ecPublicKey:P-384, rsaEncryption", {"kind": "rsa"}, []),
        (
            "ecPublicKey:P-384, rsaEncryption",
            {"kind": "p256"},
            ["a key on curve secp384r1, or an RSA key"],
        ),
        ("ecdsa-with-SHA384", {"digest": hashes.SHA384()}, []),
        ("ecdsa-with-SHA384", {}, ["signature ecdsa-with-SHA384"]),
        ("ecdsa-with-SHA256 ecdsa-with-SHA384", {"digest": hashes.SHA384()}, []),
        (
            "ecdsa-with-SHA512, ecdsa-with-SHA384",
            {},
            ["signature ecdsa-with-SHA512 or ecdsa-with-SHA384"],
        ),
        ("sha256WithRSAEncryption", {"kind": "rsa"}, []),
        (
            "sha512WithRSAEncryption",
            {"kind": "rsa"},
            ["signature sha512WithRSAEncryption"],
        ),
        (
            "extensionRequest:macAddress+subjectAltName",
            {"extensions": (MAC_EXTENSION, SAN)},
            [],
        ),
        (
            "extensionRequest:macAddress+subjectAltName",
            {"extensions": (SAN,)},
            ["the extension macAddress"],
        ),
        (
            "extensionRequest:macAddress+subjectAltName",
            {},
            ["the extension macAddress", "the extension subjectAltName"],
        ),
        ("subjectAltName", {"extensions": (SAN,)}, []),
        (
            "subjectAltName",
            {"extensions": (KEY_USAGE,)},
            ["the extension subjectAltName"],
        ),
        ("keyUsage", {"extensions": (KEY_USAGE,)}, []),
        ("keyUsage", {"attributes": ("2.5.29.15",)}, ["the extension keyUsage"]),
        ("extKeyUsage", {}, ["the extension extKeyUsage"]),
        ("macAddress", {"extensions": (MAC_EXTENSION,)}, []),
        ("macAddress", {"attributes": ("1.3.6.1.1.1.1.22",)}, []),
        ("macAddress", {}, ["the attribute or extension macAddress"]),
        ("1.3.6.1.4.1.99999.1", {"attributes": ("1.3.6.1.4.1.99999.1",)}, []),
        ("1.3.6.1.4.1.99999.1", {}, ["the attribute or extension 1.3.6.1.4.1.99999.1"]),
        (
            "serialNumber",
            {"subject": x509.Name([x509.NameAttribute(NameOID.SERIAL_NUMBER, "1234")])},
            [],
        ),
        (
            "serialNumber",
            {},
            ["the subject field, attribute or extension serialNumber"],
        ),
    ],
)
def test_requirement(
    spec: str, csr_args: dict[str, object], missing: list[str]
) -> None:
    """Each kind of csrattrs item is met by the matching CSR and reported otherwise."""
    csr = make_csr(**csr_args)  # type: ignore[arg-type]
    assert missing_csrattrs(parse_csrattrs(spec), csr) == missing


def test_alternatives_are_reported_once_where_first_listed() -> None:
    """Several key types or signatures yield one line each, at their first position."""
    spec = "ecdsa-with-SHA512 rsaEncryption challengePassword ecdsa-with-SHA384 Ed25519"
    assert missing_csrattrs(parse_csrattrs(spec), make_csr()) == [
        "signature ecdsa-with-SHA512 or ecdsa-with-SHA384",
        "an RSA key, or an Ed25519 key",
        "the challengePassword attribute",
    ]


def test_extension_request_attribute_alone() -> None:
    """A bare extensionRequest is met by a CSR that requests any extension."""
    attrs = parse_csrattrs("extensionRequest")
    assert missing_csrattrs(attrs, make_csr(extensions=(SAN,))) == []
    assert missing_csrattrs(attrs, make_csr()) == [
        "the attribute or extension extensionRequest"
    ]


def tlv(tag: int, content: bytes) -> bytes:
    """A DER element with a short- or one-byte long-form length."""
    if len(content) < 128:
        return bytes([tag, len(content)]) + content
    assert len(content) < 256
    return bytes([tag, 0x81, len(content)]) + content


def test_multi_valued_attribute_counts_as_present() -> None:
    """An attribute with two values, which cryptography cannot read, still counts."""
    key = ec.generate_private_key(ec.SECP256R1())
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    # Attribute { 1.3.6.1.4.1.99999.1, SET { 1.2.5, 1.2.6 } }
    attribute = bytes.fromhex("3015 06092b06010401868d1f01 3108 06022a05 06022a06")
    info = tlv(0x30, bytes.fromhex("020100 3000") + spki + tlv(0xA0, attribute))
    signature = key.sign(info, ec.ECDSA(hashes.SHA256()))
    ecdsa_with_sha256 = tlv(0x30, bytes.fromhex("06082a8648ce3d040302"))
    csr = x509.load_der_x509_csr(
        tlv(0x30, info + ecdsa_with_sha256 + tlv(0x03, b"\x00" + signature))
    )
    with pytest.raises(ValueError, match="single-valued"):
        list(csr.attributes)
    assert missing_csrattrs(parse_csrattrs("1.3.6.1.4.1.99999.1"), csr) == []
    assert missing_csrattrs(parse_csrattrs("challengePassword"), csr) == [
        "the challengePassword attribute"
    ]
