"""Who is asking: client certificates, HTTP Basic users, channel bindings.

Pure decisions, no I/O: the TLS layer hands in what it verified, the web
layer the credentials it parsed; :func:`authenticate` says who the
requester is for one label, or raises 401/403.
"""

from __future__ import annotations

import base64
import datetime
import enum
import hmac
from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import AttributeOID, ExtendedKeyUsageOID

from estd.ca import serial_hex
from estd.csrattrs import csr_attribute_values
from estd.errors import BadRequest, Forbidden, Unauthorized

ID_KP_CMC_RA = x509.ObjectIdentifier("1.3.6.1.5.5.7.3.28")
"""id-kp-cmcRA (RFC 6402): the certificate of a registration authority."""


class AuthMode(enum.Enum):
    """How clients of a label authenticate for enrollment (RFC 7030 §3.2.3)."""

    CERT = "cert"
    BASIC = "basic"
    CERT_OR_BASIC = "cert-or-basic"
    CERT_AND_BASIC = "cert-and-basic"

    @property
    def uses_basic(self) -> bool:
        """True if HTTP Basic credentials are checked under this mode."""
        return self is not AuthMode.CERT


@dataclass(frozen=True)
class ClientIdentity:
    """A client certificate the TLS layer verified, with its chain.

    ``chain`` runs from the client certificate to the trust anchor it was
    verified against (both included).  ``expired`` is set when the
    certificate was let in although expired, for a re-enrollment grace.
    """

    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...]
    expired: bool = False

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

    @property
    def is_registration_authority(self) -> bool:
        """True for an RA certificate (ExtKeyUsage id-kp-cmcRA)."""
        try:
            usages = self.certificate.extensions.get_extension_for_class(
                x509.ExtendedKeyUsage
            ).value
        except x509.ExtensionNotFound:
            return False
        return ID_KP_CMC_RA in usages


@dataclass(frozen=True)
class Requester:
    """The authenticated party of one enrollment request."""

    client: ClientIdentity | None
    user: str | None = None
    channel_binding: bytes | None = None

    @property
    def is_registration_authority(self) -> bool:
        """True if the requester is an RA (it enrolls on behalf of others)."""
        return self.client is not None and self.client.is_registration_authority


class BadCredentials(Unauthorized):
    """HTTP Basic credentials were sent and are wrong (401)."""


def authenticate(
    mode: AuthMode,
    *,
    client: ClientIdentity | None,
    credentials: tuple[str, str] | None,
    check_password: Callable[[str, str], bool],
    realm: str,
    needs_certificate: bool,
    anchor_fingerprints: frozenset[bytes],
    channel_binding: bytes | None = None,
) -> Requester:
    """Decide who the requester is under ``mode``, or refuse with 401/403.

    ``check_password(user, password) -> bool`` is the users file's check (it
    is slow on purpose, so this runs off the reactor thread).
    ``needs_certificate`` is set for re-enrollment, which always renews the
    certificate the client authenticated with (RFC 7030 §4.2.2).
    """
    challenge = (
        {"WWW-Authenticate": f'Basic realm="{realm}"'} if mode.uses_basic else {}
    )
    if client is not None and mode is AuthMode.BASIC and not needs_certificate:
        client = None  # the certificate plays no part in basic-only labels
    if client is not None and _fingerprint(client.anchor) not in anchor_fingerprints:
        raise Forbidden(
            "the client certificate is not issued by a CA this label trusts"
        )
    user = None
    if credentials is not None and mode.uses_basic:
        name, password = credentials
        if not check_password(name, password):
            raise BadCredentials("wrong user name or password", headers=challenge)
        user = name
    if needs_certificate and client is None:
        raise Unauthorized(
            "re-enrollment needs the client certificate being renewed",
            headers=challenge,
        )
    accepted = {
        AuthMode.CERT: client is not None,
        AuthMode.BASIC: user is not None,
        AuthMode.CERT_OR_BASIC: client is not None or user is not None,
        AuthMode.CERT_AND_BASIC: client is not None and user is not None,
    }[mode]
    if not accepted:
        raise Unauthorized(_MISSING[mode], headers=challenge)
    return Requester(client=client, user=user, channel_binding=channel_binding)


_MISSING = {
    AuthMode.CERT: "a client certificate is required",
    AuthMode.BASIC: "HTTP Basic credentials are required",
    AuthMode.CERT_OR_BASIC: (
        "a client certificate or HTTP Basic credentials are required"
    ),
    AuthMode.CERT_AND_BASIC: (
        "a client certificate and HTTP Basic credentials are required"
    ),
}


def _fingerprint(certificate: x509.Certificate) -> bytes:
    return certificate.fingerprint(hashes.SHA256())


def check_expiry_grace(
    requester: Requester,
    reenrolling: bool,
    grace: datetime.timedelta,
    now: datetime.datetime,
) -> None:
    """Refuse (403) an expired certificate outside this label's grace.

    The TLS layer lets an expired certificate through only within the
    longest grace of all labels; each label then applies its own.
    """
    client = requester.client
    if client is None or not client.expired:
        return
    expired_at = client.certificate.not_valid_after_utc
    if not reenrolling:
        raise Forbidden(
            f"the client certificate expired on {expired_at:%Y-%m-%d}; "
            "only simplereenroll accepts an expired certificate"
        )
    if now - expired_at > grace:
        raise Forbidden(
            f"the client certificate expired on {expired_at:%Y-%m-%d}, "
            "beyond this label's re-enrollment grace"
        )


def check_proof_of_possession(
    requester: Requester, csr: x509.CertificateSigningRequest, required: bool
) -> None:
    """RFC 7030 §3.5: the CSR's challengePassword must carry the TLS binding.

    The binding is tls-unique (RFC 5929) on TLS 1.2 and tls-exporter
    (RFC 9266) on TLS 1.3, base64 encoded.  A challengePassword that is
    present is always checked; an RA forwards other clients' CSRs, whose
    bindings belong to other connections, so it is exempt.
    """
    if requester.is_registration_authority:
        return
    try:
        values = csr_attribute_values(csr, AttributeOID.CHALLENGE_PASSWORD)
    except ValueError:
        raise BadRequest("the CSR has a malformed attribute") from None
    if not values:
        if required:
            raise Unauthorized("Proof of possession mismatch")
        return
    binding = requester.channel_binding
    expected = base64.b64encode(binding) if binding is not None else None
    # RFC 2985 §5.4.1: challengePassword is single-valued, a DirectoryString.
    if (
        expected is None
        or len(values) != 1
        or values[0][0] not in _DIRECTORY_STRING_TAGS
        or not hmac.compare_digest(values[0][1].strip(), expected)
    ):
        raise Unauthorized("Proof of possession mismatch")


# PrintableString, UTF8String, IA5String (seen in the wild), TeletexString
_DIRECTORY_STRING_TAGS = frozenset({0x13, 0x0C, 0x16, 0x14})


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
