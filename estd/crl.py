"""CRLs of the EST CAs, made from the ledger's revocations.

A CRL is regenerated when the ledger's revocation revision changes (so every
instance sharing a ledger publishes a revocation at its next request) and
at least daily.  Runs in the thread pool: it reads the database and signs.
"""

from __future__ import annotations

import datetime
import threading
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes

from estd.ca import CertificateAuthority
from estd.ledger import Ledger

REGENERATE_AFTER = datetime.timedelta(days=1)
"""A CRL older than this is made anew even without new revocations."""

CRL_VALIDITY = datetime.timedelta(days=7)
"""nextUpdate is this far after thisUpdate: a week of slack for relying
parties that fetch daily and for a server that is down a few days."""


@dataclass(frozen=True)
class _Published:
    revision: int
    this_update: datetime.datetime
    der: bytes


class CrlPublisher:
    """Makes and caches one CRL per CA."""

    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger
        self._lock = threading.Lock()
        self._published: dict[bytes, _Published] = {}

    def crl(self, ca: CertificateAuthority, now: datetime.datetime) -> bytes:
        """The current DER CRL of ``ca``."""
        fingerprint = ca.certificate.fingerprint(hashes.SHA256())
        revision = self._ledger.revocation_revision()
        with self._lock:
            published = self._published.get(fingerprint)
            if (
                published is not None
                and published.revision == revision
                and now - published.this_update < REGENERATE_AFTER
            ):
                return published.der
            revoked = self._ledger.revoked(fingerprint.hex())
            # CRLNumber must grow (RFC 5280 §5.2.3), also across instances
            # that share a ledger and whose clocks differ: a ledger counter.
            number = self._ledger.next_number("crl_number:" + fingerprint.hex())
            der = ca.sign_crl(revoked, now, now + CRL_VALIDITY, number)
            self._published[fingerprint] = _Published(revision, now, der)
            return der
