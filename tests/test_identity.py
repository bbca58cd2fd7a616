"""Unit tests of estd.identity: who is asking, and may they ask at all."""

from __future__ import annotations

import base64
import datetime
import functools
from collections.abc import Callable

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import AttributeOID, ExtendedKeyUsageOID, NameOID

from estd.demo import Pair, device_name, make_pair
from estd.errors import Forbidden, Unauthorized
from estd.identity import (
    ID_KP_CMC_RA,
    AuthMode,
    BadCredentials,
    ClientIdentity,
    Requester,
    authenticate,
    check_expiry_grace,
    check_proof_of_possession,
    client_certificate_problem,
)
from tests.pki import NOW, demo_pki

REALM = "factory"
CHALLENGE = {"WWW-Authenticate": 'Basic realm="factory"'}
USER, PASSWORD = "dev-1", "correct horse"
RENEWAL_NEEDS_CERTIFICATE = "re-enrollment needs the client certificate being renewed"
FOREIGN_ANCHOR = "the client certificate is not issued by a CA this label trusts"
MISSING = {
    AuthMode.CERT: "a client certificate is required",
    AuthMode.BASIC: "HTTP Basic credentials are required",
    AuthMode.CERT_OR_BASIC: (
        "a client certificate or HTTP Basic credentials are required"
    ),
    AuthMode.CERT_AND_BASIC: (
        "a client certificate and HTTP Basic credentials are required"
    ),
}
POP_MISMATCH = "Proof of possession mismatch"
BINDING = bytes(range(12))  # the length of tls-unique on TLS 1.2 (RFC 5929)


def fingerprint(certificate: x509.Certificate) -> bytes:
    """The SHA-256 fingerprint of a certificate."""
    return certificate.fingerprint(hashes.SHA256())


def demo_anchors() -> frozenset[bytes]:
    """The anchors of the demo label: the EST CA and the device CA."""
    pki = demo_pki()
    return frozenset(
        fingerprint(c) for c in (pki.est_ca.certificate, pki.device_ca.certificate)
    )


def identity(pair: Pair, expired: bool = False) -> ClientIdentity:
    """The identity of a certificate chaining to the demo device CA."""
    return ClientIdentity(
        pair.certificate,
        (pair.certificate, demo_pki().device_ca.certificate),
        expired=expired,
    )


def device() -> ClientIdentity:
    """The first demo device, verified against the device CA."""
    return identity(demo_pki().devices[0])


def foreign_device() -> ClientIdentity:
    """A device verified against the factory root, which the label does not trust."""
    pair = demo_pki().devices[0]
    pki = demo_pki()
    return ClientIdentity(
        pair.certificate,
        (pair.certificate, pki.device_ca.certificate, pki.root.certificate),
    )


def check_password(user: str, password: str) -> bool:
    """The users file of these tests: one user, one password."""
    return (user, password) == (USER, PASSWORD)


def no_password_check(user: str, password: str) -> bool:
    """A users file that must not be consulted."""
    raise AssertionError("the password was checked")


def run(
    mode: AuthMode,
    client: ClientIdentity | None = None,
    credentials: tuple[str, str] | None = None,
    *,
    reenroll: bool = False,
    channel_binding: bytes | None = None,
    password_check: Callable[[str, str], bool] = check_password,
) -> Requester:
    """authenticate() for the demo label with realm "factory"."""
    return authenticate(
        mode,
        client=client,
        credentials=credentials,
        check_password=password_check,
        realm=REALM,
        needs_certificate=reenroll,
        anchor_fingerprints=demo_anchors(),
        channel_binding=channel_binding,
    )


def refusal(
    kind: type[Exception], mode: AuthMode, *args: object, **kwargs: object
) -> Unauthorized | Forbidden:
    """The error authenticate() raises, checked to be of ``kind``."""
    with pytest.raises(kind) as caught:
        run(mode, *args, **kwargs)  # type: ignore[arg-type]
    error = caught.value
    assert isinstance(error, Unauthorized | Forbidden)
    return error


# --- AuthMode ----------------------------------------------------------------


def test_auth_mode_values() -> None:
    """The auth modes are spelt as in est.ini, and only cert leaves out Basic."""
    assert [mode.value for mode in AuthMode] == [
        "cert",
        "basic",
        "cert-or-basic",
        "cert-and-basic",
    ]
    assert [mode.uses_basic for mode in AuthMode] == [False, True, True, True]


# --- authenticate: auth = cert -----------------------------------------------


def test_cert_mode_with_certificate() -> None:
    """With auth = cert a verified device certificate is the requester."""
    client = device()
    assert run(AuthMode.CERT, client) == Requester(client=client, user=None)


def test_cert_mode_without_certificate_is_401_without_challenge() -> None:
    """With auth = cert a client without a certificate gets 401, no Basic challenge."""
    error = refusal(Unauthorized, AuthMode.CERT)
    assert error.status == 401
    assert error.reason == "a client certificate is required"
    assert error.headers == {}


def test_cert_mode_ignores_credentials() -> None:
    """With auth = cert, Basic credentials neither help nor are checked."""
    error = refusal(
        Unauthorized,
        AuthMode.CERT,
        None,
        (USER, PASSWORD),
        password_check=no_password_check,
    )
    assert error.reason == "a client certificate is required"
    assert error.headers == {}
    client = device()
    requester = run(
        AuthMode.CERT, client, (USER, "wrong"), password_check=no_password_check
    )
    assert requester == Requester(client=client, user=None)


def test_cert_mode_reenroll_without_certificate() -> None:
    """With auth = cert, re-enrolling without a certificate is 401 without challenge."""
    error = refusal(Unauthorized, AuthMode.CERT, reenroll=True)
    assert error.reason == RENEWAL_NEEDS_CERTIFICATE
    assert error.headers == {}


# --- authenticate: auth = basic ----------------------------------------------


def test_basic_mode_right_password() -> None:
    """With auth = basic the right user and password make the user the requester."""
    assert run(AuthMode.BASIC, None, (USER, PASSWORD)) == Requester(None, USER)


def test_basic_mode_wrong_password_is_401_with_challenge() -> None:
    """With auth = basic a wrong password gets 401 and a Basic challenge."""
    error = refusal(BadCredentials, AuthMode.BASIC, None, (USER, "wrong"))
    assert error.status == 401
    assert error.reason == "wrong user name or password"
    assert error.headers == CHALLENGE


def test_basic_mode_unknown_user_is_401() -> None:
    """An unknown user gets the same answer as a wrong password."""
    error = refusal(BadCredentials, AuthMode.BASIC, None, ("dev-2", PASSWORD))
    assert error.reason == "wrong user name or password"
    assert error.headers == CHALLENGE


def test_basic_mode_without_credentials_is_401_with_challenge() -> None:
    """With auth = basic and no credentials the client is challenged for them."""
    error = refusal(Unauthorized, AuthMode.BASIC)
    assert not isinstance(error, BadCredentials)
    assert error.reason == "HTTP Basic credentials are required"
    assert error.headers == CHALLENGE


def test_basic_mode_certificate_alone_is_401() -> None:
    """With auth = basic a certificate alone does not authenticate simpleenroll."""
    error = refusal(Unauthorized, AuthMode.BASIC, device())
    assert error.reason == "HTTP Basic credentials are required"
    assert error.headers == CHALLENGE


def test_basic_mode_ignores_certificate_for_simpleenroll() -> None:
    """With auth = basic a certificate sent along plays no part in simpleenroll."""
    assert run(AuthMode.BASIC, device(), (USER, PASSWORD)) == Requester(None, USER)


def test_basic_mode_ignores_untrusted_certificate_for_simpleenroll() -> None:
    """With auth = basic a certificate from a CA the label does not trust is no 403."""
    requester = run(AuthMode.BASIC, foreign_device(), (USER, PASSWORD))
    assert requester == Requester(None, USER)


def test_basic_mode_reenroll_keeps_certificate() -> None:
    """With auth = basic, re-enrollment needs the certificate and the password."""
    client = device()
    requester = run(AuthMode.BASIC, client, (USER, PASSWORD), reenroll=True)
    assert requester == Requester(client=client, user=USER)
    error = refusal(Unauthorized, AuthMode.BASIC, client, reenroll=True)
    assert error.reason == "HTTP Basic credentials are required"


def test_basic_mode_reenroll_without_certificate() -> None:
    """With auth = basic, re-enrolling with only a password is 401 with challenge."""
    error = refusal(Unauthorized, AuthMode.BASIC, None, (USER, PASSWORD), reenroll=True)
    assert error.reason == RENEWAL_NEEDS_CERTIFICATE
    assert error.headers == CHALLENGE


def test_basic_mode_reenroll_untrusted_certificate_is_403() -> None:
    """With auth = basic a re-enrolling certificate must chain to the label's CAs."""
    error = refusal(
        Forbidden, AuthMode.BASIC, foreign_device(), (USER, PASSWORD), reenroll=True
    )
    assert error.status == 403
    assert error.reason == FOREIGN_ANCHOR


# --- authenticate: auth = cert-or-basic --------------------------------------


def test_cert_or_basic_with_certificate() -> None:
    """With auth = cert-or-basic a certificate alone is enough."""
    client = device()
    assert run(AuthMode.CERT_OR_BASIC, client) == Requester(client, None)


def test_cert_or_basic_with_password() -> None:
    """With auth = cert-or-basic a right password alone is enough."""
    requester = run(AuthMode.CERT_OR_BASIC, None, (USER, PASSWORD))
    assert requester == Requester(None, USER)


def test_cert_or_basic_with_both() -> None:
    """With auth = cert-or-basic a certificate and a password are both recorded."""
    client = device()
    requester = run(AuthMode.CERT_OR_BASIC, client, (USER, PASSWORD))
    assert requester == Requester(client, USER)


def test_cert_or_basic_with_neither_is_401() -> None:
    """With auth = cert-or-basic and nothing presented, the client is challenged."""
    error = refusal(Unauthorized, AuthMode.CERT_OR_BASIC)
    assert error.reason == (
        "a client certificate or HTTP Basic credentials are required"
    )
    assert error.headers == CHALLENGE


def test_cert_or_basic_wrong_password_with_certificate_is_401() -> None:
    """With auth = cert-or-basic a wrong password is refused even with a certificate."""
    error = refusal(BadCredentials, AuthMode.CERT_OR_BASIC, device(), (USER, "nope"))
    assert error.reason == "wrong user name or password"
    assert error.headers == CHALLENGE


# --- authenticate: auth = cert-and-basic -------------------------------------


def test_cert_and_basic_with_both() -> None:
    """With auth = cert-and-basic a certificate and the right password pass."""
    client = device()
    requester = run(AuthMode.CERT_AND_BASIC, client, (USER, PASSWORD))
    assert requester == Requester(client, USER)


@pytest.mark.parametrize("has_certificate", [True, False], ids=["cert", "password"])
def test_cert_and_basic_with_one_is_401(has_certificate: bool) -> None:
    """With auth = cert-and-basic a certificate or a password alone gets 401."""
    if has_certificate:
        error = refusal(Unauthorized, AuthMode.CERT_AND_BASIC, device())
    else:
        error = refusal(Unauthorized, AuthMode.CERT_AND_BASIC, None, (USER, PASSWORD))
    assert error.reason == (
        "a client certificate and HTTP Basic credentials are required"
    )
    assert error.headers == CHALLENGE


def test_cert_and_basic_wrong_password_is_401() -> None:
    """With auth = cert-and-basic a wrong password is refused with a challenge."""
    error = refusal(BadCredentials, AuthMode.CERT_AND_BASIC, device(), (USER, "x"))
    assert error.headers == CHALLENGE


# --- authenticate: every mode ------------------------------------------------


@pytest.mark.parametrize("mode", list(AuthMode), ids=lambda m: m.value)
def test_nothing_presented_is_401(mode: AuthMode) -> None:
    """A client presenting nothing gets 401 saying what the label wants."""
    error = refusal(Unauthorized, mode)
    assert error.status == 401
    assert error.reason == MISSING[mode]
    assert error.headers == (CHALLENGE if mode.uses_basic else {})


@pytest.mark.parametrize("mode", list(AuthMode), ids=lambda m: m.value)
def test_reenroll_without_certificate_is_401(mode: AuthMode) -> None:
    """Re-enrolling without a certificate is 401 under every mode."""
    error = refusal(Unauthorized, mode, reenroll=True)
    assert error.reason == RENEWAL_NEEDS_CERTIFICATE
    assert error.headers == (CHALLENGE if mode.uses_basic else {})


@pytest.mark.parametrize(
    "mode",
    [AuthMode.CERT, AuthMode.CERT_OR_BASIC, AuthMode.CERT_AND_BASIC],
    ids=lambda m: m.value,
)
@pytest.mark.parametrize("reenroll", [False, True], ids=["enroll", "reenroll"])
def test_untrusted_anchor_is_403(mode: AuthMode, reenroll: bool) -> None:
    """A certificate chaining to a CA the label does not trust is refused with 403."""
    error = refusal(
        Forbidden, mode, foreign_device(), (USER, PASSWORD), reenroll=reenroll
    )
    assert error.status == 403
    assert error.reason == FOREIGN_ANCHOR


def test_certificate_issued_by_est_ca_is_trusted() -> None:
    """A certificate estd issued (chaining to the EST CA) authenticates too."""
    pki = demo_pki()
    pair = pki.devices[1]
    client = ClientIdentity(
        pair.certificate, (pair.certificate, pki.est_ca.certificate)
    )
    assert run(AuthMode.CERT, client, reenroll=True) == Requester(client, None)


def test_channel_binding_is_carried() -> None:
    """The TLS channel binding is handed on with the requester."""
    requester = run(AuthMode.CERT, device(), channel_binding=BINDING)
    assert requester.channel_binding == BINDING


# --- check_expiry_grace ------------------------------------------------------


@functools.cache
def expired_pair() -> Pair:
    """A device certificate that expired ten days before NOW."""
    return make_pair(
        device_name("expired-device"),
        demo_pki().device_ca,
        ca=False,
        now=NOW,
        days=30,
        not_before=NOW - datetime.timedelta(days=40),
        extended_usage=[ExtendedKeyUsageOID.CLIENT_AUTH],
    )


def expired_requester() -> Requester:
    """A requester whose certificate was let in although expired."""
    return Requester(identity(expired_pair(), expired=True))


EXPIRED_AT = NOW - datetime.timedelta(days=10)
GRACE = datetime.timedelta(days=30)


def test_expired_pair_is_as_described() -> None:
    """The expired test certificate ends exactly ten days before NOW."""
    assert expired_pair().certificate.not_valid_after_utc == EXPIRED_AT


@pytest.mark.parametrize("reenrolling", [False, True])
def test_current_certificate_passes(reenrolling: bool) -> None:
    """A certificate that has not expired passes, whatever the grace."""
    requester = Requester(device())
    assert check_expiry_grace(requester, reenrolling, datetime.timedelta(), NOW) is None


def test_no_certificate_passes() -> None:
    """A requester without a certificate has nothing to expire."""
    requester = Requester(None, USER)
    assert check_expiry_grace(requester, False, datetime.timedelta(), NOW) is None


def test_expired_simpleenroll_is_403() -> None:
    """An expired certificate may not simpleenroll, even within the grace."""
    with pytest.raises(Forbidden) as caught:
        check_expiry_grace(expired_requester(), False, GRACE, NOW)
    assert caught.value.status == 403
    assert caught.value.reason == (
        f"the client certificate expired on {EXPIRED_AT:%Y-%m-%d}; "
        "only simplereenroll accepts an expired certificate"
    )


def test_expired_reenroll_within_grace_passes() -> None:
    """An expired certificate may re-enroll within the label's grace."""
    assert check_expiry_grace(expired_requester(), True, GRACE, NOW) is None


def test_expired_reenroll_at_the_edge_passes() -> None:
    """Exactly the grace after expiry, re-enrollment is still allowed (as at TLS)."""
    edge = EXPIRED_AT + GRACE
    assert check_expiry_grace(expired_requester(), True, GRACE, edge) is None


def test_expired_reenroll_beyond_grace_is_403() -> None:
    """One second past the grace, re-enrollment is refused with 403."""
    later = EXPIRED_AT + GRACE + datetime.timedelta(seconds=1)
    with pytest.raises(Forbidden) as caught:
        check_expiry_grace(expired_requester(), True, GRACE, later)
    assert caught.value.reason == (
        f"the client certificate expired on {EXPIRED_AT:%Y-%m-%d}, "
        "beyond this label's re-enrollment grace"
    )


def test_expired_reenroll_without_grace_is_403() -> None:
    """A label without grace refuses an expired certificate another label let in."""
    with pytest.raises(Forbidden) as caught:
        check_expiry_grace(expired_requester(), True, datetime.timedelta(), NOW)
    assert caught.value.reason.endswith("beyond this label's re-enrollment grace")


# --- check_proof_of_possession -----------------------------------------------


def pop_csr(challenge_password: bytes | None = None) -> x509.CertificateSigningRequest:
    """A P-256 CSR, with a challengePassword attribute when one is given."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        device_name("pop-device")
    )
    if challenge_password is not None:
        builder = builder.add_attribute(
            AttributeOID.CHALLENGE_PASSWORD, challenge_password
        )
    return builder.sign(ec.generate_private_key(ec.SECP256R1()), hashes.SHA256())


def pop_refusal(
    requester: Requester, csr: x509.CertificateSigningRequest, required: bool
) -> Unauthorized:
    """The 401 check_proof_of_possession raises."""
    with pytest.raises(Unauthorized) as caught:
        check_proof_of_possession(requester, csr, required)
    assert caught.value.status == 401
    return caught.value


def bound(binding: bytes | None = BINDING) -> Requester:
    """A device requester on a connection with this channel binding."""
    return Requester(device(), channel_binding=binding)


def test_pop_absent_not_required_passes() -> None:
    """Without require-pop a CSR without challengePassword passes."""
    assert check_proof_of_possession(bound(), pop_csr(), required=False) is None


def test_pop_absent_required_is_401() -> None:
    """With require-pop a CSR without challengePassword gets 401."""
    error = pop_refusal(bound(), pop_csr(), required=True)
    assert error.reason == POP_MISMATCH


@pytest.mark.parametrize("required", [True, False])
def test_pop_matching_binding_passes(required: bool) -> None:
    """A challengePassword holding the base64 channel binding passes."""
    csr = pop_csr(base64.b64encode(BINDING))
    assert check_proof_of_possession(bound(), csr, required) is None


@pytest.mark.parametrize("required", [True, False])
def test_pop_wrong_binding_is_401(required: bool) -> None:
    """A challengePassword that is not this connection's binding gets 401."""
    csr = pop_csr(base64.b64encode(bytes(12)))
    error = pop_refusal(bound(), csr, required)
    assert error.reason == POP_MISMATCH


def test_pop_binding_in_hex_is_401() -> None:
    """The binding must be base64 encoded; the same bytes in hex are a mismatch."""
    error = pop_refusal(bound(), pop_csr(BINDING.hex().encode()), required=True)
    assert error.reason == POP_MISMATCH


def test_pop_ordinary_password_is_401() -> None:
    """A challengePassword holding a password (not a binding) gets 401."""
    error = pop_refusal(bound(), pop_csr(b"s3cret"), required=False)
    assert error.reason == POP_MISMATCH


def test_pop_without_binding_is_401() -> None:
    """A challengePassword on a connection without a binding cannot match: 401."""
    csr = pop_csr(base64.b64encode(BINDING))
    error = pop_refusal(bound(None), csr, required=False)
    assert error.reason == POP_MISMATCH


def test_pop_other_connection_binding_is_401() -> None:
    """A CSR made for another TLS connection does not match this one."""
    csr = pop_csr(base64.b64encode(BINDING))
    error = pop_refusal(bound(bytes(reversed(BINDING))), csr, required=True)
    assert error.reason == POP_MISMATCH


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


@pytest.mark.parametrize(
    "challenge_password",
    [None, base64.b64encode(bytes(12)), b"s3cret"],
    ids=["absent", "wrong-binding", "password"],
)
def test_pop_registration_authority_is_exempt(
    challenge_password: bytes | None,
) -> None:
    """An RA forwards other clients' CSRs, so their bindings are not checked."""
    ra = Requester(identity(registration_authority()), channel_binding=BINDING)
    csr = pop_csr(challenge_password)
    assert check_proof_of_possession(ra, csr, required=True) is None


def der(tag: int, content: bytes) -> bytes:
    """One DER element with a definite length."""
    if len(content) < 0x80:
        return bytes([tag, len(content)]) + content
    size = len(content).to_bytes((len(content).bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + content


def csr_with_multi_valued_attribute() -> x509.CertificateSigningRequest:
    """A signed CSR whose one attribute (not challengePassword) has two values.

    RFC 2986 §4.1 makes every Attribute a SET OF values; cryptography's
    builder makes single-valued ones only, so the DER is put together here.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    # unstructuredName (PKCS#9, 1.2.840.113549.1.9.2) with two UTF8Strings
    attribute = der(
        0x30,
        bytes.fromhex("06092a864886f70d010902")
        + der(0x31, der(0x0C, b"line-1") + der(0x0C, b"line-2")),
    )
    name = device_name("multi-valued").public_bytes()
    info = der(0x30, bytes.fromhex("020100") + name + spki + der(0xA0, attribute))
    signature = key.sign(info, ec.ECDSA(hashes.SHA256()))
    ecdsa_with_sha256 = der(0x30, bytes.fromhex("06082a8648ce3d040302"))
    csr = x509.load_der_x509_csr(
        der(0x30, info + ecdsa_with_sha256 + der(0x03, b"\0" + signature))
    )
    assert csr.is_signature_valid
    return csr


def test_pop_multi_valued_other_attribute_passes() -> None:
    """A CSR with a multi-valued attribute other than challengePassword passes."""
    csr = csr_with_multi_valued_attribute()
    assert check_proof_of_possession(bound(), csr, required=False) is None


# --- ClientIdentity and Requester --------------------------------------------


def test_client_identity_properties() -> None:
    """A client identity names its subject, serial and trust anchor for logs."""
    pair = demo_pki().devices[0]
    client = identity(pair)
    assert client.anchor is demo_pki().device_ca.certificate
    assert client.subject_text == pair.certificate.subject.rfc4514_string()
    serial = format(pair.certificate.serial_number, "X")
    assert client.serial_hex == ("0" + serial if len(serial) % 2 else serial)
    assert client.expired is False


def test_ra_certificate_is_registration_authority() -> None:
    """A certificate with id-kp-cmcRA in its ExtKeyUsage is an RA."""
    client = identity(registration_authority())
    assert client.is_registration_authority
    assert Requester(client).is_registration_authority


def test_device_is_not_registration_authority() -> None:
    """A device certificate (clientAuth only) is not an RA."""
    assert not device().is_registration_authority
    assert not Requester(device()).is_registration_authority


def test_no_ext_key_usage_is_not_registration_authority() -> None:
    """A certificate without ExtKeyUsage is not an RA."""
    pair = make_pair(device_name("no-eku-ra"), demo_pki().device_ca, ca=False, now=NOW)
    assert not identity(pair).is_registration_authority


def test_basic_user_is_not_registration_authority() -> None:
    """A requester without a certificate is never an RA."""
    assert not Requester(None, USER).is_registration_authority


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


def test_ra_only_is_not_a_client() -> None:
    """A certificate whose ExtKeyUsage is id-kp-cmcRA without clientAuth is refused."""
    pair = make_pair(
        device_name("ra-only"),
        demo_pki().device_ca,
        ca=False,
        now=NOW,
        extended_usage=[ID_KP_CMC_RA],
    )
    assert client_certificate_problem(pair.certificate) == (
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
    assert client_certificate_problem(demo_pki().devices[0].certificate) is None


def test_ra_certificate_is_a_client() -> None:
    """An RA certificate with clientAuth may authenticate a client."""
    assert client_certificate_problem(registration_authority().certificate) is None


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


def test_certificate_without_basic_constraints_is_a_client() -> None:
    """A leaf without BasicConstraints (older device certificates) may be a client."""
    key = ec.generate_private_key(ec.SECP256R1())
    issuer = demo_pki().device_ca
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "no-bc")])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - datetime.timedelta(hours=1))
        .not_valid_after(NOW + datetime.timedelta(days=1))
        .sign(issuer.key, hashes.SHA256())
    )
    assert client_certificate_problem(certificate) is None
