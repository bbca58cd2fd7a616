"""Unit tests of estd.serverkeygen: key generation and the multipart response."""

from __future__ import annotations

import base64
import datetime
import email
import email.message
import functools
import re

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID

from estd.serverkeygen import KEY_TYPES, GeneratedKey, generate_key, multipart_response
from estd.wire import certs_only

NOW = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)


def test_key_type_names() -> None:
    """The configuration accepts exactly the documented key type names."""
    assert KEY_TYPES == (
        "csr",
        "ec-p256",
        "ec-p384",
        "ec-p521",
        "rsa-2048",
        "rsa-3072",
        "rsa-4096",
        "ed25519",
    )


@pytest.mark.parametrize(
    ("key_type", "curve"),
    [("ec-p256", "secp256r1"), ("ec-p384", "secp384r1"), ("ec-p521", "secp521r1")],
)
def test_ec_key_types(key_type: str, curve: str) -> None:
    """An ec-* key type makes an EC key on that curve."""
    key = generate_key(key_type, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.curve.name == curve


@pytest.mark.parametrize("bits", [2048, 3072, 4096])
def test_rsa_key_types(bits: int) -> None:
    """An rsa-* key type makes an RSA key of that size with exponent 65537."""
    key = generate_key(f"rsa-{bits}", None)
    assert isinstance(key, rsa.RSAPrivateKey)
    assert key.key_size == bits
    assert key.public_key().public_numbers().e == 65537


def test_ed25519_key_type() -> None:
    """The ed25519 key type makes an Ed25519 key."""
    assert isinstance(generate_key("ed25519", None), ed25519.Ed25519PrivateKey)


def test_fresh_key_each_time() -> None:
    """Two calls never return the same key."""
    first, second = generate_key("ec-p256", None), generate_key("ec-p256", None)
    assert public_der(first) != public_der(second)


@pytest.mark.parametrize(
    "curve", [ec.SECP256R1(), ec.SECP384R1(), ec.SECP521R1()], ids=lambda c: c.name
)
def test_csr_mirrors_ec_curve(curve: ec.EllipticCurve) -> None:
    """Key type csr makes a new EC key on the CSR key's curve."""
    csr_key = ec.generate_private_key(curve).public_key()
    key = generate_key("csr", csr_key)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.curve.name == curve.name
    assert public_der(key) != public_der(csr_key)


@pytest.mark.parametrize("bits", [2048, 3072])
def test_csr_mirrors_rsa_size(bits: int) -> None:
    """Key type csr makes a new RSA key of the CSR key's size."""
    csr_key = rsa.generate_private_key(65537, bits).public_key()
    key = generate_key("csr", csr_key)
    assert isinstance(key, rsa.RSAPrivateKey)
    assert key.key_size == bits
    assert public_der(key) != public_der(csr_key)


def test_csr_mirrors_ed25519() -> None:
    """Key type csr makes a new Ed25519 key for an Ed25519 CSR."""
    csr_key = ed25519.Ed25519PrivateKey.generate().public_key()
    key = generate_key("csr", csr_key)
    assert isinstance(key, ed25519.Ed25519PrivateKey)
    assert public_der(key) != public_der(csr_key)


@pytest.mark.parametrize("name", ["ec-p192", "RSA-2048", "", "dsa"])
def test_unknown_key_type(name: str) -> None:
    """An unknown key type name is refused with a message naming it."""
    with pytest.raises(ValueError, match=re.escape(repr(name))):
        generate_key(name, None)


def test_csr_key_type_needs_a_key() -> None:
    """Key type csr without the CSR's key is refused."""
    with pytest.raises(ValueError, match="needs the CSR's public key"):
        generate_key("csr", None)


def test_csr_key_type_refuses_other_algorithms() -> None:
    """Key type csr refuses to mirror a key type estd does not issue for."""
    with pytest.raises(ValueError, match="Ed448PublicKey"):
        generate_key("csr", ed448.Ed448PrivateKey.generate().public_key())


# --- The multipart response --------------------------------------------------


def public_der(key: object) -> bytes:
    """SubjectPublicKeyInfo DER of a private or public key."""
    public = key.public_key() if hasattr(key, "public_key") else key
    der: bytes = public.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return der


def self_signed(key: GeneratedKey) -> x509.Certificate:
    """A throwaway certificate for ``key``, standing in for the CA's."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "device")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW)
        .not_valid_after(NOW + datetime.timedelta(days=1))
    )
    digest = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, digest)


@functools.cache
def key_and_pkcs7(key_type: str) -> tuple[GeneratedKey, bytes]:
    """A generated key and a certs-only PKCS#7 holding a certificate for it."""
    key = generate_key(key_type, None)
    return key, certs_only([self_signed(key)])


def wrapped(der: bytes, columns: int) -> bytes:
    """Base64 of ``der`` in CRLF-ended lines of ``columns`` (0: one line)."""
    text = base64.b64encode(der)
    if columns == 0:
        return text + b"\r\n"
    return b"".join(
        text[i : i + columns] + b"\r\n" for i in range(0, len(text), columns)
    )


@pytest.mark.parametrize("columns", [64, 76, 0])
def test_multipart_body_bytes(columns: int) -> None:
    """With a fixed boundary the body is exactly the RFC 7030 §4.4.2 layout."""
    key, pkcs7_der = key_and_pkcs7("ec-p256")
    pkcs8 = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    content_type, body = multipart_response(key, pkcs7_der, columns, "xyz-boundary")
    assert content_type == "multipart/mixed; boundary=xyz-boundary"
    assert body == (
        b"--xyz-boundary\r\n"
        b"Content-Type: application/pkcs8\r\n"
        b"Content-Transfer-Encoding: base64\r\n"
        b"\r\n" + wrapped(pkcs8, columns) + b"--xyz-boundary\r\n"
        b"Content-Type: application/pkcs7-mime; smime-type=certs-only\r\n"
        b"Content-Transfer-Encoding: base64\r\n"
        b"\r\n" + wrapped(pkcs7_der, columns) + b"--xyz-boundary--\r\n"
    )


def test_multipart_lines_are_wrapped() -> None:
    """With line length 64 no base64 line of an RSA key's part is longer than 64."""
    key, pkcs7_der = key_and_pkcs7("rsa-2048")
    _, body = multipart_response(key, pkcs7_der, 64, "estd-test")
    lines = body.split(b"\r\n")
    assert max(len(line) for line in lines if not line.startswith(b"Content-")) == 64


def parse_multipart(content_type: str, body: bytes) -> list[email.message.Message]:
    """The parts of a multipart body, as Python's email package reads them."""
    message = email.message_from_bytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body
    )
    assert message.is_multipart()
    assert not message.defects
    parts = message.get_payload()
    assert isinstance(parts, list)
    return parts


@pytest.mark.parametrize("key_type", ["ec-p384", "rsa-2048", "ed25519"])
def test_parts_parse_back_to_key_and_certificate(key_type: str) -> None:
    """A MIME parser finds the PKCS#8 key first and a certificate for it second."""
    key, pkcs7_der = key_and_pkcs7(key_type)
    content_type, body = multipart_response(key, pkcs7_der, 64)
    key_part, cert_part = parse_multipart(content_type, body)

    assert key_part.get_content_type() == "application/pkcs8"
    assert key_part["Content-Transfer-Encoding"] == "base64"
    key_der = key_part.get_payload(decode=True)
    assert isinstance(key_der, bytes)
    parsed_key = serialization.load_der_private_key(key_der, password=None)

    assert cert_part["Content-Type"] == (
        "application/pkcs7-mime; smime-type=certs-only"
    )
    assert cert_part.get_param("smime-type") == "certs-only"
    assert cert_part["Content-Transfer-Encoding"] == "base64"
    cert_der = cert_part.get_payload(decode=True)
    assert cert_der == pkcs7_der
    assert isinstance(cert_der, bytes)
    (certificate,) = pkcs7.load_der_pkcs7_certificates(cert_der)

    assert public_der(parsed_key) == public_der(certificate.public_key())
    assert public_der(parsed_key) == public_der(key)


def test_default_boundary_is_random() -> None:
    """Without a boundary each response gets a fresh estd-<24 hex> one."""
    key, pkcs7_der = key_and_pkcs7("ec-p256")
    first_type, first_body = multipart_response(key, pkcs7_der, 64)
    second_type, _ = multipart_response(key, pkcs7_der, 64)
    match = re.fullmatch(r"multipart/mixed; boundary=(estd-[0-9a-f]{24})", first_type)
    assert match is not None
    assert first_type != second_type
    assert first_body.startswith(b"--" + match[1].encode() + b"\r\n")
    assert first_body.endswith(b"\r\n--" + match[1].encode() + b"--\r\n")


def test_crlf_line_ends_throughout() -> None:
    """Every line of the body ends in CRLF, with no bare CR or LF anywhere."""
    key, pkcs7_der = key_and_pkcs7("ec-p256")
    _, body = multipart_response(key, pkcs7_der, 64)
    assert body.endswith(b"\r\n")
    assert b"\r" not in body.replace(b"\r\n", b"")
    assert b"\n" not in body.replace(b"\r\n", b"")


def test_boundary_inside_a_part_is_refused() -> None:
    """A given boundary that occurs in the base64 content is refused."""
    key, pkcs7_der = key_and_pkcs7("ec-p256")
    # Every DER SEQUENCE longer than 127 bytes base64-encodes to "MI...".
    with pytest.raises(ValueError, match="occurs in a body part"):
        multipart_response(key, pkcs7_der, 64, "MI")


@pytest.mark.parametrize("boundary", ["", "a b", "semi;colon", "x" * 71, "é"])
def test_unusable_boundary_is_refused(boundary: str) -> None:
    """A boundary that is empty, too long or needs quoting is refused."""
    key, pkcs7_der = key_and_pkcs7("ec-p256")
    with pytest.raises(ValueError, match="1-70 characters"):
        multipart_response(key, pkcs7_der, 64, boundary)
