"""Unit tests of estd.ca: what an issued certificate holds, byte by byte."""

from __future__ import annotations

import datetime
import functools

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa, x25519
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import (
    ExtendedKeyUsageOID,
    ExtensionOID,
    NameOID,
    SignatureAlgorithmOID,
)

from estd.ca import (
    BACKDATE,
    CAPrivateKey,
    CertificateAuthority,
    IssuedCertificate,
    load_certificates,
    load_private_key,
    serial_hex,
)
from estd.demo import device_name, make_pair
from estd.wire import raw_subject_of_certificate, raw_subject_of_csr
from tests.pki import NOW, demo_pki, fioconfig_csr

DURATION = datetime.timedelta(hours=26280)

KEY_USAGE_DIGITAL_SIGNATURE_DER = bytes.fromhex("03020780")
EKU_CLIENT_AUTH_DER = bytes.fromhex("300a06082b06010505070302")


def demo_ca() -> CertificateAuthority:
    """The demo EST CA (P-256, an intermediate under the factory root)."""
    pki = demo_pki()
    return CertificateAuthority(pki.est_ca.certificate, pki.est_ca.key)


def csr_for(
    subject: x509.Name,
    extensions: list[tuple[x509.ExtensionType, bool]] | None = None,
) -> x509.CertificateSigningRequest:
    """A fioconfig-style CSR for ``subject`` (KU and EKU unless ``extensions``)."""
    return x509.load_der_x509_csr(fioconfig_csr(subject, extensions=extensions)[1])


def device_csr() -> x509.CertificateSigningRequest:
    """A renewal CSR for the first demo device, as fioconfig makes it."""
    return csr_for(demo_pki().devices[0].certificate.subject)


def make_ca_certificate(
    key: CAPrivateKey,
    *,
    ca: bool = True,
    key_cert_sign: bool = True,
    subject_key_identifier: bool = True,
    days: int = 3650,
) -> x509.Certificate:
    """A self-signed certificate for ``key`` with the given CA properties."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test-ca")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - datetime.timedelta(days=1))
        .not_valid_after(
            NOW - datetime.timedelta(days=1) + datetime.timedelta(days=days)
        )
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=not key_cert_sign,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=key_cert_sign,
                crl_sign=key_cert_sign,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )
    if subject_key_identifier:
        builder = builder.add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
        )
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm)


@functools.cache
def ca_key(kind: str) -> CAPrivateKey:
    """One CA key of each supported kind, made once."""
    if kind == "P-256":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "P-384":
        return ec.generate_private_key(ec.SECP384R1())
    if kind == "P-521":
        return ec.generate_private_key(ec.SECP521R1())
    if kind == "RSA":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert kind == "Ed25519"
    return ed25519.Ed25519PrivateKey.generate()


def ca_of_kind(kind: str) -> CertificateAuthority:
    """A self-signed CA whose key is of ``kind``."""
    key = ca_key(kind)
    return CertificateAuthority(make_ca_certificate(key), key)


def issue(
    csr: x509.CertificateSigningRequest | None = None,
    ca: CertificateAuthority | None = None,
    duration: datetime.timedelta = DURATION,
) -> x509.Certificate:
    """Issue ``csr`` (the device renewal CSR by default) at NOW."""
    ca = ca or demo_ca()
    return ca.issue(csr or device_csr(), NOW, duration).certificate


# --- Subject, serial, validity -----------------------------------------------


def test_subject_bytes_are_the_csr_subject() -> None:
    """The issued subject is byte for byte the CSR's subject."""
    csr = device_csr()
    certificate = issue(csr)
    assert raw_subject_of_certificate(certificate) == raw_subject_of_csr(csr)
    assert raw_subject_of_certificate(certificate) == (
        demo_pki().devices[0].certificate.subject.public_bytes()
    )


def test_printable_string_subject_round_trips() -> None:
    """A PrintableString subject comes back as PrintableString, not UTF8String."""
    subject = x509.Name(
        [
            x509.NameAttribute(
                NameOID.COMMON_NAME, "device-1", _type=_ASN1Type.PrintableString
            ),
            x509.NameAttribute(
                NameOID.ORGANIZATIONAL_UNIT_NAME,
                "factory",
                _type=_ASN1Type.PrintableString,
            ),
        ]
    )
    csr = csr_for(subject)
    certificate = issue(csr)
    raw = raw_subject_of_certificate(certificate)
    assert raw == raw_subject_of_csr(csr)
    assert b"\x13\x08device-1" in raw
    assert b"\x0c" not in raw


def test_issuer_is_the_ca_subject() -> None:
    """The issuer Name is the EST CA's subject."""
    certificate = issue()
    assert certificate.issuer.public_bytes() == (
        demo_pki().est_ca.certificate.subject.public_bytes()
    )


def test_public_key_is_the_csr_key() -> None:
    """The certificate certifies the CSR's key."""
    key, der = fioconfig_csr(device_name("key-check"))
    certificate = issue(x509.load_der_x509_csr(der))
    assert certificate.public_key() == key.public_key()


def test_serial_is_large_and_positive() -> None:
    """Serials are positive, over 64 bits long and at most 20 octets in DER."""
    for _ in range(20):
        serial = issue().serial_number
        assert serial > 0
        assert 64 < serial.bit_length() <= 127


def test_serials_are_distinct() -> None:
    """Two issuances never share a serial."""
    ca = demo_ca()
    csr = device_csr()
    serials = {
        ca.issue(csr, NOW, DURATION).certificate.serial_number for _ in range(50)
    }
    assert len(serials) == 50


def test_explicit_serial_is_used() -> None:
    """A serial passed by the caller is the certificate's serial."""
    issued = demo_ca().issue(device_csr(), NOW, DURATION, serial=0xABC)
    assert issued.certificate.serial_number == 0xABC
    assert issued.serial_hex == "0ABC"


def test_serial_hex() -> None:
    """Serials print as even-length upper-case hex, the way openssl does."""
    assert serial_hex(1) == "01"
    assert serial_hex(0xABCD) == "ABCD"
    assert serial_hex(0x1ABCD) == "01ABCD"
    assert IssuedCertificate(demo_pki().root.certificate).serial_hex == serial_hex(
        demo_pki().root.certificate.serial_number
    )


def test_not_before_is_one_minute_ago() -> None:
    """notBefore is exactly one minute before the issuing time."""
    assert BACKDATE == datetime.timedelta(minutes=1)
    assert NOW.second == 0
    assert NOW.microsecond == 0
    assert issue().not_valid_before_utc == NOW - datetime.timedelta(seconds=60)


def test_validity_keeps_seconds() -> None:
    """Issuing at hh:mm:30 gives notBefore hh:mm-1:30 and notAfter to the second."""
    now = NOW + datetime.timedelta(seconds=30)
    certificate = demo_ca().issue(device_csr(), now, DURATION).certificate
    assert certificate.not_valid_before_utc == NOW - datetime.timedelta(seconds=30)
    assert certificate.not_valid_after_utc == now + DURATION


def test_not_after_is_now_plus_duration() -> None:
    """notAfter is exactly the issuing time plus the configured duration."""
    assert issue().not_valid_after_utc == NOW + datetime.timedelta(days=1095)
    short = issue(duration=datetime.timedelta(minutes=90))
    assert short.not_valid_after_utc == NOW + datetime.timedelta(minutes=90)


def test_not_after_clamped_at_ca_expiry() -> None:
    """A duration reaching past the CA's expiry stops at the CA's notAfter."""
    ca = demo_ca()
    certificate = issue(ca=ca, duration=datetime.timedelta(days=365 * 20))
    assert certificate.not_valid_after_utc == ca.not_valid_after
    assert ca.not_valid_after == demo_pki().est_ca.certificate.not_valid_after_utc


# --- Extensions --------------------------------------------------------------


def test_extensions_without_san() -> None:
    """A CSR without SAN gets exactly BC, KU, EKU, SKI and AKI."""
    oids = [extension.oid for extension in issue().extensions]
    assert sorted(oid.dotted_string for oid in oids) == sorted(
        oid.dotted_string
        for oid in (
            ExtensionOID.BASIC_CONSTRAINTS,
            ExtensionOID.KEY_USAGE,
            ExtensionOID.EXTENDED_KEY_USAGE,
            ExtensionOID.SUBJECT_KEY_IDENTIFIER,
            ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
        )
    )


def test_key_usage_is_digital_signature_critical() -> None:
    """KeyUsage is critical and its DER is exactly 03 02 07 80 (digitalSignature)."""
    extension = issue().extensions.get_extension_for_class(x509.KeyUsage)
    assert extension.critical is True
    assert extension.value.public_bytes() == KEY_USAGE_DIGITAL_SIGNATURE_DER


def test_ext_key_usage_is_client_auth_only() -> None:
    """ExtKeyUsage is exactly [clientAuth]."""
    extension = issue().extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert list(extension.value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert extension.value.public_bytes() == EKU_CLIENT_AUTH_DER


def test_basic_constraints_not_ca_critical() -> None:
    """BasicConstraints is CA:FALSE without path length, and critical."""
    extension = issue().extensions.get_extension_for_class(x509.BasicConstraints)
    assert extension.critical is True
    assert extension.value == x509.BasicConstraints(ca=False, path_length=None)
    assert extension.value.public_bytes() == b"\x30\x00"


def test_subject_key_identifier_is_of_csr_key() -> None:
    """The SubjectKeyIdentifier is the SHA-1 key id of the CSR's key."""
    csr = device_csr()
    extension = issue(csr).extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert extension.critical is False
    expected = x509.SubjectKeyIdentifier.from_public_key(csr.public_key())
    assert extension.value.digest == expected.digest
    assert len(extension.value.digest) == 20


def test_authority_key_identifier_is_ca_ski() -> None:
    """The AuthorityKeyIdentifier holds only the CA's SubjectKeyIdentifier."""
    extension = issue().extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
    ca_ski = demo_pki().est_ca.certificate.extensions.get_extension_for_class(
        x509.SubjectKeyIdentifier
    )
    assert extension.critical is False
    assert extension.value.key_identifier == ca_ski.value.digest
    assert extension.value.authority_cert_issuer is None
    assert extension.value.authority_cert_serial_number is None


def test_authority_key_identifier_without_ca_ski() -> None:
    """A CA certificate without SKI gives an AKI computed from the CA's public key."""
    key = ca_key("P-256")
    ca = CertificateAuthority(
        make_ca_certificate(key, subject_key_identifier=False), key
    )
    extension = issue(ca=ca).extensions.get_extension_for_class(
        x509.AuthorityKeyIdentifier
    )
    expected = x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key())
    assert extension.value.key_identifier == expected.key_identifier


def test_san_copied_non_critical_with_subject() -> None:
    """A CSR's SubjectAltName is copied byte for byte, non-critical beside a subject."""
    san = x509.SubjectAlternativeName(
        [x509.DNSName("device-1.example"), x509.UniformResourceIdentifier("urn:dev:1")]
    )
    csr = csr_for(device_name("with-san"), [(san, False)])
    extension = issue(csr).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert extension.critical is False
    assert extension.value == san
    assert extension.value.public_bytes() == san.public_bytes()


def test_san_critical_with_empty_subject() -> None:
    """With an empty subject the copied SAN is critical (RFC 5280 §4.2.1.6)."""
    san = x509.SubjectAlternativeName([x509.DNSName("device-2.example")])
    csr = csr_for(x509.Name([]), [(san, True)])
    certificate = issue(csr)
    assert raw_subject_of_certificate(certificate) == b"\x30\x00"
    extension = certificate.extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert extension.critical is True
    assert extension.value == san


def test_san_criticality_follows_subject_not_csr() -> None:
    """A SAN the CSR marked critical is non-critical when the subject is not empty."""
    san = x509.SubjectAlternativeName([x509.DNSName("device-3.example")])
    csr = csr_for(device_name("critical-san"), [(san, True)])
    extension = issue(csr).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert extension.critical is False


def test_no_san_when_csr_has_none() -> None:
    """A CSR without SubjectAltName gives a certificate without one."""
    with pytest.raises(x509.ExtensionNotFound):
        issue().extensions.get_extension_for_class(x509.SubjectAlternativeName)


def test_requested_usages_are_not_copied() -> None:
    """A CSR asking for keyEncipherment and serverAuth still gets the CA's profile."""
    requested = [
        (
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=True,
                key_encipherment=True,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            True,
        ),
        (
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            True,
        ),
    ]
    certificate = issue(csr_for(device_name("greedy"), requested))
    usage = certificate.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.public_bytes() == KEY_USAGE_DIGITAL_SIGNATURE_DER
    assert usage.key_encipherment is False
    extended = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert extended.value.public_bytes() == EKU_CLIENT_AUTH_DER


def test_other_requested_extensions_are_ignored() -> None:
    """Extensions other than SAN in the CSR (here OCSP no-check) are not copied."""
    csr = csr_for(device_name("extra"), [(x509.OCSPNoCheck(), False)])
    oids = {extension.oid for extension in issue(csr).extensions}
    assert ExtensionOID.OCSP_NO_CHECK not in oids
    assert len(oids) == 5


# --- Signatures by CA key type -----------------------------------------------


@pytest.mark.parametrize(
    ("kind", "hash_name", "algorithm"),
    [
        ("P-256", "sha256", SignatureAlgorithmOID.ECDSA_WITH_SHA256),
        ("P-384", "sha384", SignatureAlgorithmOID.ECDSA_WITH_SHA384),
        ("P-521", "sha512", SignatureAlgorithmOID.ECDSA_WITH_SHA512),
        ("RSA", "sha256", SignatureAlgorithmOID.RSA_WITH_SHA256),
        ("Ed25519", None, SignatureAlgorithmOID.ED25519),
    ],
)
def test_signature_follows_ca_key(
    kind: str, hash_name: str | None, algorithm: x509.ObjectIdentifier
) -> None:
    """The signature algorithm follows the CA key and verifies with the CA's key."""
    ca = ca_of_kind(kind)
    certificate = issue(ca=ca)
    assert certificate.signature_algorithm_oid == algorithm
    if hash_name is None:
        assert certificate.signature_hash_algorithm is None
    else:
        assert certificate.signature_hash_algorithm is not None
        assert certificate.signature_hash_algorithm.name == hash_name
    certificate.verify_directly_issued_by(ca.certificate)


def test_demo_certificate_verifies_with_ca() -> None:
    """A certificate from the demo EST CA verifies with the EST CA's public key."""
    certificate = issue()
    certificate.verify_directly_issued_by(demo_pki().est_ca.certificate)
    with pytest.raises(ValueError):
        certificate.verify_directly_issued_by(demo_pki().root.certificate)


# --- CertificateAuthority refuses what cannot sign ---------------------------


def test_refuses_end_entity_certificate() -> None:
    """A device certificate (CA:FALSE) cannot be the CA."""
    device = demo_pki().devices[0]
    with pytest.raises(ValueError) as caught:
        CertificateAuthority(device.certificate, device.key)
    assert (
        str(caught.value) == "the certificate is not a CA (BasicConstraints CA:FALSE)"
    )


def test_refuses_certificate_without_basic_constraints() -> None:
    """A certificate without BasicConstraints cannot be the CA."""
    key = ca_key("P-256")
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "no-bc")])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW)
        .not_valid_after(NOW + DURATION)
        .sign(key, hashes.SHA256())
    )
    with pytest.raises(ValueError) as caught:
        CertificateAuthority(certificate, key)
    assert (
        str(caught.value) == "the certificate has no BasicConstraints; it is not a CA"
    )


def test_refuses_ca_without_key_cert_sign() -> None:
    """A CA:TRUE certificate whose KeyUsage lacks keyCertSign cannot be the CA."""
    key = ca_key("P-256")
    certificate = make_ca_certificate(key, key_cert_sign=False)
    with pytest.raises(ValueError) as caught:
        CertificateAuthority(certificate, key)
    assert (
        str(caught.value) == "the CA certificate's KeyUsage does not allow keyCertSign"
    )


def test_refuses_key_not_matching() -> None:
    """A private key that is not the CA certificate's key is refused."""
    pki = demo_pki()
    with pytest.raises(ValueError) as caught:
        CertificateAuthority(pki.est_ca.certificate, pki.root.key)
    assert str(caught.value) == "the private key does not belong to the CA certificate"


def test_keeps_chain() -> None:
    """The chain given with the CA is kept in order."""
    pki = demo_pki()
    ca = CertificateAuthority(
        pki.est_ca.certificate, pki.est_ca.key, [pki.root.certificate]
    )
    assert ca.chain == (pki.root.certificate,)


# --- Loading keys and certificates -------------------------------------------


def private_bytes(
    key: CAPrivateKey,
    private_format: serialization.PrivateFormat,
    encoding: serialization.Encoding = serialization.Encoding.PEM,
    encryption: serialization.KeySerializationEncryption | None = None,
) -> bytes:
    """Serialise ``key`` (unencrypted unless ``encryption``)."""
    return key.private_bytes(
        encoding, private_format, encryption or serialization.NoEncryption()
    )


@pytest.mark.parametrize(
    ("kind", "private_format", "encoding", "marker"),
    [
        (
            "P-256",
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.Encoding.PEM,
            b"-----BEGIN EC PRIVATE KEY-----",
        ),
        (
            "P-256",
            serialization.PrivateFormat.PKCS8,
            serialization.Encoding.PEM,
            b"-----BEGIN PRIVATE KEY-----",
        ),
        (
            "RSA",
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.Encoding.PEM,
            b"-----BEGIN RSA PRIVATE KEY-----",
        ),
        (
            "Ed25519",
            serialization.PrivateFormat.PKCS8,
            serialization.Encoding.PEM,
            b"-----BEGIN PRIVATE KEY-----",
        ),
        (
            "P-384",
            serialization.PrivateFormat.PKCS8,
            serialization.Encoding.DER,
            b"\x30",
        ),
        (
            "RSA",
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.Encoding.DER,
            b"\x30",
        ),
    ],
    ids=["SEC1", "PKCS8", "RSA-PKCS1", "Ed25519", "PKCS8-DER", "PKCS1-DER"],
)
def test_load_private_key_formats(
    kind: str,
    private_format: serialization.PrivateFormat,
    encoding: serialization.Encoding,
    marker: bytes,
) -> None:
    """SEC1, PKCS#8 and PKCS#1 keys, PEM or DER, load as the same key."""
    key = ca_key(kind)
    data = private_bytes(key, private_format, encoding)
    assert data.startswith(marker)
    loaded = load_private_key(data)
    assert loaded.public_key() == key.public_key()


def test_load_encrypted_pkcs8() -> None:
    """An encrypted PKCS#8 key loads with its passphrase."""
    key = ca_key("P-256")
    data = private_bytes(
        key,
        serialization.PrivateFormat.PKCS8,
        encryption=serialization.BestAvailableEncryption(b"correct horse"),
    )
    assert data.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    assert load_private_key(data, b"correct horse").public_key() == key.public_key()


def test_load_encrypted_without_passphrase() -> None:
    """An encrypted key without a passphrase raises TypeError."""
    data = private_bytes(
        ca_key("P-256"),
        serialization.PrivateFormat.PKCS8,
        encryption=serialization.BestAvailableEncryption(b"correct horse"),
    )
    with pytest.raises(TypeError):
        load_private_key(data)


def test_load_encrypted_wrong_passphrase() -> None:
    """An encrypted key with the wrong passphrase raises ValueError."""
    data = private_bytes(
        ca_key("P-256"),
        serialization.PrivateFormat.PKCS8,
        encryption=serialization.BestAvailableEncryption(b"correct horse"),
    )
    with pytest.raises(ValueError):
        load_private_key(data, b"battery staple")


def test_load_refuses_unsupported_key_type() -> None:
    """A key type that cannot sign certificates (X25519) is refused."""
    data = x25519.X25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(ValueError) as caught:
        load_private_key(data)
    assert str(caught.value) == "unsupported key type X25519PrivateKey"


def test_load_refuses_non_key() -> None:
    """A certificate where a key is expected raises ValueError."""
    with pytest.raises(ValueError):
        load_private_key(demo_pki().root.cert_pem())


def test_load_certificates_pem_in_order() -> None:
    """Several PEM certificates load in file order."""
    pki = demo_pki()
    data = pki.est_ca.cert_pem() + pki.root.cert_pem()
    assert load_certificates(data) == [pki.est_ca.certificate, pki.root.certificate]


def test_load_certificates_der() -> None:
    """One DER certificate loads as a one-element list."""
    root = demo_pki().root.certificate
    assert load_certificates(root.public_bytes(serialization.Encoding.DER)) == [root]


def test_issue_from_intermediate_chain_key() -> None:
    """A CA made with estd.demo.make_pair issues certificates that verify under it."""
    pki = demo_pki()
    sub_ca = make_pair(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sub-ca")]),
        pki.root,
        ca=True,
        now=NOW,
    )
    ca = CertificateAuthority(sub_ca.certificate, sub_ca.key)
    issue(ca=ca).verify_directly_issued_by(sub_ca.certificate)
