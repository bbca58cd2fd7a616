"""Just enough DER for the benchmark: fioconfig-style CSRs and response checks.

The load generator builds each CSR itself, the way ``fioconfig renew-cert``
asks for a certificate: a fresh P-256 key, the subject Name copied byte for
byte from the device certificate, KeyUsage digitalSignature and ExtKeyUsage
clientAuth, both critical, signed with ECDSA-SHA256.  Building the DER by
hand keeps the subject bytes exact and the preparation cheap.

Responses are checked with a small DER walker instead of a full parser, so
that checking costs the client little: the PKCS#7 must hold the expected
number of certificates and, for an enrollment, the one certificate must carry
the device's subject bytes and the CSR's public key.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

# 1.2.840.113549.1.9.14 extensionRequest
_OID_EXTENSION_REQUEST = bytes.fromhex("06092a864886f70d01090e")
# 1.2.840.10045.4.3.2 ecdsa-with-SHA256, parameters absent
_ECDSA_SHA256 = bytes.fromhex("300a06082a8648ce3d040302")
# KeyUsage (2.5.29.15), critical, digitalSignature
_KEY_USAGE = bytes.fromhex("300e0603551d0f0101ff040403020780")
# ExtKeyUsage (2.5.29.37), critical, clientAuth (1.3.6.1.5.5.7.3.2)
_EXT_KEY_USAGE = bytes.fromhex("30160603551d250101ff040c300a06082b06010505070302")
_VERSION_0 = bytes.fromhex("020100")


class DerError(ValueError):
    """The bytes are not the DER structure expected."""


def encode_length(length: int) -> bytes:
    """A DER length field."""
    if length < 0x80:
        return bytes([length])
    octets = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(octets)]) + octets


def tlv(tag: int, contents: bytes) -> bytes:
    """One DER element."""
    return bytes([tag]) + encode_length(len(contents)) + contents


def element(der: bytes, offset: int = 0) -> tuple[int, int, int]:
    """(tag, start of contents, end) of the DER element at ``offset``."""
    try:
        tag, length, pos = der[offset], der[offset + 1], offset + 2
        if length & 0x80:
            count = length & 0x7F
            if count == 0 or count > 4:
                raise DerError("unsupported length")
            length = int.from_bytes(der[pos : pos + count], "big")
            pos += count
    except IndexError:
        raise DerError("truncated") from None
    end = pos + length
    if end > len(der):
        raise DerError("truncated")
    return tag, pos, end


def children(der: bytes, offset: int = 0) -> list[tuple[int, int, int]]:
    """(tag, start, end) of each element inside the constructed one at ``offset``.

    ``start`` is where the child's header begins, ``end`` where it ends.
    """
    _, pos, end = element(der, offset)
    found = []
    while pos < end:
        tag, _, child_end = element(der, pos)
        found.append((tag, pos, child_end))
        pos = child_end
    return found


def certificate_fields(cert_der: bytes, offset: int = 0) -> tuple[bytes, bytes]:
    """The subject Name and SubjectPublicKeyInfo of a certificate, as DER."""
    tbs = children(cert_der, offset)[0]
    fields = children(cert_der, tbs[1])
    if fields and fields[0][0] == 0xA0:  # explicit version
        fields = fields[1:]
    # serialNumber, signature, issuer, validity, subject, subjectPublicKeyInfo
    if len(fields) < 6:
        raise DerError("not a certificate")
    subject, spki = fields[4], fields[5]
    return cert_der[subject[1] : subject[2]], cert_der[spki[1] : spki[2]]


def pkcs7_certificates(der: bytes) -> list[tuple[int, int]]:
    """(start, end) of each certificate of a certs-only PKCS#7 SignedData."""
    content_info = children(der)
    if len(content_info) != 2 or content_info[1][0] != 0xA0:
        raise DerError("not a PKCS#7 ContentInfo")
    signed_data = children(der, content_info[1][1])
    if len(signed_data) != 1 or signed_data[0][0] != 0x30:
        raise DerError("no SignedData")
    for tag, start, _ in children(der, signed_data[0][1]):
        if tag == 0xA0:  # certificates [0] IMPLICIT SET OF Certificate
            return [(s, e) for _, s, e in children(der, start)]
    return []


def pem_certificate_der(pem: bytes) -> bytes:
    """The DER of the first certificate in a PEM file."""
    begin = pem.index(b"-----BEGIN CERTIFICATE-----")
    end = pem.index(b"-----END CERTIFICATE-----", begin)
    return base64.b64decode(b"".join(pem[begin:end].splitlines()[1:]))


@dataclass(frozen=True)
class PreparedCsr:
    """One fioconfig-style CSR: the body to post and what the answer must carry."""

    device: int
    body: bytes
    """One line of base64 of the DER CSR, as ``base64 -w0`` writes it."""
    spki: bytes
    """The CSR's SubjectPublicKeyInfo, which the issued certificate must carry."""


def fioconfig_csr(subject: bytes) -> tuple[bytes, bytes]:
    """(DER CSR, SubjectPublicKeyInfo) for a fresh P-256 key and ``subject``."""
    key = ec.generate_private_key(ec.SECP256R1())
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    extensions = tlv(0x30, _KEY_USAGE + _EXT_KEY_USAGE)
    attribute = tlv(0x30, _OID_EXTENSION_REQUEST + tlv(0x31, extensions))
    info = tlv(0x30, _VERSION_0 + subject + spki + tlv(0xA0, attribute))
    signature = key.sign(info, ec.ECDSA(hashes.SHA256()))
    csr = tlv(0x30, info + _ECDSA_SHA256 + tlv(0x03, b"\x00" + signature))
    return csr, spki


def decode_base64_body(body: bytes) -> bytes:
    """The DER in an EST base64 body (any line wrapping)."""
    try:
        return binascii.a2b_base64(body)
    except binascii.Error as exc:
        raise DerError(f"bad base64: {exc}") from None
