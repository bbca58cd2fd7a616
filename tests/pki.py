"""Certificates and CSRs for tests, made fresh with cryptography.

No key material is checked in: every test PKI comes from
:func:`estd.demo.make_demo_pki` or :func:`estd.demo.make_pair` at a fixed
``NOW``.
"""

from __future__ import annotations

import base64
import datetime
import functools
import os
import tempfile

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from estd.ca import DEVICE_KEY_USAGE
from estd.config import Config, load_config
from estd.demo import DemoPKI, Pair, make_demo_pki, write_demo

# The verify callback and makeService use the wall clock, so test PKIs are
# made around the real time (to the minute) rather than at a fixed date that
# would let them expire under the test suite one day.
NOW = datetime.datetime.now(datetime.UTC).replace(second=0, microsecond=0)


@functools.cache
def demo_pki() -> DemoPKI:
    """One demo PKI (three devices) shared by the tests that only read it."""
    return make_demo_pki(NOW, devices=3)


def fioconfig_csr(
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey | None = None,
    *,
    extensions: list[tuple[x509.ExtensionType, bool]] | None = None,
) -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    """A CSR the way fioconfig makes one: fresh P-256 key, KU and EKU critical.

    Returns the key and the DER CSR.
    """
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
    if extensions is None:
        extensions = [
            (DEVICE_KEY_USAGE, True),
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), True),
        ]
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical)
    csr = builder.sign(key, hashes.SHA256())
    return key, csr.public_bytes(serialization.Encoding.DER)


def one_line_base64(der: bytes) -> bytes:
    """The body fioconfig posts: padded base64 on one line."""
    return base64.b64encode(der)


def write_pki(directory: str, pki: DemoPKI | None = None) -> str:
    """Write a demo PKI (fresh unless given) and est.ini; return est.ini's path."""
    if pki is None:
        write_demo(directory, NOW)
    else:
        _write_existing(directory, pki)
    return os.path.join(directory, "est.ini")


def _write_existing(directory: str, pki: DemoPKI) -> None:
    from estd.demo import DEMO_INI

    files = {
        "factory_ca.pem": pki.root.cert_pem(),
        "est-ca.pem": pki.est_ca.cert_pem(),
        "est-ca.key": pki.est_ca.key_pem(),
        "client-cas.pem": pki.device_ca.cert_pem(),
        "local-tls.pem": pki.tls.cert_pem(),
        "local-tls.key": pki.tls.key_pem(),
        "device.pem": pki.devices[0].cert_pem(),
        "device.key": pki.devices[0].key_pem(),
        "est.ini": DEMO_INI.format(port=8443).encode(),
    }
    os.makedirs(directory, exist_ok=True)
    for name, data in files.items():
        with open(os.path.join(directory, name), "wb") as handle:
            handle.write(data)


def demo_config(
    now: datetime.datetime = NOW, pki: DemoPKI | None = None, **options: str
) -> Config:
    """A Config loaded from a written demo PKI (the shared one by default).

    ``options`` are est.ini keys with ``_`` for ``-`` (``response_profile``),
    given as command-line overrides.
    """
    directory = tempfile.mkdtemp(prefix="estd-test-")
    path = write_pki(directory, pki or demo_pki())
    overrides = {name.replace("_", "-"): value for name, value in options.items()}
    return load_config(path, overrides, now)


__all__ = ["NOW", "Pair", "demo_config", "demo_pki", "fioconfig_csr", "one_line_base64"]
