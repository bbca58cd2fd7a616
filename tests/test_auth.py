"""Unit tests of estd.auth: users file, password hashes, Basic header, throttle."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import bcrypt
import pytest

from estd import auth
from estd.auth import (
    FailureThrottle,
    UsersFile,
    hash_password,
    parse_basic_authorization,
    set_password,
)

# Test vectors from Openwall's crypt_blowfish 1.3 (wrapper.c, tests[]),
# the reference implementation behind $2a$/$2y$.
OPENWALL_2A = ("$2a$05$CCCCCCCCCCCCCCCCCCCCC.E5YPO9kmyuRGyh0XouQYb4YMJKvyOeW", "U*U")
OPENWALL_2A_2 = ("$2a$05$CCCCCCCCCCCCCCCCCCCCC.VGOzA784oUp/Z0DY336zx7pLYAy0lwK", "U*U*")

# Made with passlib 1.7.4: passlib.hash.scrypt.using(rounds=10).hash(password)
PASSLIB_SCRYPT = (
    "$scrypt$ln=10,r=8,p=1$6z3nHKNUSul9D4HwXiuFMA"
    "$CmluzPrG5+S4ZNI+uWyhWVtgtnmWv+7lpTQIRlR9D2Q",
    "correct horse",
)
PASSLIB_SCRYPT_UTF8 = (
    "$scrypt$ln=10,r=8,p=1$hRCiVAoBgNA6x5jzvpdybg"
    "$b2jCmF0GF/jpbqkTIkVbfHfuHjCIbq3WveSIuBiiBGQ",
    "pässwörd",
)


@pytest.fixture
def fast_hashes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make hash_password cheap; the real costs have their own test."""
    monkeypatch.setattr(auth, "BCRYPT_ROUNDS", 4)
    monkeypatch.setattr(auth, "SCRYPT_LN", 4)


def cheap_bcrypt(password: str, ident: str = "2b") -> str:
    """A cost-4 bcrypt hash with the given ``$2?$`` prefix."""
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(4)).decode()
    return f"${ident}$" + hashed[4:]


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "users.htpasswd"
    path.write_text(text, encoding="utf-8")
    return str(path)


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- UsersFile: accepted hashes ---------------------------------------------


@pytest.mark.parametrize("vector", [OPENWALL_2A, OPENWALL_2A_2])
def test_bcrypt_reference_vector(tmp_path: Path, vector: tuple[str, str]) -> None:
    """A $2a$ hash from the reference bcrypt implementation accepts its password."""
    hashed, password = vector
    users = UsersFile.load(write(tmp_path, f"alice:{hashed}\n"))
    assert users.check("alice", password)
    assert not users.check("alice", password + "x")


@pytest.mark.parametrize("ident", ["2a", "2b", "2y"])
def test_bcrypt_prefixes(tmp_path: Path, ident: str) -> None:
    """bcrypt hashes are accepted under each of the $2a$, $2b$ and $2y$ prefixes."""
    path = write(tmp_path, f"alice:{cheap_bcrypt('s3cret', ident)}\n")
    users = UsersFile.load(path)
    assert users.check("alice", "s3cret")
    assert not users.check("alice", "S3cret")


@pytest.mark.parametrize("vector", [PASSLIB_SCRYPT, PASSLIB_SCRYPT_UTF8])
def test_passlib_scrypt(tmp_path: Path, vector: tuple[str, str]) -> None:
    """An scrypt hash written by passlib accepts its (UTF-8) password."""
    hashed, password = vector
    users = UsersFile.load(write(tmp_path, f"bob:{hashed}\n"))
    assert users.check("bob", password)
    assert not users.check("bob", password.upper())


def test_wrong_password_and_unknown_user(tmp_path: Path) -> None:
    """A wrong password or an unknown user is refused."""
    users = UsersFile.load(write(tmp_path, f"alice:{OPENWALL_2A[0]}\n"))
    assert not users.check("alice", "wrong")
    assert not users.check("alice", "")
    assert not users.check("mallory", "U*U")
    assert not users.check("", "U*U")


def test_unknown_user_costs_one_bcrypt_of_the_same_cost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checking an unknown user does one bcrypt computation at the users' cost."""
    users = UsersFile.load(
        write(tmp_path, f"alice:{cheap_bcrypt('a')}\nbob:{cheap_bcrypt('b')}\n")
    )
    calls: list[bytes] = []
    real_checkpw = bcrypt.checkpw

    def spy(password: bytes, hashed: bytes) -> bool:
        calls.append(hashed)
        return real_checkpw(password, hashed)

    monkeypatch.setattr(bcrypt, "checkpw", spy)
    assert not users.check("mallory", "a")
    assert len(calls) == 1
    assert calls[0].startswith(b"$2b$04$")
    assert not users.check("alice", "b")
    assert len(calls) == 2


def test_unknown_user_in_scrypt_file_costs_one_scrypt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a file of scrypt users, an unknown user costs one scrypt of the same N."""
    users = UsersFile.load(write(tmp_path, f"bob:{PASSLIB_SCRYPT[0]}\n"))
    calls: list[int] = []
    real_scrypt = hashlib.scrypt

    def spy(
        password: bytes, *, salt: bytes, n: int, r: int, p: int, maxmem: int, dklen: int
    ) -> bytes:
        calls.append(n)
        return real_scrypt(
            password, salt=salt, n=n, r=r, p=p, maxmem=maxmem, dklen=dklen
        )

    monkeypatch.setattr(hashlib, "scrypt", spy)
    assert not users.check("mallory", PASSLIB_SCRYPT[1])
    assert calls == [1 << 10]
    assert users.check("bob", PASSLIB_SCRYPT[1])
    assert calls == [1 << 10, 1 << 10]


def test_long_password_against_htpasswd_bcrypt(tmp_path: Path) -> None:
    """bcrypt entries check the first 72 bytes of a password, as htpasswd hashed."""
    long_password = "x" * 72 + "tail"
    hashed = bcrypt.hashpw(b"x" * 72, bcrypt.gensalt(4)).decode()
    users = UsersFile.load(write(tmp_path, f"alice:{hashed}\n"))
    assert users.check("alice", long_password)
    assert not users.check("alice", "x" * 71)


def test_comments_blank_lines_and_crlf(tmp_path: Path) -> None:
    """Comments, blank lines, CRLF endings and extra fields are tolerated."""
    text = (
        "# EST bootstrap users\r\n"
        "\r\n"
        f"alice:{OPENWALL_2A[0]}\r\n"
        "   # indented comment\n"
        "\n"
        f"bob:{PASSLIB_SCRYPT[0]}:Bob in accounting\n"
        f"  carol:{cheap_bcrypt('c')}  "
    )
    users = UsersFile.load(write(tmp_path, text))
    assert len(users) == 3
    assert "alice" in users and "bob" in users and "carol" in users
    assert "# EST bootstrap users" not in users
    assert "dave" not in users
    assert users.check("alice", OPENWALL_2A[1])
    assert users.check("bob", PASSLIB_SCRYPT[1])
    assert users.check("carol", "c")


def test_empty_file(tmp_path: Path) -> None:
    """A file with only comments loads as no users, and nobody can log in."""
    users = UsersFile.load(write(tmp_path, "# nobody yet\n"))
    assert len(users) == 0
    assert not users.check("alice", "")


def test_repr_shows_no_hashes(tmp_path: Path) -> None:
    """The repr of a users file names the file and count, never a hash."""
    path = write(tmp_path, f"alice:{OPENWALL_2A[0]}\nbob:{PASSLIB_SCRYPT[0]}\n")
    text = repr(UsersFile.load(path))
    assert "2 users" in text
    assert "$2a$" not in text and "scrypt" not in text and "CCCC" not in text


# -- UsersFile: refused entries ---------------------------------------------


@pytest.mark.parametrize(
    ("stored", "named"),
    [
        ("$apr1$Jz5Ayk/6$NCxBLNrbcmHyE9UAapDQH0", "$apr1$"),
        ("{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=", "{SHA}"),
        ("hunter2", "plaintext"),
        ("$6$salt$c2VjcmV0", "$6$"),
        ("rl1G0Gq4U3lhE", "plaintext"),
    ],
)
def test_refused_schemes_name_line_and_user(
    tmp_path: Path, stored: str, named: str
) -> None:
    """A non-bcrypt, non-scrypt entry is refused naming its line and user."""
    text = f"# header\n\nalice:{OPENWALL_2A[0]}\nbob:{stored}\n"
    with pytest.raises(ValueError, match="only bcrypt or scrypt") as caught:
        UsersFile.load(write(tmp_path, text))
    message = str(caught.value)
    assert message.startswith("line 4 (user 'bob'): ")
    assert named in message
    assert stored not in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            f"alice:{OPENWALL_2A[0]}\nalice:{OPENWALL_2A_2[0]}\n",
            "line 2 (user 'alice'): the user appears more than once",
        ),
        ("\nhunter2\n", "line 2: expected user:hash"),
        (":" + OPENWALL_2A[0], "line 1: the user name is empty"),
        ("al ice:" + OPENWALL_2A[0], "line 1: the user name is empty or contains"),
        ("alice:$2y$03$" + OPENWALL_2A[0][7:], "bcrypt cost 3 is outside 4 to 31"),
        ("alice:$2y$05$tooshort", "malformed bcrypt hash"),
        ("alice:$2y$05$" + "C" * 53, "malformed bcrypt hash"),
        ("alice:$scrypt$ln=10$abc$def", "malformed scrypt hash"),
        ("alice:$scrypt$ln=20,r=512,p=1$AAAAAAAA$" + "A" * 43, "1 GiB"),
        ("alice:$scrypt$ln=10,r=8,p=1$AAAAA$" + "A" * 43, "malformed base64"),
        ("alice:$scrypt$ln=10,r=8,p=1$AAAAAAAA$AAAA", "16 to 64 bytes"),
    ],
)
def test_malformed_entries(tmp_path: Path, text: str, expected: str) -> None:
    """Malformed, duplicated or unusable entries are refused with a precise reason."""
    with pytest.raises(ValueError, match=re.escape(expected)) as caught:
        UsersFile.load(write(tmp_path, text))
    assert "hunter2" not in str(caught.value)


def test_not_utf8(tmp_path: Path) -> None:
    """A users file that is not UTF-8 is refused without echoing its bytes."""
    path = tmp_path / "users.htpasswd"
    path.write_bytes(b"al\xffce:" + OPENWALL_2A[0].encode() + b"\n")
    with pytest.raises(ValueError, match="not UTF-8 text"):
        UsersFile.load(str(path))


def test_missing_file_is_oserror(tmp_path: Path) -> None:
    """A missing users file raises OSError, for the caller to report."""
    with pytest.raises(FileNotFoundError):
        UsersFile.load(str(tmp_path / "missing"))


# -- hash_password -----------------------------------------------------------


def test_hash_password_defaults() -> None:
    """By default bcrypt hashes have cost 12 and scrypt hashes ln=15, r=8, p=1."""
    bcrypt_hash = hash_password("s3cret")
    assert re.fullmatch(r"\$2y\$12\$[./A-Za-z0-9]{53}", bcrypt_hash)
    scrypt_hash = hash_password("s3cret", "scrypt")
    match = re.fullmatch(
        r"\$scrypt\$ln=15,r=8,p=1\$([A-Za-z0-9+/]+)\$([A-Za-z0-9+/]+)", scrypt_hash
    )
    assert match is not None
    assert len(base64.b64decode(match[1] + "==")) == 16
    assert len(base64.b64decode(match[2] + "=")) == 32
    users = UsersFile.parse(f"a:{bcrypt_hash}\ns:{scrypt_hash}\n")
    assert users.check("a", "s3cret") and users.check("s", "s3cret")


@pytest.mark.usefixtures("fast_hashes")
@pytest.mark.parametrize("scheme", ["bcrypt", "scrypt"])
def test_hash_password_round_trip(scheme: str) -> None:
    """A hash made by hash_password accepts the password and nothing else."""
    hashed = hash_password("pässwörd:with colon", scheme)
    assert hashed != hash_password("pässwörd:with colon", scheme)  # salted
    users = UsersFile.parse(f"alice:{hashed}\n")
    assert users.check("alice", "pässwörd:with colon")
    assert not users.check("alice", "passwörd:with colon")


@pytest.mark.parametrize(
    ("password", "scheme", "expected"),
    [
        ("s3cret", "md5", "unknown hash scheme 'md5'"),
        ("", "bcrypt", "the password is empty"),
        ("y" * 73, "bcrypt", "first 72 bytes"),
    ],
)
def test_hash_password_refusals(password: str, scheme: str, expected: str) -> None:
    """Unknown schemes, empty passwords and over-long bcrypt passwords are refused."""
    with pytest.raises(ValueError, match=re.escape(expected)) as caught:
        hash_password(password, scheme)
    assert password == "" or password not in str(caught.value)


@pytest.mark.usefixtures("fast_hashes")
def test_long_password_fits_scrypt() -> None:
    """Passwords past bcrypt's 72-byte limit can be hashed with scrypt."""
    password = "y" * 100
    users = UsersFile.parse(f"alice:{hash_password(password, 'scrypt')}\n")
    assert users.check("alice", password)
    assert not users.check("alice", "y" * 72)


# -- set_password ------------------------------------------------------------


def no_temporary_files(directory: Path) -> bool:
    return not [p for p in os.listdir(directory) if p.endswith(".tmp")]


@pytest.mark.usefixtures("fast_hashes")
def test_set_password_creates_private_file(tmp_path: Path) -> None:
    """set_password creates a missing users file readable only by its owner."""
    path = str(tmp_path / "users.htpasswd")
    set_password(path, "alice", "s3cret")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    users = UsersFile.load(path)
    assert len(users) == 1 and users.check("alice", "s3cret")
    assert os.listdir(tmp_path) == ["users.htpasswd"]


@pytest.mark.usefixtures("fast_hashes")
def test_set_password_replaces_and_keeps_the_rest(tmp_path: Path) -> None:
    """Changing a password rewrites that user's line and keeps every other line."""
    before = (
        "# EST bootstrap users\n"
        "\n"
        f"alice:{OPENWALL_2A[0]}\n"
        "# bob is the provisioning line\n"
        f"bob:{PASSLIB_SCRYPT[0]}\n"
        "carol:$apr1$Jz5Ayk/6$NCxBLNrbcmHyE9UAapDQH0\n"
    )
    path = write(tmp_path, before)
    os.chmod(path, 0o640)
    set_password(path, "alice", "new password")
    set_password(path, "carol", "migrated", scheme="scrypt")
    set_password(path, "dave", "added")
    lines = Path(path).read_text().splitlines()
    assert lines[:2] == ["# EST bootstrap users", ""]
    assert lines[2].startswith("alice:$2y$04$")
    assert lines[3:5] == before.splitlines()[3:5]
    assert lines[5].startswith("carol:$scrypt$ln=4,r=8,p=1$")
    assert lines[6].startswith("dave:$2y$04$")
    assert len(lines) == 7
    users = UsersFile.load(path)
    assert users.check("alice", "new password")
    assert not users.check("alice", OPENWALL_2A[1])
    assert users.check("bob", PASSLIB_SCRYPT[1])
    assert users.check("carol", "migrated")
    assert users.check("dave", "added")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    assert no_temporary_files(tmp_path)


@pytest.mark.usefixtures("fast_hashes")
def test_set_password_appends_after_last_line_without_newline(tmp_path: Path) -> None:
    """A new user goes on its own line even if the file lacks a final newline."""
    path = write(tmp_path, f"alice:{OPENWALL_2A[0]}")
    set_password(path, "bob", "b")
    text = Path(path).read_text()
    assert text.startswith(f"alice:{OPENWALL_2A[0]}\nbob:$2y$04$")
    assert text.endswith("\n")
    assert len(UsersFile.load(path)) == 2


@pytest.mark.usefixtures("fast_hashes")
def test_set_password_removes_duplicate_lines(tmp_path: Path) -> None:
    """Setting a password for a user listed twice leaves one line for them."""
    path = write(
        tmp_path, f"alice:{OPENWALL_2A[0]}\nbob:{PASSLIB_SCRYPT[0]}\nalice:plain\n"
    )
    set_password(path, "alice", "fixed")
    users = UsersFile.load(path)
    assert len(users) == 2 and users.check("alice", "fixed")


@pytest.mark.usefixtures("fast_hashes")
def test_set_password_failure_leaves_file_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the rename fails, the old file is untouched and no temporary file stays."""
    before = f"alice:{OPENWALL_2A[0]}\n"
    path = write(tmp_path, before)

    def failing_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="No space left"):
        set_password(path, "alice", "new")
    assert Path(path).read_text() == before
    assert no_temporary_files(tmp_path)


@pytest.mark.usefixtures("fast_hashes")
def test_set_password_follows_symlink(tmp_path: Path) -> None:
    """Through a symbolic link, the linked-to file is updated and the link kept."""
    real = write(tmp_path, f"alice:{OPENWALL_2A[0]}\n")
    link = tmp_path / "link.htpasswd"
    link.symlink_to(real)
    set_password(str(link), "bob", "b")
    assert link.is_symlink()
    assert UsersFile.load(real).check("bob", "b")


@pytest.mark.parametrize("user", ["", "a:b", "a b", "a\tb", "a\nb", "#admin", "a\x00"])
def test_set_password_refuses_bad_user_names(tmp_path: Path, user: str) -> None:
    """User names that the file format cannot hold are refused before any write."""
    path = tmp_path / "users.htpasswd"
    with pytest.raises(ValueError, match="user name"):
        set_password(str(path), user, "s3cret")
    assert not path.exists()


def test_set_password_refuses_empty_password(tmp_path: Path) -> None:
    """An empty password is refused and the file left alone."""
    path = tmp_path / "users.htpasswd"
    with pytest.raises(ValueError, match="password is empty"):
        set_password(str(path), "alice", "")
    assert not path.exists()


@pytest.mark.skipif(
    shutil.which("htpasswd") is None,
    reason="htpasswd (Debian package apache2-utils) is not installed",
)
def test_file_written_by_apache_htpasswd(tmp_path: Path) -> None:
    """A users file written by Apache's htpasswd -B is accepted as is."""
    path = str(tmp_path / "users.htpasswd")
    subprocess.run(
        ["htpasswd", "-B", "-C", "4", "-b", "-c", path, "alice", "s3cret"],
        check=True,
        capture_output=True,
    )
    users = UsersFile.load(path)
    assert users.check("alice", "s3cret")
    assert not users.check("alice", "s3cre")


# -- parse_basic_authorization -----------------------------------------------


def basic(credentials: bytes, scheme: str = "Basic") -> bytes:
    return scheme.encode() + b" " + base64.b64encode(credentials)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (basic(b"alice:s3cret"), ("alice", "s3cret")),
        (basic(b"alice:s3cret").decode(), ("alice", "s3cret")),
        (basic(b"alice:s3cret", "basic"), ("alice", "s3cret")),
        (basic(b"alice:s3cret", "BASIC"), ("alice", "s3cret")),
        (
            b"  Basic \t " + base64.b64encode(b"alice:s3cret") + b"  ",
            ("alice", "s3cret"),
        ),
        (b"Basic YWxpY2U6czNjcmV0", ("alice", "s3cret")),
        (b"Basic YWxpY2U6czNjcmV0MQ", ("alice", "s3cret1")),  # padding left off
        (basic(b"alice:pa:ss:word"), ("alice", "pa:ss:word")),
        (basic(b"alice:"), ("alice", "")),
        (basic("jürgen:pässwörd".encode()), ("jürgen", "pässwörd")),
        (basic("jürgen:pässwörd".encode("latin-1")), ("jürgen", "pässwörd")),
        (None, None),
        (b"", None),
        (b"Basic", None),
        (b"Basic ", None),
        (basic(b"alice-without-colon"), None),
        (b"Basic !!!not-base64!!!", None),
        (b"Basic YWxpY", None),  # impossible length
        (b"Basic \xff\xfe", None),
        ("Basic YWxpY2U6czNjcmV0\u00e9", None),
        (basic(b"alice:s3cret", "Bearer"), None),
        (basic(b"alice:s3cret", "Basically"), None),
        (b'Digest username="alice", realm="est"', None),
    ],
)
def test_parse_basic_authorization(
    header: bytes | str | None, expected: tuple[str, str] | None
) -> None:
    """Basic credentials are read liberally; anything else gives None, never raises."""
    assert parse_basic_authorization(header) == expected


# -- FailureThrottle ---------------------------------------------------------


def fail(throttle: FailureThrottle, address: str, times: int) -> None:
    for _ in range(times):
        throttle.record_failure(address)


def test_throttle_free_failures_then_doubling_up_to_cap() -> None:
    """After three free failures the delay doubles from 1 s and stops at 30 s."""
    throttle = FailureThrottle(FakeClock())
    delays = []
    for _ in range(12):
        delays.append(throttle.delay("192.0.2.1"))
        throttle.record_failure("192.0.2.1")
    delays.append(throttle.delay("192.0.2.1"))
    assert delays == [0, 0, 0, 0, 1, 2, 4, 8, 16, 30, 30, 30, 30]
    assert throttle.delay("192.0.2.2") == 0


def test_throttle_custom_parameters() -> None:
    """free_failures, base_delay and max_delay shape the delays."""
    throttle = FailureThrottle(
        FakeClock(), free_failures=0, base_delay=0.5, max_delay=3
    )
    delays = []
    for _ in range(5):
        throttle.record_failure("192.0.2.1")
        delays.append(throttle.delay("192.0.2.1"))
    assert delays == [0.5, 1, 2, 3, 3]


def test_throttle_long_attack_does_not_overflow() -> None:
    """Thousands of failures keep the delay at the cap."""
    throttle = FailureThrottle(FakeClock())
    fail(throttle, "192.0.2.1", 5000)
    assert throttle.delay("192.0.2.1") == 30


def test_throttle_success_resets() -> None:
    """A successful login clears the address's failures."""
    throttle = FailureThrottle(FakeClock())
    fail(throttle, "192.0.2.1", 6)
    fail(throttle, "192.0.2.2", 6)
    throttle.record_success("192.0.2.1")
    throttle.record_success("198.51.100.7")  # never failed: harmless
    assert throttle.delay("192.0.2.1") == 0
    assert throttle.delay("192.0.2.2") == 4
    fail(throttle, "192.0.2.1", 3)
    assert throttle.delay("192.0.2.1") == 0


def test_throttle_forgets_after_quiet_period() -> None:
    """An address that stops failing for forget_after seconds starts afresh."""
    clock = FakeClock()
    throttle = FailureThrottle(clock, forget_after=900)
    fail(throttle, "192.0.2.1", 6)
    clock.now += 899
    assert throttle.delay("192.0.2.1") == 4
    throttle.record_failure("192.0.2.1")  # restarts the quiet period
    clock.now += 899
    assert throttle.delay("192.0.2.1") == 8
    clock.now += 1
    assert throttle.delay("192.0.2.1") == 0
    assert len(throttle) == 0
    throttle.record_failure("192.0.2.1")
    assert throttle.delay("192.0.2.1") == 0


def test_throttle_memory_is_bounded() -> None:
    """Beyond max_addresses, the address whose last failure is oldest is dropped."""
    clock = FakeClock()
    throttle = FailureThrottle(clock, free_failures=0)
    assert len(FailureThrottle(clock)) == 0
    fail(throttle, "192.0.2.1", 2)
    for n in range(10_001):
        clock.now += 0.001
        throttle.record_failure(f"10.0.{n // 256}.{n % 256}")
    assert len(throttle) == 10_000
    assert throttle.delay("192.0.2.1") == 0  # evicted first
    assert throttle.delay("10.0.0.0") == 0  # evicted second
    assert throttle.delay("10.0.0.1") == 1
    assert throttle.delay("10.0.39.16") == 1


def test_throttle_eviction_keeps_recent_failures() -> None:
    """A recently failing address survives eviction of older ones."""
    clock = FakeClock()
    throttle = FailureThrottle(clock, free_failures=0, max_addresses=3)
    for address in ("a", "b", "c"):
        clock.now += 1
        throttle.record_failure(address)
    clock.now += 1
    throttle.record_failure("a")  # now the most recent
    throttle.record_failure("d")
    assert len(throttle) == 3
    assert throttle.delay("b") == 0
    assert throttle.delay("a") == 2
    assert throttle.delay("c") == 1 and throttle.delay("d") == 1


@pytest.mark.parametrize(
    "arguments",
    [
        {"free_failures": -1},
        {"base_delay": 0},
        {"base_delay": 10, "max_delay": 5},
        {"forget_after": 0},
        {"max_addresses": 0},
    ],
)
def test_throttle_refuses_nonsense_settings(arguments: dict[str, float]) -> None:
    """Settings that would disable or invert the throttle are refused."""
    clock: Callable[[], float] = FakeClock()
    with pytest.raises(ValueError, match="need"):
        FailureThrottle(clock, **arguments)  # type: ignore[arg-type]
