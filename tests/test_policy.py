"""Unit tests of estd.policy: which CSRs are well formed and who may get them."""

from __future__ import annotations

import functools

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from estd.demo import Pair, device_name, make_pair
from estd.errors import BadRequest, Forbidden
from estd.identity import ID_KP_CMC_RA, ClientIdentity, Requester
from estd.policy import EnrollSubject, Operation, authorize, check_csr
from tests.pki import NOW, demo_pki, fioconfig_csr

SUBJECT_MISMATCH = "CSR subject does not match the client certificate"
SAN_MISMATCH = "CSR SubjectAltName does not match the client certificate"
USER_MISMATCH = "CSR common name does not match the user name"


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


def identity(pair: Pair) -> Requester:
    """A requester known by a device certificate chaining to the demo device CA."""
    return Requester(
        ClientIdentity(
            pair.certificate, (pair.certificate, demo_pki().device_ca.certificate)
        )
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


# --- authorize: registration authorities -------------------------------------


@functools.cache
def registration_authority() -> Pair:
    """An RA certificate: ExtKeyUsage clientAuth and id-kp-cmcRA."""
    return make_pair(
        device_name("registration-authority"),
        demo_pki().device_ca,
        ca=False,
        now=NOW,
        extended_usage=[ExtendedKeyUsageOID.CLIENT_AUTH, ID_KP_CMC_RA],
    )


def test_ra_enrolls_other_subject_under_match() -> None:
    """An RA may simpleenroll another subject even with enroll-subject = match."""
    ra = identity(registration_authority())
    assert ra.is_registration_authority
    csr = load(fioconfig_csr(device_name("enrolled-by-ra"))[1])
    assert authorize(Operation.SIMPLEENROLL, ra, csr, EnrollSubject.MATCH) is None


def test_ra_enrolls_other_san_under_match() -> None:
    """An RA may simpleenroll a CSR carrying a SubjectAltName its own lacks."""
    san = x509.SubjectAlternativeName([x509.DNSName("enrolled-by-ra.example")])
    csr = load(fioconfig_csr(device_name("ra-san"), extensions=[(san, False)])[1])
    assert (
        authorize(
            Operation.SIMPLEENROLL,
            identity(registration_authority()),
            csr,
            EnrollSubject.MATCH,
        )
        is None
    )


def test_ra_reenroll_other_subject_is_403() -> None:
    """An RA re-enrolling renews its own certificate: another subject is 403."""
    csr = load(fioconfig_csr(device_name("enrolled-by-ra"))[1])
    with pytest.raises(Forbidden) as caught:
        authorize(
            Operation.SIMPLEREENROLL,
            identity(registration_authority()),
            csr,
            EnrollSubject.MATCH,
        )
    assert caught.value.status == 403
    assert caught.value.reason == SUBJECT_MISMATCH


def test_ra_reenroll_own_subject_is_allowed() -> None:
    """An RA may renew its own certificate like any client."""
    pair = registration_authority()
    assert (
        authorize(
            Operation.SIMPLEREENROLL,
            identity(pair),
            renewal_csr(pair),
            EnrollSubject.MATCH,
        )
        is None
    )


# --- authorize: HTTP Basic users ---------------------------------------------


def basic_user(name: str = "dev-1") -> Requester:
    """A requester known only by an HTTP Basic user name (no certificate)."""
    return Requester(client=None, user=name)


def cn_csr(*common_names: str) -> x509.CertificateSigningRequest:
    """A fioconfig-style CSR whose subject holds these common names."""
    subject = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, name) for name in common_names]
    )
    return load(fioconfig_csr(subject)[1])


def test_basic_user_enrolls_own_name() -> None:
    """A basic-auth user may enroll the common name equal to the user name."""
    assert (
        authorize(
            Operation.SIMPLEENROLL, basic_user(), cn_csr("dev-1"), EnrollSubject.MATCH
        )
        is None
    )


def test_basic_user_enrolls_own_name_with_more_subject_fields() -> None:
    """Only the common name is bound to the user; other subject fields may vary."""
    csr = load(fioconfig_csr(device_name("dev-1", factory="line-7"))[1])
    assert (
        authorize(Operation.SIMPLEENROLL, basic_user(), csr, EnrollSubject.MATCH)
        is None
    )


def test_basic_user_cannot_claim_alternative_names() -> None:
    """A basic-auth user's CSR may not add a SubjectAltName of its choosing."""
    san = x509.SubjectAlternativeName([x509.DNSName("bank.example")])
    csr = load(
        fioconfig_csr(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dev-1")]),
            extensions=[(san, False)],
        )[1]
    )
    with pytest.raises(Forbidden) as raised:
        authorize(Operation.SIMPLEENROLL, basic_user(), csr, EnrollSubject.MATCH)
    assert raised.value.reason == (
        "CSR SubjectAltName is not allowed when enrolling by user name"
    )


@pytest.mark.parametrize(
    "common_names",
    [("dev-2",), ("DEV-1",), ("dev-1 ",), (), ("dev-1", "dev-1"), ("dev-1", "dev-2")],
    ids=["other", "case", "trailing-space", "none", "twice", "two-names"],
)
def test_basic_user_other_common_name_is_403(common_names: tuple[str, ...]) -> None:
    """A basic-auth user asking for any other common name (or none, or two) gets 403."""
    with pytest.raises(Forbidden) as caught:
        authorize(
            Operation.SIMPLEENROLL,
            basic_user(),
            cn_csr(*common_names),
            EnrollSubject.MATCH,
        )
    assert caught.value.status == 403
    assert caught.value.reason == USER_MISMATCH


def test_basic_user_any_subject_with_enroll_subject_any() -> None:
    """With enroll-subject = any a basic-auth user may enroll any subject."""
    assert (
        authorize(
            Operation.SIMPLEENROLL, basic_user(), cn_csr("dev-2"), EnrollSubject.ANY
        )
        is None
    )


def test_certificate_and_user_binds_to_the_certificate() -> None:
    """With a certificate and a user name, the CSR must match the certificate."""
    pair = device()
    both = Requester(identity(pair).client, user="dev-1")
    with pytest.raises(Forbidden) as caught:
        authorize(Operation.SIMPLEENROLL, both, cn_csr("dev-1"), EnrollSubject.MATCH)
    assert caught.value.reason == SUBJECT_MISMATCH
    assert (
        authorize(Operation.SIMPLEENROLL, both, renewal_csr(pair), EnrollSubject.MATCH)
        is None
    )
