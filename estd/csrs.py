"""Keys and CSRs the way fioconfig makes them, for :mod:`estd.client`."""

from __future__ import annotations

import base64
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
)
from cryptography.x509.oid import AttributeOID, ExtendedKeyUsageOID

from estd.ca import DEVICE_KEY_USAGE, signature_hash
from estd.serverkeygen import KEY_TYPES as _SERVER_KEY_TYPES
from estd.serverkeygen import generate_key

KEY_TYPES = tuple(kind for kind in _SERVER_KEY_TYPES if kind != "csr")
"""Key types estctl can make."""


def make_key(kind: str = "ec-p256") -> CertificateIssuerPrivateKeyTypes:
    """A fresh private key; fioconfig makes P-256 keys."""
    if kind not in KEY_TYPES:
        choices = ", ".join(KEY_TYPES)
        raise ValueError(f"unknown key type {kind!r}; use one of {choices}")
    return generate_key(kind, None)


def build_csr(
    key: CertificateIssuerPrivateKeyTypes,
    subject: x509.Name,
    *,
    san: x509.SubjectAlternativeName | Sequence[x509.GeneralName] | None = None,
    channel_binding: bytes | None = None,
    fioconfig_style: bool = True,
) -> bytes:
    """A DER CSR for ``subject`` signed by ``key``.

    fioconfig style asks for KeyUsage digitalSignature and ExtKeyUsage
    clientAuth, both critical.  A channel binding goes base64-encoded into
    the challengePassword attribute (RFC 7030 §3.5), linking the CSR to the
    TLS connection it is sent on.
    """
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
    if fioconfig_style:
        builder = builder.add_extension(DEVICE_KEY_USAGE, critical=True)
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=True
        )
    if san is not None:
        if not isinstance(san, x509.SubjectAlternativeName):
            san = x509.SubjectAlternativeName(list(san))
        builder = builder.add_extension(san, critical=False)
    if channel_binding is not None:
        builder = builder.add_attribute(
            AttributeOID.CHALLENGE_PASSWORD, base64.b64encode(channel_binding)
        )
    csr = builder.sign(key, signature_hash(key))  # type: ignore[arg-type]
    return csr.public_bytes(serialization.Encoding.DER)
