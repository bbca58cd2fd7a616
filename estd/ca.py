"""The certificate authority: loads a CA and issues device certificates.

Pure synchronous code: the caller passes ``now`` and runs :meth:`issue` off
the reactor thread.  The CA decides every extension of the issued
certificate; a CSR only contributes its subject, its key and its
SubjectAltName.
"""

from __future__ import annotations

import datetime
import functools
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from estd.errors import BadRequest
from estd.wire import _sequence_children, raw_subject_of_certificate, raw_subject_of_csr

CAPrivateKey = (
    ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
)
SignerPublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey


class Signer(Protocol):
    """A CA key that signs without showing itself (a key in a PKCS#11 token).

    :class:`estd.hsm.Pkcs11Signer` is one; a test can bring another.
    """

    def public_key(self) -> SignerPublicKey:
        """The public half of the key."""
        ...

    def sign(self, data: bytes, hash_algorithm: hashes.HashAlgorithm) -> bytes:
        """An X.509 signature value of ``data``.

        ECDSA: the DER ``ECDSA-Sig-Value`` (RFC 3279 §2.2.3); RSA: the
        PKCS#1 v1.5 signature (RFC 8017 §8.2).
        """
        ...


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
    """An EST CA: a CA certificate with its private key.

    The key is a cryptography private key, or a :class:`Signer` for a key
    that stays in a token: then cryptography builds each certificate and
    CRL with a stand-in key of the same type, and the signer signs its TBS
    bytes.
    """

    def __init__(
        self,
        certificate: x509.Certificate,
        private_key: CAPrivateKey | Signer,
        chain: Sequence[x509.Certificate] = (),
    ) -> None:
        check_ca_certificate(certificate)
        if not public_keys_match(certificate.public_key(), private_key.public_key()):
            raise ValueError("the private key does not belong to the CA certificate")
        self.certificate = certificate
        self.chain = tuple(chain)
        self._signer: Signer | None
        if isinstance(private_key, _PRIVATE_KEY_TYPES):
            self._key: CAPrivateKey = private_key
            self._signer = None
        else:
            # The stand-in only signs what the signer then signs again.
            self._key = stand_in_key(private_key.public_key())
            self._signer = private_key
        self._hash = signature_hash(self._key)
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
        # What every device certificate shares, built once.
        self._profile = (
            x509.CertificateBuilder()
            .issuer_name(certificate.subject)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
            .add_extension(DEVICE_KEY_USAGE, critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
            )
        )

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
            self._profile.subject_name(csr.subject)
            .public_key(subject_key)  # type: ignore[arg-type]
            .serial_number(serial if serial is not None else random_serial())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(not_after)
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
        if self._signer is not None:
            certificate = self._signed_certificate(certificate)
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
        der = crl.public_bytes(serialization.Encoding.DER)
        if self._signer is None:
            return der
        # CertificateList ::= SEQUENCE { tbsCertList, signatureAlgorithm,
        # signatureValue } (RFC 5280 §5.1)
        der = self._signed_by_signer(der, crl.tbs_certlist_bytes)
        if not x509.load_der_x509_crl(der).is_signature_valid(
            self.certificate.public_key()  # type: ignore[arg-type]
        ):
            raise ValueError("the CA key's signature on the CRL does not verify")
        return der

    def _signed_certificate(self, stand_in: x509.Certificate) -> x509.Certificate:
        """``stand_in``'s TBSCertificate, signed by the signer."""
        # Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm,
        # signatureValue } (RFC 5280 §4.1)
        der = self._signed_by_signer(
            stand_in.public_bytes(serialization.Encoding.DER),
            stand_in.tbs_certificate_bytes,
        )
        certificate = x509.load_der_x509_certificate(der)
        # A token that answers with a bad signature (a fault, a mix-up of
        # key objects) must not make certificates that devices refuse; for
        # RSA, releasing a faulty signature can even leak the key.
        try:
            certificate.verify_directly_issued_by(self.certificate)
        except (ValueError, TypeError, InvalidSignature):
            raise ValueError(
                "the CA key's signature on the certificate does not verify"
            ) from None
        return certificate

    def _signed_by_signer(self, stand_in_der: bytes, tbs: bytes) -> bytes:
        """``stand_in_der`` (signed by the stand-in key), signed by the signer."""
        assert self._signer is not None and self._hash is not None
        # signatureAlgorithm must equal the signature field inside the TBS
        # (RFC 5280 §4.1.1.2): the stand-in's bytes are exactly that.
        algorithm = _sequence_children(stand_in_der)[1]
        signature = self._signer.sign(tbs, self._hash)
        # BIT STRING with no unused bits (X.690 §8.6)
        signature_value = encode_der(0x03, b"\x00" + signature)
        return encode_der(0x30, tbs + algorithm + signature_value)


_PRIVATE_KEY_TYPES = (
    ec.EllipticCurvePrivateKey,
    rsa.RSAPrivateKey,
    ed25519.Ed25519PrivateKey,
)


def encode_der(tag: int, contents: bytes) -> bytes:
    """One DER element (X.690 §8.1): ``tag``, definite length, ``contents``."""
    length = len(contents)
    if length < 0x80:
        return bytes([tag, length]) + contents
    size = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + contents


def stand_in_key(public_key: object) -> CAPrivateKey:
    """A throw-away private key of ``public_key``'s type (and curve).

    Signing with it gives cryptography's TBS bytes, whose signature
    AlgorithmIdentifier depends only on the key type, the curve and the hash.
    """
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return _stand_in_key(type(public_key.curve))
    if isinstance(public_key, rsa.RSAPublicKey):
        # sha256WithRSAEncryption does not depend on the modulus size.
        return _stand_in_key(None)
    raise ValueError(
        f"a signer's key must be EC or RSA, not {type(public_key).__name__}"
    )


@functools.cache
def _stand_in_key(curve: type[ec.EllipticCurve] | None) -> CAPrivateKey:
    """One stand-in key per curve (None: RSA), made once per process."""
    if curve is None:
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(curve())


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
    "Signer",
    "load_certificates",
    "load_private_key",
]
