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
from cryptography.hazmat.primitives import serialization

from estd.ca import CAPrivateKey, IssuedCertificate
from estd.config import LabelConfig
from estd.csrattrs import missing_csrattrs
from estd.errors import (
    BadRequest,
    EstError,
    Forbidden,
    PendingApproval,
    ServiceUnavailable,
    TooManyRequests,
    Unauthorized,
)
from estd.identity import (
    ClientIdentity,
    Requester,
    authenticate,
    check_expiry_grace,
    check_proof_of_possession,
)
from estd.ledger import (
    IssuanceRecord,
    Ledger,
    LedgerError,
    LedgerUnavailable,
    LimitReached,
    PendingRow,
    SerialTaken,
    fingerprint_hex,
)
from estd.policy import Operation, authorize, check_csr
from estd.serverkeygen import generate_key, multipart_response
from estd.wire import (
    certs_only,
    encode_base64,
    load_csr,
    raw_subject_of_certificate,
    raw_subject_of_csr,
)


@dataclass(frozen=True)
class EnrollmentRequest:
    """What the web layer learnt about one enrollment request."""

    operation: Operation
    body: bytes
    client: ClientIdentity | None = None
    credentials: tuple[str, str] | None = None
    channel_binding: bytes | None = None
    server_keygen: bool = False
    client_address: str | None = None


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
    settings: LabelConfig,
    request: EnrollmentRequest,
    now: datetime.datetime,
    ledger: Ledger | None = None,
) -> Enrollment:
    """Decide on an enrollment request and, if it is allowed, issue.

    Raises an :class:`~estd.errors.EstError` for anything the client should
    be told about.  RFC 7030 §4.2.3: the response is a certs-only PKCS#7
    holding only the issued certificate.  With a ``ledger``, the certificate
    is recorded durably before this returns; if it cannot be, nothing is
    returned (503) and the certificate never leaves the server.
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
    # Refused, pending or unanswerable after authentication: the log names
    # the user.
    try:
        return _decide(settings, request, now, ledger, requester)
    except EstError as error:
        error.user = requester.user
        raise
    except LedgerUnavailable:
        # Only _decide uses the ledger: its outage is a 503 here.
        unavailable = ServiceUnavailable(
            "the issuance ledger is unavailable; retry later", LEDGER_RETRY_AFTER
        )
        unavailable.user = requester.user
        raise unavailable from None


LEDGER_RETRY_AFTER = 30
"""Seconds a client is asked to wait while the ledger's database is away."""

SERIAL_ATTEMPTS = 5
"""Serials are 127 random bits: a second collision means something is wrong."""


def _decide(
    settings: LabelConfig,
    request: EnrollmentRequest,
    now: datetime.datetime,
    ledger: Ledger | None,
    requester: Requester,
) -> Enrollment:
    reenrolling = request.operation is Operation.SIMPLEREENROLL
    check_expiry_grace(requester, reenrolling, settings.reenroll_grace, now)
    if ledger is not None and requester.client is not None:
        _check_not_revoked(ledger, requester.client)
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
    pending: PendingRow | None = None
    if settings.manual_approval:
        if ledger is None:  # pragma: no cover - the service always has one
            raise ServiceUnavailable("manual approval needs the ledger", 300)
        pending = ledger.pending_submit(
            label=settings.label,
            csr_der=csr.public_bytes(serialization.Encoding.DER),
            subject=csr.subject.rfc4514_string(),
            client_serial=requester.client.serial_hex if requester.client else None,
            client_address=request.client_address,
            user=requester.user,
            now=now,
            expires_at=now + settings.pending_expiry,
        )
        earlier = _decided(ledger, settings, pending, requester, request)
        if earlier is not None:
            return earlier

    if ledger is not None and settings.max_issuance_per_day:
        # Counted only when a new certificate would be made: the same CSR
        # polled after its approval gets its certificate again for free.
        _check_rate(ledger, settings, csr, now)
    key: CAPrivateKey | None = None
    if request.server_keygen:
        key = generate_key(settings.serverkeygen_key_type, csr.public_key())
    issued = _issue_and_record(settings, request, requester, csr, now, ledger, key)
    if ledger is not None:
        if pending is not None:
            try:
                ledger.pending_mark_issued(
                    pending.id, issued.certificate.serial_number, now
                )
            except LedgerUnavailable:
                raise
            except LedgerError:
                # Another poll of the same approved request got there first:
                # answer with the certificate it recorded (ours stays unsent).
                current = pending_again(
                    ledger, settings, pending, requester, request, csr, now
                )
                again = _decided(ledger, settings, current, requester, request)
                if again is not None:
                    return again
                raise
        if settings.revoke_superseded:
            ledger.revoke_superseded(
                raw_subject_of_certificate(issued.certificate),
                settings.label,
                issued.certificate.serial_number,
                now,
            )
    pkcs7 = certs_only([issued.certificate])
    if key is not None:
        content_type, body = multipart_response(key, pkcs7, settings.base64_line_length)
        return Enrollment(
            issued=issued, requester=requester, body=body, content_type=content_type
        )
    payload = encode_base64(pkcs7, settings.base64_line_length)
    return Enrollment(issued=issued, requester=requester, body=payload)


def _issue_and_record(
    settings: LabelConfig,
    request: EnrollmentRequest,
    requester: Requester,
    csr: x509.CertificateSigningRequest,
    now: datetime.datetime,
    ledger: Ledger | None,
    key: CAPrivateKey | None,
) -> IssuedCertificate:
    """Sign, and record before anything is sent; a taken serial is redrawn."""
    public_key = key.public_key() if key is not None else None
    for _ in range(SERIAL_ATTEMPTS):
        issued = settings.ca.issue(
            csr, now, settings.cert_duration, public_key=public_key
        )
        if ledger is None:
            return issued
        record = IssuanceRecord.from_certificate(
            issued.certificate,
            label=settings.label,
            operation="serverkeygen" if key is not None else request.operation.value,
            issuer_certificate=settings.ca.certificate,
            client_certificate=(
                requester.client.certificate if requester.client else None
            ),
            client_address=request.client_address,
            user=requester.user,
            issued_at=now,
        )
        limit = settings.max_issuance_per_day or None
        try:
            ledger.record_issuance(record, limit=limit)
        except SerialTaken:
            continue
        except LimitReached:
            # Another request of this subject was recorded meanwhile; the
            # certificate just signed is never sent.
            raise _over_limit(settings) from None
        return issued
    raise ServiceUnavailable("no unique serial number could be drawn", 5)


def _check_not_revoked(ledger: Ledger, client: ClientIdentity) -> None:
    """Refuse (403) a client whose certificate estd issued and then revoked."""
    row = ledger.certificate(client.certificate.serial_number)
    if row is None or row.revoked_at is None or len(client.chain) < 2:
        return
    # Serials are unique per issuer only: the ledger's row must be this
    # very certificate, issued by the CA that verified it.
    issuer = fingerprint_hex(client.chain[1])
    if row.issuer == issuer:
        raise Forbidden(
            f"the client certificate was revoked on {row.revoked_at:%Y-%m-%d}"
        )


def _check_rate(
    ledger: Ledger,
    settings: LabelConfig,
    csr: x509.CertificateSigningRequest,
    now: datetime.datetime,
) -> None:
    """429 once a subject got max-issuance-per-day certificates in 24 hours."""
    since = now - datetime.timedelta(days=1)
    count = ledger.issued_count_since(raw_subject_of_csr(csr), since)
    if count >= settings.max_issuance_per_day:
        raise _over_limit(settings)


def _over_limit(settings: LabelConfig) -> TooManyRequests:
    return TooManyRequests(
        "this subject reached the limit of certificates per 24 hours "
        f"({settings.max_issuance_per_day})",
        RATE_RETRY_AFTER,
    )


RATE_RETRY_AFTER = 3600


def pending_again(
    ledger: Ledger,
    settings: LabelConfig,
    pending: PendingRow,
    requester: Requester,
    request: EnrollmentRequest,
    csr: x509.CertificateSigningRequest,
    now: datetime.datetime,
) -> PendingRow:
    """The pending row of this CSR as the ledger has it now."""
    return ledger.pending_submit(
        label=settings.label,
        csr_der=csr.public_bytes(serialization.Encoding.DER),
        subject=pending.subject,
        client_serial=pending.client_serial,
        client_address=request.client_address,
        user=requester.user,
        now=now,
        expires_at=pending.expires_at,
    )


def _decided(
    ledger: Ledger,
    settings: LabelConfig,
    pending: PendingRow,
    requester: Requester,
    request: EnrollmentRequest,
) -> Enrollment | None:
    """The answer an approval decision gives, or None to go on and issue."""
    if pending.status == "pending":
        raise PendingApproval(
            f"request {pending.id} is waiting for an operator's approval",
            settings.approval_retry_after,
        )
    if pending.status == "rejected":
        raise Forbidden(f"request {pending.id} was rejected by an operator")
    if pending.status == "issued" and pending.certificate_serial is not None:
        if request.server_keygen:
            # The generated key was never stored, so it cannot be sent again.
            raise Forbidden(
                f"request {pending.id} was already answered; send a new CSR"
            )
        row = ledger.certificate(pending.certificate_serial)
        if row is not None and row.revoked_at is not None:
            raise Forbidden(
                f"the certificate issued for request {pending.id} was revoked; "
                "send a new CSR"
            )
        if row is not None:
            # The same CSR again: the certificate it got, again.
            certificate = x509.load_der_x509_certificate(row.der)
            payload = encode_base64(
                certs_only([certificate]), settings.base64_line_length
            )
            return Enrollment(
                issued=IssuedCertificate(certificate),
                requester=requester,
                body=payload,
            )
    return None  # approved: issue now
