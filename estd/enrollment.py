"""The one place where an issuance is decided (and, later, recorded).

:func:`enroll` runs in the signing thread pool: it parses the CSR, applies
the policy, signs, and builds the response body.  Everything it needs comes
in as arguments, so tests call it directly.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from estd.ca import IssuedCertificate
from estd.config import LabelConfig
from estd.policy import (
    ClientIdentity,
    Operation,
    authorize,
    check_csr,
    require_identity,
)
from estd.wire import certs_only, encode_base64, load_csr


@dataclass(frozen=True)
class Enrollment:
    """A signed certificate and the response body that carries it."""

    issued: IssuedCertificate
    body: bytes


def enroll(
    settings: LabelConfig,
    operation: Operation,
    client: ClientIdentity | None,
    body: bytes,
    now: datetime.datetime,
) -> Enrollment:
    """Decide on an enrollment request and, if it is allowed, issue.

    Raises an :class:`~estd.errors.EstError` for anything the client should
    be told about.  RFC 7030 §4.2.3: the response is a certs-only PKCS#7
    holding only the issued certificate.
    """
    # Refuse an anonymous client before parsing anything it sent.
    client = require_identity(operation, client)
    csr = load_csr(body)
    check_csr(csr)
    authorize(operation, client, csr, settings.enroll_subject)
    issued = settings.ca.issue(csr, now, settings.cert_duration)
    payload = encode_base64(
        certs_only([issued.certificate]), settings.base64_line_length
    )
    return Enrollment(issued=issued, body=payload)
