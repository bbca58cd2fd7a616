"""Bytes on the wire: request bodies in, certs-only PKCS#7 out.

EST clients disagree about how they wrap base64 (RFC 8951 §3 settled on
plain base64 without relying on Content-Transfer-Encoding), so decoding is
liberal and encoding is exact.
"""

from __future__ import annotations

import base64
import binascii
import enum
import re
from collections.abc import Iterator

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7

from estd.errors import BadRequest

MAX_BODY_BYTES = 64 * 1024
"""Request bodies above this size are refused with 413 (a CSR is < 16 KiB)."""

_WHITESPACE = re.compile(rb"[ \t\r\n\f\v]+")
_PEM_BLOCK = re.compile(
    rb"-----BEGIN ([A-Z0-9 ]+)-----(.*?)-----END \1-----", re.DOTALL
)
_BASE64_ALPHABET = re.compile(rb"^[A-Za-z0-9+/]*={0,2}$")


class ResponseProfile(enum.Enum):
    """How a successful enrollment is answered; chosen per server or label."""

    FIOCONFIG = "fioconfig"
    """201 and exactly ``application/pkcs7-mime``: what fioconfig releases
    before Feb 2026 accept, and nothing else."""
    RFC7030 = "rfc7030"
    """200 and ``application/pkcs7-mime; smime-type=certs-only`` (RFC 7030
    §4.2.3), for libest, globalsign, BouncyCastle and strongSwan."""

    @property
    def enroll_status(self) -> int:
        """The HTTP status of a successful enrollment."""
        return 201 if self is ResponseProfile.FIOCONFIG else 200

    @property
    def enroll_content_type(self) -> str:
        """The Content-Type of a successful enrollment."""
        if self is ResponseProfile.FIOCONFIG:
            return PKCS7_MIME
        return PKCS7_CERTS_ONLY


PKCS7_MIME = "application/pkcs7-mime"
PKCS7_CERTS_ONLY = "application/pkcs7-mime; smime-type=certs-only"
PKCS10 = "application/pkcs10"
CSRATTRS = "application/csrattrs"
PKIX_CRL = "application/pkix-crl"


def media_type(header_value: bytes | str | None) -> str:
    """Return the media type of a Content-Type value, lower-cased, no parameters."""
    if header_value is None:
        return ""
    if isinstance(header_value, bytes):
        header_value = header_value.decode("latin-1")
    return header_value.split(";", 1)[0].strip().lower()


def decode_body(body: bytes, what: str = "CSR") -> bytes:
    """Turn an EST request body into DER.

    Accepts base64 in any wrapping (none, LF, CRLF, any column count, stray
    blanks), with or without padding, a PEM-armoured object, or bare DER.
    The request's Content-Transfer-Encoding is deliberately not consulted
    (RFC 8951 §3.2: the body is always base64).
    """
    if not body.strip():
        raise BadRequest(f"the request body is empty; expected a base64 {what}")
    pem = _PEM_BLOCK.search(body)
    if pem is not None:
        body = _strip_pem_headers(pem.group(2))
    elif body[:1] == b"\x30" and not _looks_like_base64(body):
        # Some scripts post the DER itself; its first byte is a SEQUENCE tag.
        return body
    text = _WHITESPACE.sub(b"", body)
    text = text.rstrip(b"=")
    if not _BASE64_ALPHABET.match(text) or len(text) % 4 == 1:
        raise BadRequest(f"the request body is not base64; expected a base64 {what}")
    text += b"=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error as exc:  # pragma: no cover - the checks above catch it
        raise BadRequest(f"the request body is not valid base64: {exc}") from None


def _looks_like_base64(body: bytes) -> bool:
    return _BASE64_ALPHABET.match(_WHITESPACE.sub(b"", body).rstrip(b"=")) is not None


def _strip_pem_headers(inner: bytes) -> bytes:
    # RFC 1421 style headers ("Proc-Type: ...") end at the first blank line.
    if b":" in inner.split(b"\n\n", 1)[0] and b"\n\n" in inner:
        return inner.split(b"\n\n", 1)[1]
    return inner


def load_csr(body: bytes) -> x509.CertificateSigningRequest:
    """Parse a request body into a CSR, or raise 400 saying why not."""
    der = decode_body(body)
    try:
        return x509.load_der_x509_csr(der)
    except ValueError:
        raise BadRequest(
            "the request body is not a PKCS#10 certificate request"
        ) from None


def encode_base64(der: bytes, line_length: int) -> bytes:
    """Base64 of ``der`` in CRLF-terminated lines of ``line_length`` characters.

    ``line_length == 0`` gives one line, which strongSwan's ``pki`` before
    5.9.11 needs; libest's client needs wrapped lines once a body passes
    about 1 KiB.
    """
    text = base64.b64encode(der)
    if line_length <= 0:
        return text + b"\r\n"
    lines = [text[i : i + line_length] for i in range(0, len(text), line_length)]
    return b"\r\n".join(lines) + b"\r\n"


def certs_only(certificates: list[x509.Certificate]) -> bytes:
    """A certs-only CMS message: ContentInfo of SignedData with no signers (DER).

    RFC 7030 §4.1.3 (cacerts) and §4.2.3 (enrollment responses) both use this
    degenerate form.
    """
    return pkcs7.serialize_certificates(certificates, serialization.Encoding.DER)


# --- A few DER reads that cryptography does not expose -----------------------
#
# The EST policy compares subjects byte for byte (fioconfig checks the issued
# certificate's subject bytes against its CSR), so we need the raw encodings,
# not cryptography's re-serialisation of a parsed Name.


def read_tlv(der: bytes, offset: int, end: int | None = None) -> tuple[int, int, int]:
    """(tag, start of contents, end of element) of the TLV at ``offset``.

    ``end`` bounds the element (default: the end of ``der``); DER lengths of
    up to four octets are read.  Raises ``ValueError`` for malformed input.
    """
    limit = len(der) if end is None else end
    if offset + 2 > limit:
        raise ValueError("truncated DER")
    tag, length, pos = der[offset], der[offset + 1], offset + 2
    if length & 0x80:
        count = length & 0x7F
        if not 0 < count <= 4 or pos + count > limit:
            raise ValueError("unsupported DER length")
        length = int.from_bytes(der[pos : pos + count], "big")
        pos += count
    if pos + length > limit:
        raise ValueError("truncated DER")
    return tag, pos, pos + length


def elements(der: bytes, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(tag, start of contents, end) of each TLV between ``start`` and ``end``."""
    while start < end:
        element = read_tlv(der, start, end)
        yield element
        start = element[2]


def _sequence_children(der: bytes) -> list[bytes]:
    """The encoded elements inside the outermost SEQUENCE of ``der``."""
    tag, pos, end = read_tlv(der, 0)
    if tag != 0x30:
        raise ValueError("not a SEQUENCE")
    children = []
    while pos < end:
        _, _, child_end = read_tlv(der, pos, end)
        children.append(der[pos:child_end])
        pos = child_end
    return children


def raw_subject_of_csr(csr: x509.CertificateSigningRequest) -> bytes:
    """The subject Name of a CSR exactly as the client encoded it."""
    # CertificationRequestInfo ::= SEQUENCE { version, subject, ... }
    return _sequence_children(csr.tbs_certrequest_bytes)[1]


def raw_subject_of_certificate(certificate: x509.Certificate) -> bytes:
    """The subject Name of a certificate exactly as its issuer encoded it."""
    return raw_subject_and_key_of_certificate(certificate)[0]


def raw_subject_and_key_of_certificate(
    certificate: x509.Certificate,
) -> tuple[bytes, bytes]:
    """(subject Name, SubjectPublicKeyInfo) of a certificate, as encoded."""
    fields = _sequence_children(certificate.tbs_certificate_bytes)
    if fields[0][:1] == b"\xa0":  # [0] EXPLICIT version is present
        fields = fields[1:]
    # serialNumber, signature, issuer, validity, subject, subjectPublicKeyInfo
    return fields[4], fields[5]
