"""Who may get what: pure decisions from the client identity and the CSR.

Nothing here signs or does I/O; each check raises an :class:`EstError`
whose status tells the client whether the request was malformed (400), the
client unknown (401) or the request refused by policy (403).
"""

from __future__ import annotations

import enum

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from estd.errors import BadRequest, Forbidden
from estd.identity import (
    ClientIdentity,
    Requester,
    client_certificate_problem,
)
from estd.wire import raw_subject_of_certificate, raw_subject_of_csr


class Operation(enum.Enum):
    """The EST operations that issue a certificate."""

    SIMPLEENROLL = "simpleenroll"
    SIMPLEREENROLL = "simplereenroll"


class EnrollSubject(enum.Enum):
    """How ``simpleenroll`` binds the CSR subject to the client certificate."""

    MATCH = "match"
    ANY = "any"


ACCEPTED_CURVES = {"secp256r1", "secp384r1", "secp521r1"}
RSA_MIN_BITS, RSA_MAX_BITS = 2048, 8192


def check_csr(csr: x509.CertificateSigningRequest) -> None:
    """Refuse (400) a CSR that is unsigned, has an unusable key or asks for a CA."""
    try:
        valid = csr.is_signature_valid
    except Exception:  # unsupported signature algorithms raise here
        valid = False
    if not valid:
        raise BadRequest("the CSR signature does not verify (no proof of possession)")
    check_public_key(csr.public_key())
    try:
        extensions = csr.extensions
    except ValueError as exc:
        raise BadRequest(f"the CSR has a malformed extension: {exc}") from None
    try:
        constraints = extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return
    if constraints.ca:
        raise BadRequest("the CSR asks for a CA certificate (BasicConstraints CA:TRUE)")


def check_public_key(key: object) -> None:
    """Accept EC P-256/P-384/P-521, RSA 2048-8192 and Ed25519 keys only."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in ACCEPTED_CURVES:
            raise BadRequest(
                f"the CSR key uses the curve {key.curve.name}, not accepted"
            )
        return
    if isinstance(key, rsa.RSAPublicKey):
        if not RSA_MIN_BITS <= key.key_size <= RSA_MAX_BITS:
            raise BadRequest(
                f"the CSR has a {key.key_size}-bit RSA key; "
                f"{RSA_MIN_BITS} to {RSA_MAX_BITS} bits are accepted"
            )
        return
    if isinstance(key, ed25519.Ed25519PublicKey):
        return
    raise BadRequest(f"the CSR key type {type(key).__name__} is not accepted")


def _subject_alt_name(extensions: x509.Extensions) -> bytes | None:
    """The DER of a SubjectAltName value, so that string types count too."""
    try:
        san = extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    return san.public_bytes()


def authorize(
    operation: Operation,
    requester: Requester,
    csr: x509.CertificateSigningRequest,
    enroll_subject: EnrollSubject,
) -> None:
    """Decide whether ``requester`` may have ``csr`` signed through ``operation``.

    RFC 7030 §4.2.2: a re-enrollment keeps the subject and SubjectAltName of
    the certificate being renewed.  estd applies the same binding to
    ``simpleenroll`` unless ``enroll-subject = any`` or the client is a
    registration authority (RFC 7030 §3.7), which enrolls for others.  A
    client known only by its HTTP Basic user name may enroll for the common
    name equal to that user name.
    """
    if operation is Operation.SIMPLEENROLL:
        if enroll_subject is EnrollSubject.ANY or requester.is_registration_authority:
            return
    client = requester.client
    if client is None:
        common_names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if [name.value for name in common_names] != [requester.user]:
            raise Forbidden("CSR common name does not match the user name")
        if _subject_alt_name(csr.extensions) is not None:
            # Names beyond the user's own are not the user's to claim.
            raise Forbidden(
                "CSR SubjectAltName is not allowed when enrolling by user name"
            )
        return
    if raw_subject_of_csr(csr) != raw_subject_of_certificate(client.certificate):
        raise Forbidden("CSR subject does not match the client certificate")
    if _subject_alt_name(csr.extensions) != _subject_alt_name(
        client.certificate.extensions
    ):
        raise Forbidden("CSR SubjectAltName does not match the client certificate")


__all__ = [
    "ClientIdentity",
    "EnrollSubject",
    "Operation",
    "Requester",
    "authorize",
    "check_csr",
    "check_public_key",
    "client_certificate_problem",
]
