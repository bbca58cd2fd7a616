"""HTTP Basic authentication for EST clients that have no certificate yet.

RFC 7030 §3.2.3 lets an EST server authenticate a client with HTTP Basic
credentials, typically for the first ``simpleenroll`` of a device that has
no certificate.  This module holds the pure parts: the users file, password
hashing, parsing the ``Authorization`` header and slowing down guessing.

The users file
--------------

An htpasswd-compatible text file in UTF-8, one ``user:hash`` per line::

    # EST bootstrap users
    factory-line-1:$2y$12$...53 characters...
    provisioning:$scrypt$ln=15,r=8,p=1$<salt>$<digest>

Blank lines and lines starting with ``#`` are ignored.  A user name cannot
contain ``:`` or whitespace; a user may appear only once.  As in Apache,
anything after a second ``:`` on a line is ignored.  Two hash schemes are
accepted:

- bcrypt, ``$2a$``, ``$2b$`` or ``$2y$`` with a cost of 4 to 31, as written
  by Apache's ``htpasswd -B``.  bcrypt reads only the first 72 bytes of a
  password, so longer passwords are compared on those 72 bytes, as
  ``htpasswd`` did when it hashed them.
- scrypt in passlib's format,
  ``$scrypt$ln=<log2 N>,r=<block size>,p=<parallelism>$<salt>$<digest>``,
  where salt and digest are standard base64 (``+/``) without padding and the
  password is UTF-8.  It is computed with :func:`hashlib.scrypt`; entries
  that would need more than 1 GiB of memory per check are refused.

Anything else (Apache's ``$apr1$`` MD5, ``{SHA}``, DES crypt, plaintext) is
refused when the file is loaded: those are fast hashes that a stolen file
gives away in hours.

To create or change an entry, use either of::

    htpasswd -B -c users.htpasswd NAME    # Apache; -c creates the file
    estctl passwd users.htpasswd NAME     # estd's own, see set_password()
"""

from __future__ import annotations

import base64
import binascii
import collections
import contextlib
import hashlib
import hmac
import os
import re
import secrets
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import bcrypt

__all__ = [
    "BCRYPT_ROUNDS",
    "SCRYPT_LN",
    "SCRYPT_P",
    "SCRYPT_R",
    "FailureThrottle",
    "UsersFile",
    "hash_password",
    "parse_basic_authorization",
    "set_password",
]

# What hash_password() writes; read at call time so tests can lower them.
BCRYPT_ROUNDS = 12
SCRYPT_LN, SCRYPT_R, SCRYPT_P = 15, 8, 1
SCRYPT_SALT_BYTES, SCRYPT_DIGEST_BYTES = 16, 32

_BCRYPT_MAX_PASSWORD_BYTES = 72
_SCRYPT_MAX_MEMORY = 1 << 30

_BCRYPT_RE = re.compile(
    r"\$(?P<ident>2[aby])\$(?P<cost>[0-9]{2})\$"
    # 22 characters of salt, whose last one carries only 2 bits; the bcrypt
    # library refuses a salt with the low bits set ("Invalid salt").
    r"(?P<salt>[./A-Za-z0-9]{21}[.Oeu])"
    r"(?P<digest>[./A-Za-z0-9]{31})\Z"
)
_SCRYPT_RE = re.compile(
    r"\$scrypt\$ln=(?P<ln>[0-9]{1,2}),r=(?P<r>[0-9]{1,4}),p=(?P<p>[0-9]{1,4})"
    r"\$(?P<salt>[A-Za-z0-9+/]+)\$(?P<digest>[A-Za-z0-9+/]+)\Z"
)

# A well-formed bcrypt hash that no password is expected to match; unknown
# users are checked against it (at the cost the file's users have) so that
# a failed login takes as long whether or not the user exists.  Made once
# with bcrypt.hashpw(secrets.token_bytes(32).hex().encode(), bcrypt.gensalt(12))
# and the random password thrown away.
_DECOY_BCRYPT = b"$2b$12$opGQuEmm2oFf8Lpv6M0p6.X.KCLJozV6jBBWSOGgMZGkcvJFf/pma"

# Schemes people find in old htpasswd files, for a helpful refusal.  Only
# fixed prefixes are named so that a plaintext password is never echoed.
_REFUSED_SCHEMES = (
    ("$apr1$", "an Apache MD5 ($apr1$) hash"),
    ("{SHA}", "a SHA-1 ({SHA}) hash"),
    ("{SSHA}", "a salted SHA-1 ({SSHA}) hash"),
    ("$1$", "an MD5-crypt ($1$) hash"),
    ("$5$", "a SHA-256-crypt ($5$) hash"),
    ("$6$", "a SHA-512-crypt ($6$) hash"),
    ("$y$", "a yescrypt ($y$) hash"),
    ("$argon2", "an Argon2 hash"),
    ("$2x$", "a $2x$ bcrypt hash (the buggy pre-2011 variant)"),
)


class _PasswordHash(Protocol):
    """One stored hash, able to check a password against itself."""

    def verify(self, password: bytes) -> bool:
        """Whether ``password`` (UTF-8) hashes to this value."""
        ...

    def decoy(self) -> _PasswordHash:
        """A hash with the same cost that no password is expected to match."""
        ...

    @property
    def cost(self) -> tuple[object, ...]:
        """The parameters that decide how long a check takes."""
        ...


@dataclass(frozen=True)
class _BcryptHash:
    hashed: bytes = field(repr=False)
    rounds: int

    def verify(self, password: bytes) -> bool:
        # bcrypt 5 refuses long passwords instead of truncating them, but a
        # hash written by htpasswd covers only the first 72 bytes.
        return bcrypt.checkpw(password[:_BCRYPT_MAX_PASSWORD_BYTES], self.hashed)

    def decoy(self) -> _BcryptHash:
        # Same salt and digest as the fixed decoy, only the cost changed:
        # still well-formed, and no computation needed to make it.
        return _BcryptHash(
            b"$2b$%02d$" % self.rounds + _DECOY_BCRYPT[7:], rounds=self.rounds
        )

    @property
    def cost(self) -> tuple[object, ...]:
        return ("bcrypt", self.rounds)


@dataclass(frozen=True)
class _ScryptHash:
    ln: int
    r: int
    p: int
    salt: bytes = field(repr=False)
    digest: bytes = field(repr=False)

    def verify(self, password: bytes) -> bool:
        computed = hashlib.scrypt(
            password,
            salt=self.salt,
            n=1 << self.ln,
            r=self.r,
            p=self.p,
            maxmem=_scrypt_memory(self.ln, self.r, self.p),
            dklen=len(self.digest),
        )
        return hmac.compare_digest(computed, self.digest)

    def decoy(self) -> _ScryptHash:
        return _ScryptHash(
            self.ln, self.r, self.p, bytes(len(self.salt)), bytes(len(self.digest))
        )

    @property
    def cost(self) -> tuple[object, ...]:
        return ("scrypt", self.ln, self.r, self.p)


def _scrypt_memory(ln: int, r: int, p: int) -> int:
    """Bytes OpenSSL allocates for one scrypt computation, with some slack."""
    return 128 * r * ((1 << ln) + p + 2) + 4096


def _b64decode_unpadded(text: str) -> bytes:
    """Decode standard base64 whose ``=`` padding was left off (passlib)."""
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def _parse_hash(value: str) -> _PasswordHash | str:
    """The hash stored in a users file, or why it is refused."""
    if value.startswith(("$2a$", "$2b$", "$2y$")):
        match = _BCRYPT_RE.match(value)
        if match is None:
            return "malformed bcrypt hash"
        rounds = int(match["cost"])
        if not 4 <= rounds <= 31:
            return f"bcrypt cost {rounds} is outside 4 to 31"
        return _BcryptHash(value.encode("ascii"), rounds)
    if value.startswith("$scrypt$"):
        match = _SCRYPT_RE.match(value)
        if match is None:
            return "malformed scrypt hash (expected $scrypt$ln=N,r=R,p=P$salt$digest)"
        ln, r, p = int(match["ln"]), int(match["r"]), int(match["p"])
        if not (1 <= ln <= 31 and r >= 1 and p >= 1):
            return "scrypt parameters out of range"
        if _scrypt_memory(ln, r, p) > _SCRYPT_MAX_MEMORY:
            return "scrypt parameters need more than 1 GiB of memory per check"
        try:
            salt = _b64decode_unpadded(match["salt"])
            digest = _b64decode_unpadded(match["digest"])
        except (binascii.Error, ValueError):
            return "malformed base64 in scrypt hash"
        if not 16 <= len(digest) <= 64:
            return "scrypt digest must be 16 to 64 bytes"
        return _ScryptHash(ln, r, p, salt, digest)
    for prefix, description in _REFUSED_SCHEMES:
        if value.startswith(prefix):
            found = description
            break
    else:
        found = "an unrecognised hash or a plaintext password"
    return f"only bcrypt or scrypt hashes are accepted, this is {found}"


def _encode_password(password: str) -> bytes:
    # surrogatepass: never raise on a str that came from odd input
    return password.encode("utf-8", "surrogatepass")


class UsersFile:
    """The users allowed to authenticate with HTTP Basic, with their hashes.

    Build one with :meth:`load` (or :meth:`parse`).  ``len(users)`` is the
    number of users and ``name in users`` tells whether a user exists.
    """

    def __init__(self, hashes: dict[str, _PasswordHash], source: str = "") -> None:
        self._hashes = dict(hashes)
        self._source = source
        self._decoy = self._make_decoy()

    @classmethod
    def load(cls, path: str) -> UsersFile:
        """Read an htpasswd-compatible users file.

        Raises :class:`OSError` if the file cannot be read and
        :class:`ValueError` naming the line (and user) of an entry that is
        malformed, duplicated or uses a hash scheme other than bcrypt or
        scrypt.  Messages never contain hashes or passwords.
        """
        with open(path, "rb") as f:
            data = f.read()
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise ValueError(
                f"not UTF-8 text (byte {exc.start} cannot be decoded)"
            ) from None
        return cls.parse(text, source=path)

    @classmethod
    def parse(cls, text: str, source: str = "") -> UsersFile:
        """Parse the text of a users file; see :meth:`load`."""
        hashes: dict[str, _PasswordHash] = {}
        for number, line in enumerate(text.split("\n"), start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            user, colon, rest = line.partition(":")
            if not colon:
                # No user name to show, and the line may be a bare password.
                raise ValueError(f"line {number}: expected user:hash")
            if not user or any(c.isspace() for c in user):
                raise ValueError(
                    f"line {number}: the user name is empty or contains whitespace"
                )
            where = f"line {number} (user {user!r})"
            if user in hashes:
                raise ValueError(f"{where}: the user appears more than once")
            parsed = _parse_hash(rest.partition(":")[0])
            if isinstance(parsed, str):
                raise ValueError(f"{where}: {parsed}")
            hashes[user] = parsed
        return cls(hashes, source)

    def _make_decoy(self) -> _PasswordHash:
        """A hash as costly to check as the file's most common one."""
        by_cost: dict[tuple[object, ...], _PasswordHash] = {}
        counts: collections.Counter[tuple[object, ...]] = collections.Counter()
        for stored in self._hashes.values():
            by_cost.setdefault(stored.cost, stored)
            counts[stored.cost] += 1
        if not counts:
            return _BcryptHash(_DECOY_BCRYPT, 12)
        common, _ = counts.most_common(1)[0]
        return by_cost[common].decoy()

    def check(self, user: str, password: str) -> bool:
        """Whether ``password`` is the password of ``user``.

        The comparison is constant-time, and an unknown user costs one hash
        computation too, so a client cannot tell from the time taken whether
        a user exists.
        """
        password_bytes = _encode_password(password)
        stored = self._hashes.get(user)
        if stored is None:
            self._decoy.verify(password_bytes)
            return False
        return stored.verify(password_bytes)

    def __len__(self) -> int:
        return len(self._hashes)

    def __contains__(self, user: object) -> bool:
        return isinstance(user, str) and user in self._hashes

    def __repr__(self) -> str:
        return f"<UsersFile {self._source!r}: {len(self._hashes)} users>"


def hash_password(password: str, scheme: str = "bcrypt") -> str:
    """Hash ``password`` for a users file.

    ``scheme`` is ``"bcrypt"`` (cost 12, written as ``$2y$`` like
    ``htpasswd -B`` so Apache can read the file too) or ``"scrypt"`` (ln=15,
    r=8, p=1, 16-byte salt, passlib's format).  An empty password, or one
    over bcrypt's 72-byte limit with bcrypt, is refused with ValueError.
    """
    if scheme not in ("bcrypt", "scrypt"):
        raise ValueError(f"unknown hash scheme {scheme!r}; use bcrypt or scrypt")
    if not password:
        raise ValueError("the password is empty")
    password_bytes = _encode_password(password)
    if scheme == "bcrypt":
        if len(password_bytes) > _BCRYPT_MAX_PASSWORD_BYTES:
            raise ValueError(
                "bcrypt uses only the first 72 bytes of a password; "
                "use a shorter password or the scrypt scheme"
            )
        hashed = bcrypt.hashpw(password_bytes, bcrypt.gensalt(BCRYPT_ROUNDS))
        # $2b$ and $2y$ are the same algorithm; older Apache (APR) knows
        # only $2y$, which is what htpasswd -B writes.
        return "$2y$" + hashed.decode("ascii")[4:]
    ln, r, p = SCRYPT_LN, SCRYPT_R, SCRYPT_P
    salt = secrets.token_bytes(SCRYPT_SALT_BYTES)
    digest = hashlib.scrypt(
        password_bytes,
        salt=salt,
        n=1 << ln,
        r=r,
        p=p,
        maxmem=_scrypt_memory(ln, r, p),
        dklen=SCRYPT_DIGEST_BYTES,
    )

    def b64(raw: bytes) -> str:
        return base64.b64encode(raw).decode("ascii").rstrip("=")

    return f"$scrypt$ln={ln},r={r},p={p}${b64(salt)}${b64(digest)}"


def _check_user_name(user: str) -> None:
    if not user:
        raise ValueError("the user name is empty")
    if ":" in user or any(c.isspace() for c in user) or not user.isprintable():
        raise ValueError(
            f"the user name {user!r} contains ':', whitespace or control characters"
        )
    if user.startswith("#"):
        raise ValueError(
            f"the user name {user!r} starts with '#' and would read as a comment"
        )


def _user_of_line(line: str) -> str | None:
    """The user a users-file line is about, or None for comments and blanks."""
    stripped = line.strip()
    if not stripped or stripped.startswith("#") or ":" not in stripped:
        return None
    return stripped.partition(":")[0]


def set_password(path: str, user: str, password: str, scheme: str = "bcrypt") -> None:
    """Add ``user`` to the users file at ``path``, or change their password.

    Other lines, comments included, are kept as they are; more lines for
    the same user are dropped.  A missing file is created with mode 0600.
    The file is replaced atomically (a temporary file in the same directory,
    then :func:`os.replace`) keeping its mode and, where permitted, its
    owner, so a running server never reads half a file.  A symbolic link is
    followed and its target replaced.  Raises ValueError for a user name
    that is empty or contains ``:`` or whitespace, and for the password
    problems :func:`hash_password` refuses.
    """
    _check_user_name(user)
    entry = f"{user}:{hash_password(password, scheme)}"
    target = os.path.realpath(path)
    try:
        with open(target, "rb") as f:
            info: os.stat_result | None = os.fstat(f.fileno())
            old = f.read().decode("utf-8-sig")
    except FileNotFoundError:
        info, old = None, ""
    lines: list[str] = []
    replaced = False
    for line in re.findall(r"[^\n]*\n|[^\n]+", old):
        if _user_of_line(line) != user:
            lines.append(line)
        elif not replaced:
            lines.append(entry + ("\r\n" if line.endswith("\r\n") else "\n"))
            replaced = True
    if not replaced:
        if lines and not lines[-1].endswith("\n"):
            lines[-1] += "\n"
        lines.append(entry + "\n")
    _replace_file(target, "".join(lines).encode("utf-8"), info)


def _replace_file(target: str, data: bytes, info: os.stat_result | None) -> None:
    """Write ``data`` to ``target`` atomically, keeping mode and owner."""
    directory, name = os.path.split(target)
    fd, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), stat.S_IMODE(info.st_mode) if info else 0o600)
            if info is not None and (info.st_uid, info.st_gid) != (
                os.getuid(),
                os.getgid(),
            ):
                # e.g. root running estctl on a file the estd user must read
                with contextlib.suppress(PermissionError):
                    os.fchown(f.fileno(), info.st_uid, info.st_gid)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    # Make the rename itself durable; not every filesystem allows this.
    with contextlib.suppress(OSError):
        dir_fd = os.open(directory or ".", os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def parse_basic_authorization(value: bytes | str | None) -> tuple[str, str] | None:
    """The ``(user, password)`` of an ``Authorization: Basic`` header value.

    RFC 7617: the scheme name is case-insensitive and the credentials are
    base64 of ``user:password``; the password may itself contain ``:``.
    Credentials are read as UTF-8, falling back to Latin-1 for old clients.
    Returns None for a missing header, another scheme or anything malformed;
    it never raises.
    """
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    parts = value.split(None, 1)
    if len(parts) != 2 or parts[0].lower() != "basic":
        return None
    token = "".join(parts[1].split())
    try:
        decoded = base64.b64decode(token + "=" * (-len(token) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None
    try:
        credentials = decoded.decode("utf-8")
    except UnicodeDecodeError:
        credentials = decoded.decode("latin-1")
    user, colon, password = credentials.partition(":")
    if not colon:
        return None
    return user, password


class FailureThrottle:
    """Slows down repeated authentication failures from one address.

    The first ``free_failures`` failures cost nothing; after that the next
    answer to the address is held ``base_delay`` seconds, doubling with each
    further failure up to ``max_delay``.  A success resets the address, and
    an address that has not failed for ``forget_after`` seconds starts
    afresh.  At most ``max_addresses`` addresses are remembered; the one
    whose last failure is oldest is forgotten first, so a flood of
    addresses costs bounded memory.  ``clock`` returns seconds (e.g. the
    reactor's ``seconds``).
    """

    def __init__(
        self,
        clock: Callable[[], float],
        free_failures: int = 3,
        base_delay: float = 1.0,
        max_delay: float = 30.0,
        forget_after: float = 900.0,
        *,
        max_addresses: int = 10_000,
    ) -> None:
        if free_failures < 0 or base_delay <= 0 or max_delay < base_delay:
            raise ValueError("need free_failures >= 0 and 0 < base_delay <= max_delay")
        if forget_after <= 0 or max_addresses < 1:
            raise ValueError("need forget_after > 0 and max_addresses >= 1")
        self._clock = clock
        self._free_failures = free_failures
        self._base_delay = base_delay
        self._max_delay = max_delay
        self._forget_after = forget_after
        self._max_addresses = max_addresses
        # address -> (failures, time of the last one); oldest failure first
        self._failures: collections.OrderedDict[str, tuple[int, float]] = (
            collections.OrderedDict()
        )

    def _forget_old(self, now: float) -> None:
        while self._failures:
            address, (_, last) = next(iter(self._failures.items()))
            if now - last < self._forget_after:
                break
            del self._failures[address]

    def record_failure(self, address: str) -> None:
        """Count a failed authentication from ``address``."""
        now = self._clock()
        self._forget_old(now)
        failures, _ = self._failures.pop(address, (0, now))
        self._failures[address] = (failures + 1, now)
        while len(self._failures) > self._max_addresses:
            self._failures.popitem(last=False)

    def record_success(self, address: str) -> None:
        """Forget the failures of ``address`` after it authenticated."""
        self._failures.pop(address, None)

    def delay(self, address: str) -> float:
        """Seconds to hold the next answer to ``address``."""
        now = self._clock()
        self._forget_old(now)
        failures, _ = self._failures.get(address, (0, now))
        # free_failures failures cost nothing; each one beyond them holds the
        # next answer longer: 1 s, 2 s, 4 s ... up to max_delay.
        excess = failures - self._free_failures
        if excess <= 0:
            return 0.0
        # min() on the exponent keeps a long attack from overflowing a float
        return min(self._max_delay, self._base_delay * 2.0 ** min(excess - 1, 64))

    def __len__(self) -> int:
        """The number of addresses currently remembered."""
        return len(self._failures)

    def __repr__(self) -> str:
        return f"<FailureThrottle: {len(self._failures)} addresses>"
