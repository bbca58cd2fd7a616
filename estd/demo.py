"""A self-made PKI shaped like a Foundries factory's, for demos and tests.

``estctl demo DIR`` writes it: a factory root, the EST CA (an intermediate
under the root), a device CA listed in ``client-cas.pem``, a TLS certificate
for localhost and 127.0.0.1, device certificates like the ones LmP devices
hold (``CN=<uuid>, OU=<factory>``, P-256, clientAuth) and a ready est.ini.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import uuid
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

FACTORY = "demo-factory"


@dataclass(frozen=True)
class Pair:
    """A certificate and its private key."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def cert_pem(self) -> bytes:
        """The certificate as PEM."""
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        """The private key as unencrypted PKCS#8 PEM."""
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def _usage(*, sign: bool = False, cert_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def make_pair(
    subject: x509.Name,
    issuer: Pair | None,
    *,
    ca: bool,
    now: datetime.datetime,
    days: int = 3650,
    extended_usage: list[x509.ObjectIdentifier] | None = None,
    alt_names: list[x509.GeneralName] | None = None,
    key: ec.EllipticCurvePrivateKey | None = None,
    not_before: datetime.datetime | None = None,
) -> Pair:
    """A P-256 certificate for ``subject`` signed by ``issuer`` (self if None)."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    signer_key = issuer.key if issuer else key
    issuer_name = issuer.certificate.subject if issuer else subject
    start = not_before or now - datetime.timedelta(hours=1)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=days))
        .add_extension(
            x509.BasicConstraints(ca=ca, path_length=0 if ca and issuer else None), True
        )
        .add_extension(_usage(sign=not ca, cert_sign=ca), critical=True)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False
        )
    )
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
            critical=False,
        )
    if extended_usage:
        builder = builder.add_extension(x509.ExtendedKeyUsage(extended_usage), False)
    if alt_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), False)
    return Pair(builder.sign(signer_key, hashes.SHA256()), key)


def device_name(device_uuid: str, factory: str = FACTORY) -> x509.Name:
    """The subject of a Foundries device certificate."""
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, device_uuid),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, factory),
        ]
    )


@dataclass(frozen=True)
class DemoPKI:
    """Every certificate of the demo PKI."""

    root: Pair
    est_ca: Pair
    device_ca: Pair
    tls: Pair
    devices: tuple[Pair, ...]


def make_demo_pki(
    now: datetime.datetime, devices: int = 1, factory: str = FACTORY
) -> DemoPKI:
    """Build the demo PKI in memory."""
    org = x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, factory)
    root = make_pair(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Factory-CA"), org]),
        None,
        ca=True,
        now=now,
        days=7300,
    )
    est_ca = make_pair(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fio-est-ca"), org]),
        root,
        ca=True,
        now=now,
    )
    device_ca = make_pair(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fio-device-ca"), org]),
        root,
        ca=True,
        now=now,
    )
    tls = make_pair(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]),
        root,
        ca=False,
        now=now,
        days=825,
        extended_usage=[ExtendedKeyUsageOID.SERVER_AUTH],
        alt_names=[
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        ],
    )
    device_pairs = tuple(
        make_pair(
            device_name(str(uuid.uuid4()), factory),
            device_ca,
            ca=False,
            now=now,
            days=365,
            extended_usage=[ExtendedKeyUsageOID.CLIENT_AUTH],
        )
        for _ in range(devices)
    )
    return DemoPKI(root, est_ca, device_ca, tls, device_pairs)


DEMO_INI = """\
# est.ini written by `estctl demo`: a demo PKI, do not use it in production.
# Every key is documented in contrib/est.ini.example.
[est]
listen = tcp:{port}:interface=127.0.0.1
tls-cert = local-tls.pem
tls-key = local-tls.key
root-cert = factory_ca.pem
ca-cert = est-ca.pem
ca-key = est-ca.key
client-cas = client-cas.pem
cert-duration = 26280h
response-profile = fioconfig
"""


def write_demo(
    directory: str, now: datetime.datetime, devices: int = 1, port: int = 8443
) -> DemoPKI:
    """Write the demo PKI and est.ini into ``directory`` (created if needed)."""
    pki = make_demo_pki(now, devices)
    os.makedirs(directory, exist_ok=True)

    def put(name: str, data: bytes, private: bool = False) -> None:
        path = os.path.join(directory, name)
        fd = os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644
        )
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)

    put("factory_ca.pem", pki.root.cert_pem())
    put("factory_ca.key", pki.root.key_pem(), private=True)
    put("est-ca.pem", pki.est_ca.cert_pem())
    put("est-ca.key", pki.est_ca.key_pem(), private=True)
    put("client-cas.pem", pki.device_ca.cert_pem())
    put("device-ca.key", pki.device_ca.key_pem(), private=True)
    put("local-tls.pem", pki.tls.cert_pem())
    put("local-tls.key", pki.tls.key_pem(), private=True)
    for index, device in enumerate(pki.devices):
        prefix = "device" if index == 0 else os.path.join("devices", f"device-{index}")
        if index:
            os.makedirs(os.path.join(directory, "devices"), exist_ok=True)
        # Like /var/sota/client.pem on a device: the certificate; its key apart.
        put(f"{prefix}.pem", device.cert_pem())
        put(f"{prefix}.key", device.key_pem(), private=True)
    put("est.ini", DEMO_INI.format(port=port).encode())
    return pki
