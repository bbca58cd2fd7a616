"""Server-side key generation (RFC 7030 §4.4): a fresh key and its response.

The server makes the key, the CA certifies it, and the client receives both
in one ``multipart/mixed`` body (RFC 7030 §4.4.2).  estd only returns the
key unencrypted (``application/pkcs8``) inside the TLS session; the
application-layer encryption of RFC 7030 §4.4.1.1/§4.4.1.2 is not offered.

The private key must never reach a log, an error message or ``repr`` output:
nothing in this module prints it, and callers must not either.
"""

from __future__ import annotations

import re
import secrets

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificatePublicKeyTypes,
)

from estd.wire import PKCS7_CERTS_ONLY, encode_base64

GeneratedKey = (
    ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
)
"""The private keys generate_key makes (the types estd's key policy accepts)."""

PKCS8 = "application/pkcs8"
"""The type of the unencrypted private key part (RFC 7030 §4.4.2)."""

_CURVES: dict[str, ec.EllipticCurve] = {
    "ec-p256": ec.SECP256R1(),
    "ec-p384": ec.SECP384R1(),
    "ec-p521": ec.SECP521R1(),
}
_RSA_BITS = {"rsa-2048": 2048, "rsa-3072": 3072, "rsa-4096": 4096}

KEY_TYPES: tuple[str, ...] = ("csr", *_CURVES, *_RSA_BITS, "ed25519")
"""The key type names the configuration accepts; ``csr`` copies the CSR's
key type, size and curve."""

# F4, the exponent everyone uses; RFC 8017 does not mandate one but some
# verifiers refuse others.
_RSA_PUBLIC_EXPONENT = 65537

# RFC 2046 §5.1.1 allows more characters in a boundary, but these need no
# quoting in the Content-Type parameter, which keeps every client's MIME
# parser happy.
_BOUNDARY = re.compile(r"[A-Za-z0-9'+_.-]{1,70}")


def generate_key(
    key_type: str, csr_public_key: CertificatePublicKeyTypes | None
) -> GeneratedKey:
    """A new private key of ``key_type`` (one of :data:`KEY_TYPES`).

    For ``csr`` the key mirrors ``csr_public_key``: the same curve for EC,
    the same size for RSA, Ed25519 for Ed25519.  The client proves
    possession of that key with its CSR signature, so its type is the best
    hint of what the device can use.  Raises ``ValueError`` for an unknown
    key type, or for ``csr`` with a key type estd does not issue for.
    """
    if key_type == "csr":
        return _like(csr_public_key)
    if key_type in _CURVES:
        return ec.generate_private_key(_CURVES[key_type])
    if key_type in _RSA_BITS:
        return rsa.generate_private_key(_RSA_PUBLIC_EXPONENT, _RSA_BITS[key_type])
    if key_type == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(
        f"unknown server key type {key_type!r}; use one of {', '.join(KEY_TYPES)}"
    )


def _like(public_key: CertificatePublicKeyTypes | None) -> GeneratedKey:
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return ec.generate_private_key(public_key.curve)
    if isinstance(public_key, rsa.RSAPublicKey):
        return rsa.generate_private_key(_RSA_PUBLIC_EXPONENT, public_key.key_size)
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return ed25519.Ed25519PrivateKey.generate()
    if public_key is None:
        raise ValueError("server key type 'csr' needs the CSR's public key")
    raise ValueError(
        f"cannot generate a key like the CSR's {type(public_key).__name__}"
    )


def multipart_response(
    private_key: GeneratedKey,
    pkcs7_der: bytes,
    line_length: int,
    boundary: str | None = None,
) -> tuple[str, bytes]:
    """The Content-Type value and body of a ``/serverkeygen`` success.

    RFC 7030 §4.4.2: ``multipart/mixed`` with the private key first
    (``application/pkcs8``, unencrypted PKCS#8 DER) and the certificate
    second (a certs-only PKCS#7), each part base64 with
    ``Content-Transfer-Encoding: base64`` (RFC 8951 §3.2).  The base64 is
    wrapped like every other estd body (:func:`estd.wire.encode_base64`).
    Lines end in CRLF (RFC 2046 §5.1.1).  ``boundary`` defaults to a fresh
    random ``estd-`` + 24 hex digits; a given one must be 1-70 characters
    of ``A-Za-z0-9'+_.-`` and not occur in the body, else ``ValueError``.
    """
    pkcs8 = private_key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    parts = [
        (PKCS8, encode_base64(pkcs8, line_length)),
        (PKCS7_CERTS_ONLY, encode_base64(pkcs7_der, line_length)),
    ]
    if boundary is None:
        # 96 random bits never collide with base64 in practice (and base64
        # has no '-'), but RFC 2046 §5.1.1 requires the check, so loop.
        while True:
            boundary = "estd-" + secrets.token_hex(12)
            if not _occurs(boundary, parts):
                break
    else:
        if not _BOUNDARY.fullmatch(boundary):
            raise ValueError(
                "a multipart boundary is 1-70 characters of A-Za-z0-9'+_.-"
            )
        if _occurs(boundary, parts):
            raise ValueError("the multipart boundary occurs in a body part")
    delimiter = b"--" + boundary.encode("ascii")
    body = b""
    for content_type, content in parts:
        body += (
            delimiter
            + b"\r\nContent-Type: "
            + content_type.encode("ascii")
            + b"\r\nContent-Transfer-Encoding: base64\r\n\r\n"
            # encode_base64 ends in CRLF: RFC 2046 counts that CRLF as part
            # of the next delimiter, so the part holds no stray blank line.
            + content
        )
    body += delimiter + b"--\r\n"
    return f"multipart/mixed; boundary={boundary}", body


def _occurs(boundary: str, parts: list[tuple[str, bytes]]) -> bool:
    needle = boundary.encode("ascii")
    return any(needle in content for _, content in parts)


__all__ = ["KEY_TYPES", "PKCS8", "GeneratedKey", "generate_key", "multipart_response"]
