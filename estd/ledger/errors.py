"""The exceptions the ledger raises."""

from __future__ import annotations


class LedgerError(Exception):
    """The ledger refused or could not carry out an operation."""


class LedgerUnavailable(LedgerError):
    """The database is unreachable or failed to read or write (HTTP 503)."""


class SerialTaken(LedgerError):
    """A certificate with this serial is already on record; pick another."""


class LimitReached(LedgerError):
    """The subject already got its allowed number of certificates."""

    def __init__(self, count: int) -> None:
        super().__init__(f"{count} certificates in the window")
        self.count = count


class NotFound(LedgerError):
    """No certificate or pending request matches."""


class _Conflict(LedgerError):
    """A UNIQUE constraint refused a row (turned into something specific)."""
