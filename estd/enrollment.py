"""The one place where an issuance is decided (and, later, recorded).

:func:`enroll` runs in the signing thread pool: it authenticates the
requester (password hashes are slow on purpose), parses the CSR, applies the
label's policy, signs, and builds the response body.  Everything it needs
comes in as arguments, so tests call it directly.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from cryptography import x509

from estd.ca import CAPrivateKey, IssuedCertificate
from estd.config import LabelConfig
from estd.csrattrs import missing_csrattrs
from estd.errors import BadRequest, Unauthorized
from estd.identity import (
    ClientIdentity,
    Requester,
    authenticate,
    check_expiry_grace,
    check_proof_of_possession,
)
from estd.policy import Operation, authorize, check_csr
from estd.serverkeygen import generate_key, multipart_response
from estd.wire import certs_only, encode_base64, load_csr


@dataclass(frozen=True)
class EnrollmentRequest:
    """What the web layer learnt about one enrollment request."""

    operation: Operation
    body: bytes
    client: ClientIdentity | None = None
    credentials: tuple[str, str] | None = None
    channel_binding: bytes | None = None
    server_keygen: bool = False


@dataclass(frozen=True)
class Enrollment:
    """A signed certificate and the response that carries it."""

    issued: IssuedCertificate
    requester: Requester
    body: bytes
    content_type: str | None = None
    """Set for /serverkeygen (a multipart type); otherwise the profile's."""


def _no_users(user: str, password: str) -> bool:
    return False


def enroll(
    settings: LabelConfig, request: EnrollmentRequest, now: datetime.datetime
) -> Enrollment:
    """Decide on an enrollment request and, if it is allowed, issue.

    Raises an :class:`~estd.errors.EstError` for anything the client should
    be told about.  RFC 7030 §4.2.3: the response is a certs-only PKCS#7
    holding only the issued certificate.
    """
    reenrolling = request.operation is Operation.SIMPLEREENROLL
    # Refuse an unknown client before parsing anything it sent.
    requester = authenticate(
        settings.auth,
        client=request.client,
        credentials=request.credentials,
        check_password=settings.users.check if settings.users else _no_users,
        realm=settings.realm,
        needs_certificate=reenrolling,
        anchor_fingerprints=settings.anchor_fingerprints,
        channel_binding=request.channel_binding,
    )
    check_expiry_grace(requester, reenrolling, settings.reenroll_grace, now)
    csr = load_csr(request.body)
    check_csr(csr)
    try:
        check_proof_of_possession(requester, csr, settings.require_pop)
    except Unauthorized as error:
        if settings.auth.uses_basic:
            # RFC 9110 §15.5.2: every 401 carries a challenge.
            error.headers["WWW-Authenticate"] = f'Basic realm="{settings.realm}"'
        raise
    authorize(request.operation, requester, csr, settings.enroll_subject)
    if settings.csrattrs_enforce:
        missing = missing_csrattrs(settings.csrattrs, csr)
        if missing:
            raise BadRequest(
                "the CSR lacks what /csrattrs asks for: " + "; ".join(missing)
            )
    if request.server_keygen:
        return _server_keygen(settings, requester, csr, now)
    issued = settings.ca.issue(csr, now, settings.cert_duration)
    payload = encode_base64(
        certs_only([issued.certificate]), settings.base64_line_length
    )
    return Enrollment(issued=issued, requester=requester, body=payload)


def _server_keygen(
    settings: LabelConfig,
    requester: Requester,
    csr: x509.CertificateSigningRequest,
    now: datetime.datetime,
) -> Enrollment:
    """RFC 7030 §4.4: issue for a key the server makes; the CSR's key is ignored."""
    key: CAPrivateKey = generate_key(settings.serverkeygen_key_type, csr.public_key())
    issued = settings.ca.issue(
        csr, now, settings.cert_duration, public_key=key.public_key()
    )
    content_type, body = multipart_response(
        key, certs_only([issued.certificate]), settings.base64_line_length
    )
    return Enrollment(
        issued=issued, requester=requester, body=body, content_type=content_type
    )
