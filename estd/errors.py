"""The errors an EST request can end in, each knowing its HTTP status.

Every error carries one human sentence that is sent to the client as a
``text/plain`` body, so messages must never contain secrets (keys,
passwords, request bodies).
"""

from __future__ import annotations


class EstError(Exception):
    """A request failed in a way the client should be told about."""

    status = 500
    user: str | None = None
    """The HTTP Basic user who was authenticated before this, for the log."""

    def __init__(self, reason: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.headers: dict[str, str] = dict(headers or {})


class BadRequest(EstError):
    """The request or the CSR in it is malformed (400)."""

    status = 400


class Unauthorized(EstError):
    """No acceptable client identity was presented (401)."""

    status = 401


class Forbidden(EstError):
    """The client is known, but policy does not allow the request (403)."""

    status = 403


class NotFound(EstError):
    """Unknown operation or CA label (404)."""

    status = 404


class MethodNotAllowed(EstError):
    """The operation exists but not with this HTTP method (405)."""

    status = 405

    def __init__(self, allowed: tuple[str, ...]) -> None:
        super().__init__(
            "method not allowed; use " + " or ".join(allowed),
            headers={"Allow": ", ".join(allowed)},
        )


class PayloadTooLarge(EstError):
    """The request body is over the limit (413)."""

    status = 413


class UnsupportedMediaType(EstError):
    """The request body has the wrong Content-Type (415)."""

    status = 415


class TooManyRequests(EstError):
    """The client asked too often; retry later (429)."""

    status = 429

    def __init__(self, reason: str, retry_after: int) -> None:
        super().__init__(reason, headers={"Retry-After": str(retry_after)})


class PendingApproval(EstError):
    """The request waits for an operator's decision (202, RFC 7030 §4.2.3).

    Not a failure, but answered like one: a short text body and an integer
    Retry-After telling the client when to ask again.
    """

    status = 202

    def __init__(self, reason: str, retry_after: int) -> None:
        super().__init__(reason, headers={"Retry-After": str(retry_after)})


class ServiceUnavailable(EstError):
    """The server cannot take the request now; retry later (503)."""

    status = 503

    def __init__(self, reason: str, retry_after: int = 30) -> None:
        super().__init__(reason, headers={"Retry-After": str(retry_after)})


class NotImplementedOperation(EstError):
    """An EST operation estd does not implement (501)."""

    status = 501


class ConfigError(Exception):
    """The configuration is unusable; the message names key, file and problem."""

    def __init__(self, key: str | None, source: str, problem: str) -> None:
        where = f"{source}: " if source else ""
        what = f"{key}: " if key else ""
        super().__init__(f"{where}{what}{problem}")
        self.key = key
        self.source = source
        self.problem = problem
