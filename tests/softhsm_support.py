"""A private SoftHSM2 for the PKCS#11 tests.

The ``softhsm`` fixture points ``SOFTHSM2_CONF`` at a token directory of
its own under pytest's temporary directory, initialises the tokens the
tests use with ``softhsm2-util`` and hands out a :class:`SoftHsm`.  The
tests skip when SoftHSM2 is not installed (Debian: ``apt-get install
softhsm2``; ``.ci/run`` installs it).

Test modules load the fixture with ``pytest_plugins = ["tests.softhsm_support"]``
(and import this module only for type checking, so that pytest can rewrite
its asserts).

SoftHSM2 reads its configuration and lists its tokens once, when the module
is initialised, and estd initialises it once per process: so the fixture
is session-wide and makes every token before anything loads the module.
Tests keep apart by using key labels of their own.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from estd.ca import CAPrivateKey
from estd.hsm import import_key

MODULE_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)
SKIP_MESSAGE = (
    "SoftHSM2 is not installed (apt-get install softhsm2; .ci/run installs it)"
)

TOKEN = "estd"
"""The token the CA keys go into."""
FRESH_TOKEN = "estd-fresh"
"""A token nothing logs in to, except with a wrong PIN: the token itself must
answer CKR_PIN_INCORRECT, not estd's memory of an earlier login."""
PIN = "4711-user"
SO_PIN = "0815-so"

_labels = itertools.count(1)


@dataclass(frozen=True)
class SoftHsm:
    """A SoftHSM2 token directory of this test session."""

    module: str
    directory: Path
    token: str = TOKEN
    fresh_token: str = FRESH_TOKEN
    pin: str = PIN

    def import_key(self, key: CAPrivateKey, prefix: str = "ca") -> str:
        """Store ``key`` in the token under a fresh label; return its URI."""
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return import_key(
            self.module, self.token, self.pin, pem, f"{prefix}-{next(_labels)}"
        )

    def pin_file(self, directory: Path, pin: str | None = None) -> Path:
        """Write a PIN file (the right PIN unless ``pin``) into ``directory``."""
        path = directory / "pin.txt"
        path.write_text((self.pin if pin is None else pin) + "\n")
        return path


def softhsm_module() -> str | None:
    """The SoftHSM2 PKCS#11 module, or None when SoftHSM2 is not installed."""
    if shutil.which("softhsm2-util") is None:
        return None
    for candidate in MODULE_CANDIDATES:
        if os.path.isfile(candidate):
            return candidate
    return None


@pytest.fixture(scope="session")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftHsm]:
    """SoftHSM2 with the tokens ``estd`` and ``estd-fresh`` (user PIN ``PIN``)."""
    module = softhsm_module()
    if module is None:
        pytest.skip(SKIP_MESSAGE)
    directory = tmp_path_factory.mktemp("softhsm")
    tokens = directory / "tokens"
    tokens.mkdir()
    conf = directory / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {tokens}\n"
        "objectstore.backend = file\n"
        "log.level = ERROR\n"
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SOFTHSM2_CONF", str(conf))
        for label in (TOKEN, FRESH_TOKEN):
            subprocess.run(
                [
                    "softhsm2-util",
                    "--init-token",
                    "--free",
                    "--label",
                    label,
                    "--pin",
                    PIN,
                    "--so-pin",
                    SO_PIN,
                ],
                check=True,
                capture_output=True,
            )
        yield SoftHsm(module, directory)


__all__ = ["FRESH_TOKEN", "PIN", "TOKEN", "SoftHsm", "softhsm"]
