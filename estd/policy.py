"""Who may get what: pure decisions from the client identity and the CSR.

Nothing here signs or does I/O; each check raises an :class:`EstError`
whose status tells the client whether the request was malformed (400), the
client unknown (401) or the request refused by policy (403).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from estd.ca import serial_hex
from estd.errors import BadRequest, Forbidden, Unauthorized
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


@dataclass(frozen=True)
class ClientIdentity:
    """A client certificate the TLS layer verified, with its chain.

    ``chain`` runs from the client certificate to the trust anchor it was
    verified against (both included).
    """

    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...]

    @property
    def subject_text(self) -> str:
        """The subject as an RFC 4514 string, for logs."""
        return self.certificate.subject.rfc4514_string()

    @property
    def serial_hex(self) -> str:
        """The serial number in upper-case hex, for logs."""
        return serial_hex(self.certificate.serial_number)

    @property
    def anchor(self) -> x509.Certificate:
        """The trust anchor the certificate chains to."""
        return self.chain[-1]


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


def require_identity(
    operation: Operation, client: ClientIdentity | None
) -> ClientIdentity:
    """Refuse (401) a client that presented no verified certificate."""
    if client is None:
        raise Unauthorized("a client certificate is required for " + operation.value)
    return client


def authorize(
    operation: Operation,
    client: ClientIdentity,
    csr: x509.CertificateSigningRequest,
    enroll_subject: EnrollSubject,
) -> None:
    """Decide whether ``client`` may have ``csr`` signed through ``operation``.

    RFC 7030 §4.2.2: a re-enrollment keeps the subject and SubjectAltName of
    the certificate being renewed.  estd applies the same binding to
    ``simpleenroll`` unless ``enroll-subject = any``.
    """
    if operation is Operation.SIMPLEENROLL and enroll_subject is EnrollSubject.ANY:
        return
    if raw_subject_of_csr(csr) != raw_subject_of_certificate(client.certificate):
        raise Forbidden("CSR subject does not match the client certificate")
    if _subject_alt_name(csr.extensions) != _subject_alt_name(
        client.certificate.extensions
    ):
        raise Forbidden("CSR SubjectAltName does not match the client certificate")


def client_certificate_problem(certificate: x509.Certificate) -> str | None:
    """Why a chain-verified certificate still may not authenticate a client.

    A CA certificate is never a device; a certificate whose ExtKeyUsage
    leaves out clientAuth was meant for something else (a server, say).
    """
    try:
        constraints = certificate.extensions.get_extension_for_class(
            x509.BasicConstraints
        ).value
        if constraints.ca:
            return "is a CA certificate"
    except x509.ExtensionNotFound:
        pass
    try:
        usages = certificate.extensions.get_extension_for_class(
            x509.ExtendedKeyUsage
        ).value
    except x509.ExtensionNotFound:
        return None
    if ExtendedKeyUsageOID.CLIENT_AUTH not in usages:
        return "does not allow clientAuth (ExtKeyUsage)"
    return None
