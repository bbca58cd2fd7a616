"""HTTP on bytes for the EST client: requests out, responses in.

Sans-IO, so the rules clients depend on (Basic credentials only after a
challenge, reading to Content-Length or to the close, chunked bodies) are
tested without sockets.  :mod:`estd.client` does the I/O.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from dataclasses import dataclass, field

MAX_RESPONSE_BYTES = 1024 * 1024
"""A response above this is refused; EST answers are a few KiB."""


# --- Errors ---------------------------------------------------------------------------


class EstFailure(Exception):
    """An EST operation did not produce its result; the message says why."""


class EstClientError(EstFailure):
    """The server answered with an error status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status} {message}" if message else str(status))
        self.status = status
        self.message = message


class EstRetryLater(EstFailure):
    """The server accepted the request but wants it repeated later (202)."""

    def __init__(self, retry_after: int | None) -> None:
        when = "later" if retry_after is None else f"in {retry_after} s"
        super().__init__(f"202 Accepted: the server asks to retry {when}")
        self.retry_after = retry_after


class EstConnectionError(EstFailure):
    """No usable TLS connection: network, handshake or server identity."""


class EstProtocolError(EstFailure):
    """The server's answer is not what EST specifies."""


# --- HTTP on bytes --------------------------------------------------------------------


@dataclass(frozen=True)
class HttpResponse:
    """One parsed HTTP/1.1 response."""

    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes

    def header_values(self, name: str) -> list[str]:
        """Every value of header ``name``, matched case-insensitively."""
        wanted = name.lower()
        return [value for key, value in self.headers if key.lower() == wanted]

    def header(self, name: str) -> str | None:
        """The first value of header ``name``, or None."""
        values = self.header_values(name)
        return values[0] if values else None


def encode_request(
    method: str,
    target: str,
    host: str,
    *,
    content_type: str | None = None,
    body: bytes = b"",
    authorization: str | None = None,
) -> bytes:
    """The bytes of one HTTP/1.1 request that asks the server to close after it."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    if content_type is not None:
        lines.append(f"Content-Type: {content_type}")
    if body or method not in ("GET", "HEAD"):
        lines.append(f"Content-Length: {len(body)}")
    lines.append("Connection: close")
    if authorization is not None:
        lines.append(f"Authorization: {authorization}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _split_head(raw: bytes) -> tuple[bytes, bytes] | None:
    """(header block, rest) of the first final response in ``raw``, if complete."""
    while True:
        head, separator, rest = raw.partition(b"\r\n\r\n")
        if not separator:
            return None
        # Skip interim 1xx responses (100 Continue), which have no body.
        if re.match(rb"HTTP/\d\.\d 1\d\d", head):
            raw = rest
            continue
        return head, rest


def _content_length(head: bytes) -> int | None:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            try:
                return int(value.strip())
            except ValueError:
                return None
    return None


def _status_of(head: bytes) -> int:
    parts = head.split(b"\r\n", 1)[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        raise EstProtocolError(f"not an HTTP response: {head[:40]!r}")
    return int(parts[1])


def expected_length(raw: bytes) -> int | None:
    """How many bytes the response starting ``raw`` has, once that is known.

    None means "read until the server closes": the header is incomplete, or
    the response has no Content-Length (we always send ``Connection: close``).
    """
    split = _split_head(raw)
    if split is None:
        return None
    head, rest = split
    consumed = len(raw) - len(rest)
    if _status_of(head) in (204, 304):
        return consumed
    if re.search(rb"(?im)^transfer-encoding:", head):
        return None
    length = _content_length(head)
    return None if length is None else consumed + length


def _dechunk(data: bytes) -> bytes:
    body = bytearray()
    while True:
        size_line, separator, data = data.partition(b"\r\n")
        if not separator:
            raise EstProtocolError("truncated chunked response body")
        try:
            size = int(size_line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise EstProtocolError("malformed chunked response body") from None
        if size == 0:
            return bytes(body)
        body += data[:size]
        data = data[size + 2 :]


def parse_response(raw: bytes) -> HttpResponse:
    """Parse a complete response (everything the server sent before closing)."""
    split = _split_head(raw)
    if split is None:
        if not raw:
            raise EstProtocolError("the server closed the connection without answering")
        raise EstProtocolError("the server sent an incomplete HTTP header")
    head, rest = split
    status = _status_of(head)
    lines = head.decode("latin-1").split("\r\n")
    reason = lines[0].split(" ", 2)[2] if lines[0].count(" ") >= 2 else ""
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.append((name.strip(), value.strip()))
    response = HttpResponse(status, reason, headers, b"")
    if status in (204, 304):
        return response
    encoding = (response.header("Transfer-Encoding") or "").lower()
    length = _content_length(head)
    if "chunked" in encoding:
        body = _dechunk(rest)
    elif length is not None:
        if len(rest) < length:
            raise EstProtocolError(
                f"the response body is truncated ({len(rest)} of {length} bytes)"
            )
        body = rest[:length]
    else:
        body = rest
    return HttpResponse(status, reason, headers, body)


def offers_basic(response: HttpResponse) -> bool:
    """True if a response challenges for HTTP Basic credentials (RFC 7617)."""
    for value in response.header_values("WWW-Authenticate"):
        # Challenges are comma-separated, and so are their parameters; a
        # piece starts with a scheme when its first token has no "=".
        unquoted = re.sub(r'"(?:[^"\\]|\\.)*"', '""', value)
        for piece in unquoted.split(","):
            token = piece.strip().split(" ", 1)[0]
            if token.lower() == "basic":
                return True
    return False


@dataclass
class BasicCredentials:
    """A user name and password, and whether the server has asked for them."""

    user: str
    password: str = field(repr=False)
    send: bool = False
    """Sent with every request once true: after a challenge, or preemptively."""

    def authorization(self) -> str:
        """The Authorization header value (RFC 7617)."""
        token = f"{self.user}:{self.password}".encode()
        return "Basic " + base64.b64encode(token).decode("ascii")


class Exchange:
    """One EST operation as requests out and responses in, without I/O.

    Call :meth:`request` on each new connection with its channel binding and
    send the bytes; give what the server sent to :meth:`receive`.  It
    returns the final response, or None when the operation must be repeated
    on a new connection: the server challenged for Basic credentials that
    were not sent yet (BouncyCastle's rule, never volunteered by default).
    """

    def __init__(
        self,
        method: str,
        target: str,
        host: str,
        *,
        content_type: str | None = None,
        make_body: Callable[[bytes | None], bytes] | None = None,
        credentials: BasicCredentials | None = None,
    ) -> None:
        self.method = method
        self.target = target
        self.host = host
        self.content_type = content_type
        self.make_body = make_body
        self.credentials = credentials
        self.attempts = 0

    def request(self, channel_binding: bytes | None) -> bytes:
        """The request to send on a fresh connection with this channel binding."""
        self.attempts += 1
        body = b"" if self.make_body is None else self.make_body(channel_binding)
        authorization = None
        if self.credentials is not None and self.credentials.send:
            authorization = self.credentials.authorization()
        return encode_request(
            self.method,
            self.target,
            self.host,
            content_type=self.content_type,
            body=body,
            authorization=authorization,
        )

    def receive(self, raw: bytes) -> HttpResponse | None:
        """The final response, or None to send :meth:`request` again."""
        response = parse_response(raw)
        credentials = self.credentials
        if (
            response.status == 401
            and credentials is not None
            and not credentials.send
            and self.attempts == 1
            and offers_basic(response)
        ):
            credentials.send = True
            return None
        return response
