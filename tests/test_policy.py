"""Unit tests of estd.policy and estd.enrollment: who may get what."""

from __future__ import annotations

import base64
import datetime
import functools

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from estd.config import LabelConfig
from estd.demo import Pair, device_name, make_pair
from estd.enrollment import enroll
from estd.errors import BadRequest, Forbidden, Unauthorized
from estd.policy import (
    ClientIdentity,
    EnrollSubject,
    Operation,
    authorize,
    check_csr,
    client_certificate_problem,
    require_identity,
)
from estd.wire import decode_body, raw_subject_of_certificate
from tests.pki import NOW, demo_config, demo_pki, fioconfig_csr, one_line_base64

SUBJECT_MISMATCH = "CSR subject does not match the client certificate"
SAN_MISMATCH = "CSR SubjectAltName does not match the client certificate"


def load(der: bytes) -> x509.CertificateSigningRequest:
    """Parse a DER CSR."""
    return x509.load_der_x509_csr(der)


def signed_csr(
    key: object,
    subject: x509.Name | None = None,
    extensions: list[tuple[x509.ExtensionType, bool]] = (),  # type: ignore[assignment]
) -> x509.CertificateSigningRequest:
    """A CSR for ``subject`` signed by ``key`` (SHA-256 unless an EdDSA key)."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        subject or device_name("policy-test")
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical)
    eddsa = isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey)
    return builder.sign(key, None if eddsa else hashes.SHA256())  # type: ignore[arg-type]


def identity(pair: Pair) -> ClientIdentity:
    """The identity of a device whose certificate chains to the demo device CA."""
    return ClientIdentity(
        pair.certificate, (pair.certificate, demo_pki().device_ca.certificate)
    )


def device() -> Pair:
    """The first demo device."""
    return demo_pki().devices[0]


@functools.cache
def device_with_san() -> Pair:
    """A device certificate carrying a DNS SubjectAltName."""
    return make_pair(
        device_name("san-device"),
        demo_pki().device_ca,
        ca=False,
        now=NOW,
        extended_usage=[ExtendedKeyUsageOID.CLIENT_AUTH],
        alt_names=[x509.DNSName("san-device.example")],
    )


def renewal_csr(
    pair: Pair, extensions: list[tuple[x509.ExtensionType, bool]] | None = None
) -> x509.CertificateSigningRequest:
    """A fioconfig CSR renewing ``pair`` (same subject), plus ``extensions``."""
    if extensions is None:
        return load(fioconfig_csr(pair.certificate.subject)[1])
    return load(fioconfig_csr(pair.certificate.subject, extensions=extensions)[1])


# --- check_csr ---------------------------------------------------------------


def corrupt_signature(der: bytes) -> bytes:
    """Flip one bit in the last byte of a DER CSR, which is inside its signature."""
    return der[:-1] + bytes([der[-1] ^ 0x01])


def test_corrupted_ecdsa_signature_is_400() -> None:
    """A CSR whose signature bytes were altered is refused: no proof of possession."""
    der = corrupt_signature(fioconfig_csr(device_name("tampered"))[1])
    csr = load(der)
    with pytest.raises(BadRequest) as caught:
        check_csr(csr)
    assert caught.value.status == 400
    assert caught.value.reason == (
        "the CSR signature does not verify (no proof of possession)"
    )


def test_corrupted_rsa_signature_is_400() -> None:
    """An RSA CSR whose signature bytes were altered is refused."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    der = signed_csr(key).public_bytes(serialization.Encoding.DER)
    with pytest.raises(BadRequest) as caught:
        check_csr(load(corrupt_signature(der)))
    assert caught.value.reason == (
        "the CSR signature does not verify (no proof of possession)"
    )


def test_csr_signed_by_another_key_is_400() -> None:
    """A CSR signed by another key than the one it certifies is refused."""
    csr = signed_csr(ec.generate_private_key(ec.SECP256R1()))
    other = signed_csr(ec.generate_private_key(ec.SECP256R1()))
    # Keep csr's CertificationRequestInfo, put other's signature after it.
    der = csr.public_bytes(serialization.Encoding.DER)
    other_der = other.public_bytes(serialization.Encoding.DER)
    tbs, other_tbs = csr.tbs_certrequest_bytes, other.tbs_certrequest_bytes
    tail = other_der[other_der.index(other_tbs) + len(other_tbs) :]
    body = tbs + tail
    assert len(body) < 0x100
    spliced = b"\x30\x81" + bytes([len(body)]) + body
    assert spliced != der
    with pytest.raises(BadRequest) as caught:
        check_csr(load(spliced))
    assert caught.value.reason == (
        "the CSR signature does not verify (no proof of possession)"
    )


@pytest.mark.parametrize(
    "curve", [ec.SECP224R1(), ec.SECP256K1()], ids=lambda c: c.name
)
def test_unsupported_curve_is_400(curve: ec.EllipticCurve) -> None:
    """A CSR on a curve other than P-256/P-384/P-521 is refused, naming the curve."""
    csr = signed_csr(ec.generate_private_key(curve))
    with pytest.raises(BadRequest) as caught:
        check_csr(csr)
    assert caught.value.status == 400
    assert (
        caught.value.reason == f"the CSR key uses the curve {curve.name}, not accepted"
    )


@pytest.mark.parametrize("curve", [ec.SECP256R1(), ec.SECP384R1(), ec.SECP521R1()])
def test_nist_curves_are_accepted(curve: ec.EllipticCurve) -> None:
    """CSRs on P-256, P-384 and P-521 pass."""
    assert check_csr(signed_csr(ec.generate_private_key(curve))) is None


def test_rsa_1024_is_400() -> None:
    """A 1024-bit RSA key is refused, with the accepted range in the message."""
    # A weak key on purpose: the behaviour under test is that estd refuses it.
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505
    csr = signed_csr(weak)
    with pytest.raises(BadRequest) as caught:
        check_csr(csr)
    assert caught.value.status == 400
    assert caught.value.reason == (
        "the CSR has a 1024-bit RSA key; 2048 to 8192 bits are accepted"
    )


def test_rsa_2048_is_accepted() -> None:
    """A 2048-bit RSA key passes."""
    csr = signed_csr(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    assert check_csr(csr) is None


def test_ed25519_is_accepted() -> None:
    """An Ed25519 key passes."""
    assert check_csr(signed_csr(ed25519.Ed25519PrivateKey.generate())) is None


def test_ed448_is_400() -> None:
    """An Ed448 key is not in the accepted list and is refused."""
    csr = signed_csr(ed448.Ed448PrivateKey.generate())
    with pytest.raises(BadRequest) as caught:
        check_csr(csr)
    assert caught.value.reason == "the CSR key type Ed448PublicKey is not accepted"


def test_ca_true_is_400() -> None:
    """A CSR asking for BasicConstraints CA:TRUE is refused."""
    csr = signed_csr(
        ec.generate_private_key(ec.SECP256R1()),
        extensions=[(x509.BasicConstraints(ca=True, path_length=None), True)],
    )
    with pytest.raises(BadRequest) as caught:
        check_csr(csr)
    assert caught.value.status == 400
    assert caught.value.reason == (
        "the CSR asks for a CA certificate (BasicConstraints CA:TRUE)"
    )


def test_ca_false_is_accepted() -> None:
    """A CSR that asks for CA:FALSE passes."""
    csr = signed_csr(
        ec.generate_private_key(ec.SECP256R1()),
        extensions=[(x509.BasicConstraints(ca=False, path_length=None), True)],
    )
    assert check_csr(csr) is None


def test_fioconfig_csr_is_accepted() -> None:
    """fioconfig's own CSR (P-256, KU and EKU critical) passes."""
    assert check_csr(renewal_csr(device())) is None


# --- authorize: simplereenroll -----------------------------------------------


def test_reenroll_same_subject_is_allowed() -> None:
    """Renewing with the client certificate's own subject is allowed."""
    pair = device()
    assert (
        authorize(
            Operation.SIMPLEREENROLL,
            identity(pair),
            renewal_csr(pair),
            EnrollSubject.MATCH,
        )
        is None
    )


def test_reenroll_other_subject_is_403() -> None:
    """Renewing with another device's subject is forbidden."""
    pki = demo_pki()
    csr = renewal_csr(pki.devices[1])
    with pytest.raises(Forbidden) as caught:
        authorize(
            Operation.SIMPLEREENROLL, identity(pki.devices[0]), csr, EnrollSubject.MATCH
        )
    assert caught.value.status == 403
    assert caught.value.reason == "CSR subject does not match the client certificate"


def test_reenroll_other_string_encoding_is_403() -> None:
    """The same subject text in PrintableString instead of UTF8String is forbidden."""
    pair = device()
    attributes = list(pair.certificate.subject)
    assert all(attribute._type is _ASN1Type.UTF8String for attribute in attributes)
    printable = x509.Name(
        [
            x509.NameAttribute(a.oid, a.value, _type=_ASN1Type.PrintableString)
            for a in attributes
        ]
    )
    csr = load(fioconfig_csr(printable)[1])
    assert csr.subject.rfc4514_string() == pair.certificate.subject.rfc4514_string()
    with pytest.raises(Forbidden) as caught:
        authorize(Operation.SIMPLEREENROLL, identity(pair), csr, EnrollSubject.MATCH)
    assert caught.value.reason == SUBJECT_MISMATCH


def test_reenroll_reordered_subject_is_403() -> None:
    """The same attributes in another order are a different subject."""
    pair = device()
    reordered = x509.Name(list(reversed(list(pair.certificate.subject))))
    csr = load(fioconfig_csr(reordered)[1])
    with pytest.raises(Forbidden) as caught:
        authorize(Operation.SIMPLEREENROLL, identity(pair), csr, EnrollSubject.MATCH)
    assert caught.value.reason == SUBJECT_MISMATCH


def test_reenroll_same_san_is_allowed() -> None:
    """Renewing with the same subject and the same SubjectAltName is allowed."""
    pair = device_with_san()
    san = pair.certificate.extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    csr = renewal_csr(pair, [(san.value, False)])
    assert (
        authorize(Operation.SIMPLEREENROLL, identity(pair), csr, EnrollSubject.MATCH)
        is None
    )


def test_reenroll_different_san_is_403() -> None:
    """Renewing with another SubjectAltName is forbidden."""
    pair = device_with_san()
    san = x509.SubjectAlternativeName([x509.DNSName("other-device.example")])
    csr = renewal_csr(pair, [(san, False)])
    with pytest.raises(Forbidden) as caught:
        authorize(Operation.SIMPLEREENROLL, identity(pair), csr, EnrollSubject.MATCH)
    assert caught.value.status == 403
    assert caught.value.reason == SAN_MISMATCH


def test_reenroll_added_san_is_403() -> None:
    """A renewal CSR adding a SubjectAltName the certificate lacks is forbidden."""
    pair = device()
    san = x509.SubjectAlternativeName([x509.DNSName("device.example")])
    csr = renewal_csr(pair, [(san, False)])
    with pytest.raises(Forbidden) as caught:
        authorize(Operation.SIMPLEREENROLL, identity(pair), csr, EnrollSubject.MATCH)
    assert caught.value.reason == SAN_MISMATCH


def test_reenroll_removed_san_is_403() -> None:
    """A renewal CSR dropping the certificate's SubjectAltName is forbidden."""
    pair = device_with_san()
    with pytest.raises(Forbidden) as caught:
        authorize(
            Operation.SIMPLEREENROLL,
            identity(pair),
            renewal_csr(pair),
            EnrollSubject.MATCH,
        )
    assert caught.value.reason == SAN_MISMATCH


def test_reenroll_ignores_enroll_subject_any() -> None:
    """enroll-subject = any does not loosen re-enrollment."""
    pki = demo_pki()
    csr = renewal_csr(pki.devices[1])
    with pytest.raises(Forbidden) as caught:
        authorize(
            Operation.SIMPLEREENROLL, identity(pki.devices[0]), csr, EnrollSubject.ANY
        )
    assert caught.value.reason == SUBJECT_MISMATCH


# --- authorize: simpleenroll -------------------------------------------------


def test_enroll_match_same_subject_is_allowed() -> None:
    """With enroll-subject = match, enrolling the client's own subject is allowed."""
    pair = device()
    assert (
        authorize(
            Operation.SIMPLEENROLL,
            identity(pair),
            renewal_csr(pair),
            EnrollSubject.MATCH,
        )
        is None
    )


def test_enroll_match_other_subject_is_403() -> None:
    """With enroll-subject = match, enrolling another subject is forbidden."""
    pki = demo_pki()
    csr = load(fioconfig_csr(device_name("new-device"))[1])
    with pytest.raises(Forbidden) as caught:
        authorize(
            Operation.SIMPLEENROLL, identity(pki.devices[0]), csr, EnrollSubject.MATCH
        )
    assert caught.value.reason == SUBJECT_MISMATCH


def test_enroll_any_other_subject_is_allowed() -> None:
    """With enroll-subject = any, a client may enroll any subject and SAN."""
    pki = demo_pki()
    san = x509.SubjectAlternativeName([x509.DNSName("new-device.example")])
    csr = load(fioconfig_csr(device_name("new-device"), extensions=[(san, False)])[1])
    assert (
        authorize(
            Operation.SIMPLEENROLL, identity(pki.devices[0]), csr, EnrollSubject.ANY
        )
        is None
    )


# --- require_identity --------------------------------------------------------


@pytest.mark.parametrize("operation", list(Operation))
def test_no_client_certificate_is_401(operation: Operation) -> None:
    """A client without a verified certificate is unauthorized, naming the operation."""
    with pytest.raises(Unauthorized) as caught:
        require_identity(operation, None)
    assert caught.value.status == 401
    assert (
        caught.value.reason == f"a client certificate is required for {operation.value}"
    )


def test_client_identity_is_passed_through() -> None:
    """A verified client is returned as is."""
    client = identity(device())
    assert require_identity(Operation.SIMPLEREENROLL, client) is client


def test_client_identity_properties() -> None:
    """A client identity names its subject, serial and trust anchor for logs."""
    pair = device()
    client = identity(pair)
    assert client.anchor is demo_pki().device_ca.certificate
    assert client.subject_text == pair.certificate.subject.rfc4514_string()
    serial = format(pair.certificate.serial_number, "X")
    assert client.serial_hex == ("0" + serial if len(serial) % 2 else serial)


# --- client_certificate_problem ----------------------------------------------


def test_ca_certificate_is_not_a_client() -> None:
    """A CA certificate cannot authenticate a client."""
    assert client_certificate_problem(demo_pki().device_ca.certificate) == (
        "is a CA certificate"
    )


def test_server_auth_only_is_not_a_client() -> None:
    """A certificate whose ExtKeyUsage is only serverAuth cannot be a client."""
    assert client_certificate_problem(demo_pki().tls.certificate) == (
        "does not allow clientAuth (ExtKeyUsage)"
    )


def test_no_ext_key_usage_is_a_client() -> None:
    """A leaf certificate without ExtKeyUsage may authenticate a client."""
    pair = make_pair(device_name("no-eku"), demo_pki().device_ca, ca=False, now=NOW)
    with pytest.raises(x509.ExtensionNotFound):
        pair.certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert client_certificate_problem(pair.certificate) is None


def test_client_auth_is_a_client() -> None:
    """A device certificate with clientAuth may authenticate a client."""
    assert client_certificate_problem(device().certificate) is None


def test_server_and_client_auth_is_a_client() -> None:
    """A certificate allowing both serverAuth and clientAuth may be a client."""
    pair = make_pair(
        device_name("both"),
        demo_pki().device_ca,
        ca=False,
        now=NOW,
        extended_usage=[
            ExtendedKeyUsageOID.SERVER_AUTH,
            ExtendedKeyUsageOID.CLIENT_AUTH,
        ],
    )
    assert client_certificate_problem(pair.certificate) is None


# --- enrollment.enroll end to end --------------------------------------------


@functools.cache
def settings(**options: str) -> LabelConfig:
    """The default label of a demo config loaded from disk (cached per options)."""
    return demo_config(**options).default


def test_enroll_returns_one_certificate() -> None:
    """A renewal answers with base64 of a PKCS#7 holding only the issued certificate."""
    pair = device()
    body = one_line_base64(fioconfig_csr(pair.certificate.subject)[1])
    result = enroll(settings(), Operation.SIMPLEREENROLL, identity(pair), body, NOW)
    certificates = pkcs7.load_der_pkcs7_certificates(decode_body(result.body))
    assert certificates == [result.issued.certificate]
    certificate = certificates[0]
    assert (
        raw_subject_of_certificate(certificate)
        == pair.certificate.subject.public_bytes()
    )
    assert certificate.not_valid_after_utc == NOW + datetime.timedelta(hours=26280)
    certificate.verify_directly_issued_by(demo_pki().est_ca.certificate)


def test_enroll_body_is_64_column_crlf() -> None:
    """The enrollment body is base64 in 64-column CRLF lines ending in one CRLF."""
    pair = device()
    body = one_line_base64(fioconfig_csr(pair.certificate.subject)[1])
    result = enroll(settings(), Operation.SIMPLEREENROLL, identity(pair), body, NOW)
    assert result.body.endswith(b"\r\n")
    assert not result.body.endswith(b"\r\n\r\n")
    lines = result.body[:-2].split(b"\r\n")
    assert all(len(line) == 64 for line in lines[:-1])
    assert 0 < len(lines[-1]) <= 64
    assert base64.b64decode(b"".join(lines)) == pkcs7.serialize_certificates(
        [result.issued.certificate], serialization.Encoding.DER
    )


def test_enroll_body_one_line() -> None:
    """With base64-line-length 0 the body is one line and one CRLF."""
    pair = device()
    body = one_line_base64(fioconfig_csr(pair.certificate.subject)[1])
    result = enroll(
        settings(base64_line_length="0"),
        Operation.SIMPLEREENROLL,
        identity(pair),
        body,
        NOW,
    )
    assert result.body.count(b"\r\n") == 1
    assert result.body.endswith(b"\r\n")
    assert b"\n" not in result.body[:-2]


def test_enroll_anonymous_is_401_before_parsing() -> None:
    """An anonymous request is refused with 401 even when its body is garbage."""
    with pytest.raises(Unauthorized) as caught:
        enroll(settings(), Operation.SIMPLEREENROLL, None, b"!!! not base64 !!!", NOW)
    assert caught.value.status == 401


def test_enroll_garbage_body_is_400() -> None:
    """An authenticated request with a body that is not a CSR is refused with 400."""
    with pytest.raises(BadRequest) as caught:
        enroll(settings(), Operation.SIMPLEREENROLL, identity(device()), b"!!!", NOW)
    assert caught.value.status == 400


def test_enroll_other_subject_is_403() -> None:
    """Re-enrolling another device's subject is refused with 403."""
    pki = demo_pki()
    body = one_line_base64(fioconfig_csr(pki.devices[1].certificate.subject)[1])
    with pytest.raises(Forbidden) as caught:
        enroll(
            settings(), Operation.SIMPLEREENROLL, identity(pki.devices[0]), body, NOW
        )
    assert caught.value.reason == SUBJECT_MISMATCH


def test_enroll_checks_csr_signature() -> None:
    """A renewal CSR with a broken signature is refused with 400 before signing."""
    pair = device()
    der = corrupt_signature(fioconfig_csr(pair.certificate.subject)[1])
    with pytest.raises(BadRequest) as caught:
        enroll(
            settings(),
            Operation.SIMPLEREENROLL,
            identity(pair),
            base64.b64encode(der),
            NOW,
        )
    assert caught.value.reason == (
        "the CSR signature does not verify (no proof of possession)"
    )


def test_enroll_subject_any_from_config() -> None:
    """enroll-subject = any in the config lets simpleenroll sign a new subject."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "brand-new")])
    body = one_line_base64(fioconfig_csr(subject)[1])
    result = enroll(
        settings(enroll_subject="any"),
        Operation.SIMPLEENROLL,
        identity(device()),
        body,
        NOW,
    )
    assert result.issued.certificate.subject == subject


def test_reenroll_san_other_string_encoding_is_403() -> None:
    """A SAN directoryName re-encoded as PrintableString is a different SAN: 403."""
    utf8 = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dir-device")])
    printable = x509.Name(
        [
            x509.NameAttribute(
                NameOID.COMMON_NAME, "dir-device", _type=_ASN1Type.PrintableString
            )
        ]
    )
    pair = make_pair(
        device_name("dirname-device"),
        demo_pki().device_ca,
        ca=False,
        now=NOW,
        extended_usage=[ExtendedKeyUsageOID.CLIENT_AUTH],
        alt_names=[x509.DirectoryName(utf8)],
    )
    san = x509.SubjectAlternativeName([x509.DirectoryName(printable)])
    certificate_san = pair.certificate.extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    ).value
    assert san.public_bytes() != certificate_san.public_bytes()
    csr = renewal_csr(pair, [(san, False)])
    with pytest.raises(Forbidden) as caught:
        authorize(Operation.SIMPLEREENROLL, identity(pair), csr, EnrollSubject.MATCH)
    assert caught.value.reason == SAN_MISMATCH
