"""Issued certificates pass pkilint's RFC 5280 certificate linter."""

from __future__ import annotations

import datetime
import functools

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID
from pkilint import loader
from pkilint.pkix import certificate as pkix_certificate
from pkilint.pkix import extension, name
from pkilint.validation import ValidationFindingSeverity

from estd.ca import CAPrivateKey, CertificateAuthority
from estd.demo import device_name
from tests.pki import NOW, demo_pki, fioconfig_csr

DURATION = datetime.timedelta(hours=26280)


@functools.cache
def rfc5280_validator():  # type: ignore[no-untyped-def]
    """pkilint's RFC 5280 certificate validator, as `lint_pkix_cert lint` builds it."""
    return pkix_certificate.create_pkix_certificate_validator_container(
        pkix_certificate.create_decoding_validators(
            name.ATTRIBUTE_TYPE_MAPPINGS, extension.EXTENSION_MAPPINGS
        ),
        [
            pkix_certificate.create_issuer_validator_container([]),
            pkix_certificate.create_validity_validator_container(),
            pkix_certificate.create_subject_validator_container([]),
            pkix_certificate.create_extensions_validator_container([]),
            pkix_certificate.create_spki_validator_container([]),
        ],
    )


def lint(
    certificate: x509.Certificate,
    threshold: ValidationFindingSeverity = ValidationFindingSeverity.ERROR,
) -> list[str]:
    """The findings at ``threshold`` or worse, as 'SEVERITY code @ node' lines."""
    document = loader.load_der_certificate(
        certificate.public_bytes(serialization.Encoding.DER), "issued"
    )
    return [
        f"{found.finding.severity.name} {found.finding.code} @ {result.node.path}"
        for result in rfc5280_validator().validate(document.root)
        for found in result.finding_descriptions
        if found.finding.severity <= threshold
    ]


def make_ca(key: CAPrivateKey) -> CertificateAuthority:
    """A self-signed CA for ``key`` with the extensions RFC 5280 asks of a CA."""
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, "lint-ca"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "demo-factory"),
        ]
    )
    public_key = key.public_key()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - datetime.timedelta(days=1))
        .not_valid_after(NOW + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), False)
        .sign(
            key, None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
        )
    )
    return CertificateAuthority(certificate, key)


def demo_ca() -> CertificateAuthority:
    """The demo EST CA (P-256)."""
    pki = demo_pki()
    return CertificateAuthority(pki.est_ca.certificate, pki.est_ca.key)


def issue(
    ca: CertificateAuthority,
    subject: x509.Name,
    extensions: list[tuple[x509.ExtensionType, bool]] | None = None,
) -> x509.Certificate:
    """Issue a fioconfig-style CSR for ``subject`` (plus ``extensions``)."""
    der = fioconfig_csr(subject, extensions=extensions)[1]
    return ca.issue(x509.load_der_x509_csr(der), NOW, DURATION).certificate


def test_fioconfig_renewal_passes_lint() -> None:
    """A renewal the way fioconfig asks for it (P-256, no SAN) has no lint errors."""
    subject = demo_pki().devices[0].certificate.subject
    assert lint(issue(demo_ca(), subject)) == []


def test_dns_san_passes_lint() -> None:
    """A certificate with a DNS SubjectAltName has no lint errors."""
    san = x509.SubjectAlternativeName([x509.DNSName("device-1.example.com")])
    certificate = issue(demo_ca(), device_name("san-device"), [(san, False)])
    assert certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert lint(certificate) == []


def test_empty_subject_with_san_passes_lint() -> None:
    """An empty-subject certificate (SAN made critical by estd) has no lint errors."""
    san = x509.SubjectAlternativeName([x509.DNSName("device-2.example.com")])
    certificate = issue(demo_ca(), x509.Name([]), [(san, False)])
    assert lint(certificate) == []


@pytest.mark.parametrize(
    "kind",
    ["RSA", "P-384", "P-521", "Ed25519"],
)
def test_other_ca_key_types_pass_lint(kind: str) -> None:
    """Certificates from RSA, P-384, P-521 and Ed25519 CAs have no lint errors."""
    key: CAPrivateKey
    if kind == "RSA":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    elif kind == "P-384":
        key = ec.generate_private_key(ec.SECP384R1())
    elif kind == "P-521":
        key = ec.generate_private_key(ec.SECP521R1())
    else:
        key = ed25519.Ed25519PrivateKey.generate()
    ca = make_ca(key)
    assert lint(ca.certificate) == []
    subject = demo_pki().devices[0].certificate.subject
    assert lint(issue(ca, subject)) == []


def test_issued_certificate_has_no_warnings() -> None:
    """A fioconfig renewal raises no lint warnings either, only informational notes."""
    subject = demo_pki().devices[0].certificate.subject
    certificate = issue(demo_ca(), subject)
    assert lint(certificate, ValidationFindingSeverity.WARNING) == []


# --- The linter can fail -----------------------------------------------------


def test_lint_reports_non_critical_san_with_empty_subject() -> None:
    """An empty subject beside a non-critical SAN is reported as an error."""
    pki = demo_pki()
    key = ec.generate_private_key(ec.SECP256R1())
    bad = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(pki.est_ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW)
        .not_valid_after(NOW + DURATION)
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("bad.example")]), False
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(
                pki.est_ca.key.public_key()
            ),
            False,
        )
        .sign(pki.est_ca.key, hashes.SHA256())
    )
    assert lint(bad) == [
        "ERROR pkix.san_extension_not_critical_empty_subject"
        " @ certificate.tbsCertificate.extensions.0"
    ]


def test_lint_reports_missing_authority_key_identifier() -> None:
    """A certificate lacking the AuthorityKeyIdentifier is reported as an error."""
    pki = demo_pki()
    key = ec.generate_private_key(ec.SECP256R1())
    bad = (
        x509.CertificateBuilder()
        .subject_name(device_name("no-aki"))
        .issuer_name(pki.est_ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW)
        .not_valid_after(NOW + DURATION)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False
        )
        .sign(pki.est_ca.key, hashes.SHA256())
    )
    assert lint(bad) == [
        "ERROR pkix.authority_key_identifier_extension_absent @ certificate"
    ]
