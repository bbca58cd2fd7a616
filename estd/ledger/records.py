"""What the ledger stores and returns: issued certificates, pending requests.

Plain values, with no database in sight: :class:`IssuanceRecord` (built from
a certificate), :class:`CertificateRow`, :class:`PendingRow`, the revocation
reasons and request statuses they may hold, and the text of a SubjectAltName.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from estd.ca import serial_hex
from estd.wire import raw_subject_and_key_of_certificate

REVOCATION_REASONS = frozenset(
    {
        "unspecified",
        "keyCompromise",
        "cACompromise",
        "affiliationChanged",
        "superseded",
        "cessationOfOperation",
        "certificateHold",
        "removeFromCRL",
        "privilegeWithdrawn",
        "aACompromise",
    }
)
"""RFC 5280 §5.3.1 CRLReason names (value 7 is unused there)."""

PENDING_STATUSES = frozenset({"pending", "approved", "rejected", "issued", "expired"})


@dataclass(frozen=True)
class IssuanceRecord:
    """What the ledger keeps about one issued certificate."""

    serial: int
    label: str
    operation: str
    subject: str
    """RFC 4514 text of the subject, for people."""
    subject_der: bytes
    """The subject Name exactly as encoded in the certificate, for matching."""
    san: str | None
    """The SubjectAltName as ``DNS:a, IP:1.2.3.4`` (openssl's spelling)."""
    public_key_sha256: str
    """Hex SHA-256 of the certificate's SubjectPublicKeyInfo DER."""
    not_before: datetime.datetime
    not_after: datetime.datetime
    issuer: str
    """Hex SHA-256 fingerprint of the issuing CA certificate."""
    client_serial: str | None
    """Serial (upper-case hex) of the client certificate that asked, if any."""
    client_issuer: str | None
    """RFC 4514 issuer of that client certificate."""
    client_address: str | None
    user: str | None
    """The HTTP Basic user that asked, if any."""
    issued_at: datetime.datetime
    der: bytes

    @classmethod
    def from_certificate(
        cls,
        certificate: x509.Certificate,
        *,
        label: str,
        operation: str,
        issuer_certificate: x509.Certificate,
        client_certificate: x509.Certificate | None = None,
        client_address: str | None = None,
        user: str | None = None,
        issued_at: datetime.datetime,
    ) -> IssuanceRecord:
        """The record of ``certificate``, issued by ``issuer_certificate``."""
        subject_der, spki = raw_subject_and_key_of_certificate(certificate)
        return cls(
            serial=certificate.serial_number,
            label=label,
            operation=operation,
            subject=certificate.subject.rfc4514_string(),
            subject_der=subject_der,
            san=san_text(certificate),
            public_key_sha256=hashlib.sha256(spki).hexdigest(),
            not_before=certificate.not_valid_before_utc,
            not_after=certificate.not_valid_after_utc,
            issuer=fingerprint_hex(issuer_certificate),
            client_serial=(
                serial_hex(client_certificate.serial_number)
                if client_certificate is not None
                else None
            ),
            client_issuer=(
                client_certificate.issuer.rfc4514_string()
                if client_certificate is not None
                else None
            ),
            client_address=client_address,
            user=user,
            issued_at=issued_at,
            der=certificate.public_bytes(serialization.Encoding.DER),
        )


@functools.lru_cache(maxsize=64)
def fingerprint_hex(certificate: x509.Certificate) -> str:
    """Hex SHA-256 fingerprint of a (CA) certificate, computed once per CA."""
    return certificate.fingerprint(hashes.SHA256()).hex()


@dataclass(frozen=True)
class CertificateRow(IssuanceRecord):
    """A certificate on record, with its revocation if it was revoked."""

    revoked_at: datetime.datetime | None = None
    revocation_reason: str | None = None


@dataclass(frozen=True)
class PendingRow:
    """An enrollment request waiting for (or past) an operator's decision.

    RFC 7030 §4.2.3: the client repeats the same CSR until it is decided.
    """

    id: int
    label: str
    csr_sha256: str
    subject: str
    client_serial: str | None
    client_address: str | None
    user: str | None
    created_at: datetime.datetime
    expires_at: datetime.datetime
    status: str
    decided_at: datetime.datetime | None
    decided_by: str | None
    certificate_serial: int | None


def san_text(certificate: x509.Certificate) -> str | None:
    """The certificate's SubjectAltName as readable text, or None."""
    try:
        names = certificate.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value
    except x509.ExtensionNotFound:
        return None
    return ", ".join(_general_name_text(name) for name in names)


def _general_name_text(name: x509.GeneralName) -> str:
    if isinstance(name, x509.DNSName):
        return f"DNS:{name.value}"
    if isinstance(name, x509.IPAddress):
        return f"IP:{name.value}"
    if isinstance(name, x509.UniformResourceIdentifier):
        return f"URI:{name.value}"
    if isinstance(name, x509.RFC822Name):
        return f"email:{name.value}"
    if isinstance(name, x509.DirectoryName):
        return f"DirName:{name.value.rfc4514_string()}"
    if isinstance(name, x509.RegisteredID):
        return f"RID:{name.value.dotted_string}"
    if isinstance(name, x509.OtherName):
        return f"othername:{name.type_id.dotted_string}:{name.value.hex()}"
    return repr(name)
