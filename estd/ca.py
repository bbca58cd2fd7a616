"""The certificate authority: loads a CA and issues device certificates.

Pure synchronous code: the caller passes ``now`` and runs :meth:`issue` off
the reactor thread.  The CA decides every extension of the issued
certificate; a CSR only contributes its subject, its key and its
SubjectAltName.
"""

from __future__ import annotations

import datetime
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from estd.errors import BadRequest
from estd.wire import raw_subject_of_certificate, raw_subject_of_csr

CAPrivateKey = (
    ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
)

DEVICE_KEY_USAGE = x509.KeyUsage(
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
"""KeyUsage of every issued certificate: fioconfig accepts exactly this
(DER ``03 02 07 80``)."""

BACKDATE = datetime.timedelta(minutes=1)
"""notBefore is set this far in the past so that devices with a slightly slow
clock accept a certificate they just received."""


def load_certificates(data: bytes) -> list[x509.Certificate]:
    """All PEM certificates in ``data`` (or one DER certificate), in order."""
    if b"-----BEGIN" in data:
        return x509.load_pem_x509_certificates(data)
    return [x509.load_der_x509_certificate(data)]


def load_private_key(data: bytes, passphrase: bytes | None = None) -> CAPrivateKey:
    """A SEC1, PKCS#1 or PKCS#8 private key (PEM or DER) of a supported type.

    Raises ``TypeError`` when a passphrase is missing or not needed and
    ``ValueError`` when the data is not a key we can use.
    """
    if b"-----BEGIN" in data:
        key = serialization.load_pem_private_key(data, passphrase)
    else:
        key = serialization.load_der_private_key(data, passphrase)
    if not isinstance(
        key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    ):
        raise ValueError(f"unsupported key type {type(key).__name__}")
    return key


def signature_hash(key: CAPrivateKey) -> hashes.HashAlgorithm | None:
    """The hash a certificate signed by ``key`` uses (None for Ed25519)."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        bits = key.curve.key_size
        if bits > 384:
            return hashes.SHA512()
        if bits > 256:
            return hashes.SHA384()
        return hashes.SHA256()
    if isinstance(key, rsa.RSAPrivateKey):
        return hashes.SHA256()
    return None


def public_keys_match(a: object, b: object) -> bool:
    """True if two public keys are the same key."""
    encode = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    mine: bytes = a.public_bytes(*encode)  # type: ignore[attr-defined]
    theirs: bytes = b.public_bytes(*encode)  # type: ignore[attr-defined]
    return mine == theirs


def serial_hex(serial: int) -> str:
    """A serial number as even-length upper-case hex, the way openssl prints it."""
    text = format(serial, "X")
    return "0" + text if len(text) % 2 else text


def random_serial() -> int:
    """A positive serial with 127 bits of entropy (CA/B BR ask for 64+)."""
    while True:
        serial = secrets.randbits(127)
        if serial:
            return serial


@dataclass(frozen=True)
class IssuedCertificate:
    """The outcome of one issuance."""

    certificate: x509.Certificate

    @property
    def serial_hex(self) -> str:
        """The serial number as upper-case hex, as operators read it."""
        return serial_hex(self.certificate.serial_number)


class CertificateAuthority:
    """An EST CA: a CA certificate with its private key."""

    def __init__(
        self,
        certificate: x509.Certificate,
        private_key: CAPrivateKey,
        chain: Sequence[x509.Certificate] = (),
    ) -> None:
        check_ca_certificate(certificate)
        if not public_keys_match(certificate.public_key(), private_key.public_key()):
            raise ValueError("the private key does not belong to the CA certificate")
        self.certificate = certificate
        self.chain = tuple(chain)
        self._key = private_key
        self._hash = signature_hash(private_key)
        try:
            ski = certificate.extensions.get_extension_for_class(
                x509.SubjectKeyIdentifier
            ).value
            aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
        except x509.ExtensionNotFound:
            aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(
                certificate.public_key()  # type: ignore[arg-type]
            )
        self._authority_key_identifier = aki

    @property
    def not_valid_after(self) -> datetime.datetime:
        """When the CA certificate expires (UTC)."""
        return self.certificate.not_valid_after_utc

    def issue(
        self,
        csr: x509.CertificateSigningRequest,
        now: datetime.datetime,
        duration: datetime.timedelta,
        serial: int | None = None,
        public_key: object | None = None,
    ) -> IssuedCertificate:
        """Sign a device certificate for the (already authorised) ``csr``.

        The certificate gets the CSR's subject (same bytes), its public key
        and its SubjectAltName; everything else is the CA's profile:
        KeyUsage digitalSignature, ExtKeyUsage clientAuth, CA:FALSE.
        ``public_key`` replaces the CSR's key for /serverkeygen (RFC 7030
        §4.4), where the server makes the key pair.
        """
        subject_key = public_key if public_key is not None else csr.public_key()
        not_after = min(now + duration, self.not_valid_after)
        builder = (
            x509.CertificateBuilder()
            .subject_name(csr.subject)
            .issuer_name(self.certificate.subject)
            .public_key(subject_key)  # type: ignore[arg-type]
            .serial_number(serial if serial is not None else random_serial())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
            .add_extension(DEVICE_KEY_USAGE, critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(subject_key),  # type: ignore[arg-type]
                critical=False,
            )
            .add_extension(self._authority_key_identifier, critical=False)
        )
        try:
            san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        except x509.ExtensionNotFound:
            san = None
        if san is not None:
            # RFC 5280 §4.2.1.6: critical when the subject is empty.
            builder = builder.add_extension(san.value, critical=len(csr.subject) == 0)
        certificate = builder.sign(self._key, self._hash)  # type: ignore[arg-type]
        if raw_subject_of_certificate(certificate) != raw_subject_of_csr(csr):
            # cryptography re-encodes the Name; refuse rather than issue a
            # certificate whose subject bytes differ from what was asked.
            raise BadRequest("the CSR subject uses an encoding estd cannot reproduce")
        return IssuedCertificate(certificate)

    @property
    def can_sign_crls(self) -> bool:
        """True unless the CA's KeyUsage leaves out cRLSign (RFC 5280 §4.2.1.3)."""
        try:
            usage = self.certificate.extensions.get_extension_for_class(
                x509.KeyUsage
            ).value
        except x509.ExtensionNotFound:
            return True
        return bool(usage.crl_sign)

    def sign_crl(
        self,
        revoked: Sequence[tuple[int, datetime.datetime, str]],
        now: datetime.datetime,
        next_update: datetime.datetime,
        number: int,
    ) -> bytes:
        """A DER CRL listing ``revoked`` (serial, revocation time, reason name)."""
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.certificate.subject)
            .last_update(now)
            .next_update(next_update)
            .add_extension(x509.CRLNumber(number), critical=False)
            .add_extension(self._authority_key_identifier, critical=False)
        )
        for serial, revoked_at, reason in revoked:
            entry = (
                x509.RevokedCertificateBuilder()
                .serial_number(serial)
                .revocation_date(revoked_at)
            )
            flag = _REASONS.get(reason)
            if flag is not None and flag is not x509.ReasonFlags.unspecified:
                # RFC 5280 §5.3.1: omit the reason code rather than say
                # "unspecified".
                entry = entry.add_extension(x509.CRLReason(flag), critical=False)
            builder = builder.add_revoked_certificate(entry.build())
        crl = builder.sign(self._key, self._hash)  # type: ignore[arg-type]
        return crl.public_bytes(serialization.Encoding.DER)


_REASONS = {flag.name: flag for flag in x509.ReasonFlags}
_REASONS.update({flag.value: flag for flag in x509.ReasonFlags})


def check_ca_certificate(certificate: x509.Certificate) -> None:
    """Raise ``ValueError`` unless ``certificate`` may sign certificates."""
    try:
        constraints = certificate.extensions.get_extension_for_class(
            x509.BasicConstraints
        ).value
    except x509.ExtensionNotFound:
        raise ValueError(
            "the certificate has no BasicConstraints; it is not a CA"
        ) from None
    if not constraints.ca:
        raise ValueError("the certificate is not a CA (BasicConstraints CA:FALSE)")
    try:
        usage = certificate.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return
    if not usage.key_cert_sign:
        raise ValueError("the CA certificate's KeyUsage does not allow keyCertSign")


__all__ = [
    "CAPrivateKey",
    "CertificateAuthority",
    "IssuedCertificate",
    "load_certificates",
    "load_private_key",
]
