"""Unit tests of estd.enrollment.enroll: one enrollment, decided and issued."""

from __future__ import annotations

import base64
import datetime
import email
import functools
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import AttributeOID, ExtendedKeyUsageOID, NameOID

from estd import auth
from estd.config import LabelConfig
from estd.demo import Pair, device_name, make_pair
from estd.enrollment import Enrollment, EnrollmentRequest, enroll
from estd.errors import BadRequest, Forbidden, ServiceUnavailable, Unauthorized
from estd.identity import BadCredentials, ClientIdentity, Requester
from estd.ledger import LedgerUnavailable
from estd.policy import Operation
from estd.wire import decode_body, raw_subject_of_certificate, raw_subject_of_csr
from tests.pki import NOW, demo_config, demo_pki, fioconfig_csr, one_line_base64
from tests.test_identity import csr_with_multi_valued_attribute

SUBJECT_MISMATCH = "CSR subject does not match the client certificate"
POP_MISMATCH = "Proof of possession mismatch"
BINDING = bytes(range(32))  # the length of tls-exporter (RFC 9266)
USER, PASSWORD = "dev-1", "correct horse"
REENROLL, ENROLL = Operation.SIMPLEREENROLL, Operation.SIMPLEENROLL


@functools.cache
def settings(**options: str) -> LabelConfig:
    """The default label of a demo config with these est.ini overrides (cached)."""
    return demo_config(**options).default


def identity(pair: Pair, expired: bool = False) -> ClientIdentity:
    """The identity of a certificate chaining to the demo device CA."""
    return ClientIdentity(
        pair.certificate,
        (pair.certificate, demo_pki().device_ca.certificate),
        expired=expired,
    )


def device() -> Pair:
    """The first demo device."""
    return demo_pki().devices[0]


def renewal_body(pair: Pair) -> bytes:
    """The body fioconfig posts to renew ``pair``: a one-line base64 CSR."""
    return one_line_base64(fioconfig_csr(pair.certificate.subject)[1])


def certificates_of(enrollment: Enrollment) -> list[x509.Certificate]:
    """The certificates in an enrollment's certs-only PKCS#7 body."""
    return pkcs7.load_der_pkcs7_certificates(decode_body(enrollment.body))


def csr_body(
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey | None = None,
    *,
    challenge_password: bytes | None = None,
    algorithm: hashes.HashAlgorithm | None = None,
) -> bytes:
    """A base64 CSR for ``subject``, optionally with a challengePassword."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
    if challenge_password is not None:
        builder = builder.add_attribute(
            AttributeOID.CHALLENGE_PASSWORD, challenge_password
        )
    csr = builder.sign(key, algorithm or hashes.SHA256())
    return base64.b64encode(csr.public_bytes(serialization.Encoding.DER))


def user_name(name: str) -> x509.Name:
    """A subject whose only field is the common name ``name``."""
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])


# --- A plain renewal ---------------------------------------------------------


def test_enroll_returns_one_certificate() -> None:
    """A renewal answers with base64 of a PKCS#7 holding only the issued certificate."""
    pair = device()
    result = enroll(
        settings(),
        EnrollmentRequest(REENROLL, renewal_body(pair), client=identity(pair)),
        NOW,
    )
    certificates = certificates_of(result)
    assert certificates == [result.issued.certificate]
    certificate = certificates[0]
    assert (
        raw_subject_of_certificate(certificate)
        == pair.certificate.subject.public_bytes()
    )
    assert certificate.not_valid_after_utc == NOW + datetime.timedelta(hours=26280)
    certificate.verify_directly_issued_by(demo_pki().est_ca.certificate)
    assert result.content_type is None
    assert result.requester == Requester(identity(pair))


def test_enroll_body_is_64_column_crlf() -> None:
    """The enrollment body is base64 in 64-column CRLF lines ending in one CRLF."""
    pair = device()
    result = enroll(
        settings(),
        EnrollmentRequest(REENROLL, renewal_body(pair), client=identity(pair)),
        NOW,
    )
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
    result = enroll(
        settings(base64_line_length="0"),
        EnrollmentRequest(REENROLL, renewal_body(pair), client=identity(pair)),
        NOW,
    )
    assert result.body.count(b"\r\n") == 1
    assert result.body.endswith(b"\r\n")
    assert b"\n" not in result.body[:-2]


def test_renewed_certificate_renews_again() -> None:
    """A certificate estd issued (chaining to the EST CA) can itself be renewed."""
    pair = device()
    first = enroll(
        settings(),
        EnrollmentRequest(REENROLL, renewal_body(pair), client=identity(pair)),
        NOW,
    ).issued.certificate
    client = ClientIdentity(first, (first, demo_pki().est_ca.certificate))
    body = one_line_base64(fioconfig_csr(first.subject)[1])
    later = NOW + datetime.timedelta(days=1)
    second = enroll(settings(), EnrollmentRequest(REENROLL, body, client=client), later)
    assert second.issued.certificate.subject == pair.certificate.subject
    assert second.requester.client == client


# --- Refusals, in order ------------------------------------------------------


def test_enroll_anonymous_is_401_before_parsing() -> None:
    """An anonymous request is refused with 401 even when its body is garbage."""
    request = EnrollmentRequest(REENROLL, b"!!! not base64 !!!")
    with pytest.raises(Unauthorized) as caught:
        enroll(settings(), request, NOW)
    assert caught.value.status == 401
    assert caught.value.reason == (
        "re-enrollment needs the client certificate being renewed"
    )
    assert caught.value.headers == {}


def test_simpleenroll_anonymous_is_401_before_parsing() -> None:
    """An anonymous simpleenroll with a garbage body gets 401, not 400."""
    with pytest.raises(Unauthorized) as caught:
        enroll(settings(), EnrollmentRequest(ENROLL, b"\x00garbage"), NOW)
    assert caught.value.reason == "a client certificate is required"


def test_enroll_garbage_body_is_400() -> None:
    """An authenticated request with a body that is not a CSR is refused with 400."""
    request = EnrollmentRequest(REENROLL, b"!!!", client=identity(device()))
    with pytest.raises(BadRequest) as caught:
        enroll(settings(), request, NOW)
    assert caught.value.status == 400
    assert caught.value.reason == (
        "the request body is not base64; expected a base64 CSR"
    )


def test_enroll_other_subject_is_403() -> None:
    """Re-enrolling another device's subject is refused with 403."""
    pki = demo_pki()
    request = EnrollmentRequest(
        REENROLL, renewal_body(pki.devices[1]), client=identity(pki.devices[0])
    )
    with pytest.raises(Forbidden) as caught:
        enroll(settings(), request, NOW)
    assert caught.value.reason == SUBJECT_MISMATCH


def test_enroll_checks_csr_signature() -> None:
    """A renewal CSR with a broken signature is refused with 400 before signing."""
    pair = device()
    der = fioconfig_csr(pair.certificate.subject)[1]
    der = der[:-1] + bytes([der[-1] ^ 0x01])
    request = EnrollmentRequest(REENROLL, base64.b64encode(der), client=identity(pair))
    with pytest.raises(BadRequest) as caught:
        enroll(settings(), request, NOW)
    assert caught.value.reason == (
        "the CSR signature does not verify (no proof of possession)"
    )


def test_enroll_subject_any_from_config() -> None:
    """enroll-subject = any in the config lets simpleenroll sign a new subject."""
    subject = user_name("brand-new")
    result = enroll(
        settings(enroll_subject="any"),
        EnrollmentRequest(
            ENROLL,
            one_line_base64(fioconfig_csr(subject)[1]),
            client=identity(device()),
        ),
        NOW,
    )
    assert result.issued.certificate.subject == subject


def test_untrusted_anchor_is_403(tmp_path: Path) -> None:
    """A label whose client-cas leave out the device CA refuses its devices with 403."""
    other_ca = make_pair(
        user_name("other-device-ca"), demo_pki().root, ca=True, now=NOW
    )
    path = tmp_path / "other-ca.pem"
    path.write_bytes(other_ca.cert_pem())
    label = demo_config(client_cas=str(path)).default
    pair = device()
    request = EnrollmentRequest(REENROLL, renewal_body(pair), client=identity(pair))
    with pytest.raises(Forbidden) as caught:
        enroll(label, request, NOW)
    assert caught.value.reason == (
        "the client certificate is not issued by a CA this label trusts"
    )


def test_multi_valued_attribute_enrolls() -> None:
    """A CSR carrying a multi-valued attribute (RFC 2986 allows it) is issued."""
    csr = csr_with_multi_valued_attribute()
    body = base64.b64encode(csr.public_bytes(serialization.Encoding.DER))
    request = EnrollmentRequest(ENROLL, body, client=identity(device()))
    result = enroll(settings(enroll_subject="any"), request, NOW)
    assert result.issued.certificate.subject == csr.subject


# --- csrattrs-enforce --------------------------------------------------------


def test_csrattrs_enforced_names_what_is_missing() -> None:
    """With csrattrs-enforce a CSR lacking the asked-for curve gets 400 saying so."""
    label = settings(csrattrs="ecPublicKey:secp384r1", csrattrs_enforce="yes")
    pair = device()
    request = EnrollmentRequest(REENROLL, renewal_body(pair), client=identity(pair))
    with pytest.raises(BadRequest) as caught:
        enroll(label, request, NOW)
    assert caught.value.status == 400
    assert caught.value.reason == (
        "the CSR lacks what /csrattrs asks for: a key on curve secp384r1"
    )


def test_csrattrs_enforced_lists_everything_missing() -> None:
    """Every unmet csrattrs requirement is named, in the configured order."""
    label = settings(
        csrattrs="challengePassword, ecPublicKey:secp384r1, ecdsa-with-SHA384, "
        "extensionRequest:macAddress",
        csrattrs_enforce="yes",
    )
    pair = device()
    request = EnrollmentRequest(REENROLL, renewal_body(pair), client=identity(pair))
    with pytest.raises(BadRequest) as caught:
        enroll(label, request, NOW)
    assert caught.value.reason == (
        "the CSR lacks what /csrattrs asks for: the challengePassword attribute; "
        "a key on curve secp384r1; signature ecdsa-with-SHA384; "
        "the extension macAddress"
    )


def test_csrattrs_enforced_met_is_issued() -> None:
    """A CSR meeting csrattrs (P-384, SHA-384, challengePassword binding) is issued."""
    label = settings(
        csrattrs="challengePassword, ecPublicKey:secp384r1, ecdsa-with-SHA384",
        csrattrs_enforce="yes",
    )
    pair = device()
    body = csr_body(
        pair.certificate.subject,
        ec.generate_private_key(ec.SECP384R1()),
        challenge_password=base64.b64encode(BINDING),
        algorithm=hashes.SHA384(),
    )
    request = EnrollmentRequest(
        REENROLL, body, client=identity(pair), channel_binding=BINDING
    )
    certificate = enroll(label, request, NOW).issued.certificate
    public_key = certificate.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    assert public_key.curve.name == "secp384r1"


def test_csrattrs_not_enforced_by_default() -> None:
    """Without csrattrs-enforce, csrattrs only advises: a P-256 CSR is issued."""
    label = settings(csrattrs="ecPublicKey:secp384r1")
    assert label.csrattrs_enforce is False
    pair = device()
    request = EnrollmentRequest(REENROLL, renewal_body(pair), client=identity(pair))
    assert enroll(label, request, NOW).issued.certificate.subject == (
        pair.certificate.subject
    )


def test_csrattrs_enforced_after_authorization() -> None:
    """Another device's subject is refused as 403 before csrattrs is checked."""
    label = settings(csrattrs="ecPublicKey:secp384r1", csrattrs_enforce="yes")
    pki = demo_pki()
    request = EnrollmentRequest(
        REENROLL, renewal_body(pki.devices[1]), client=identity(pki.devices[0])
    )
    with pytest.raises(Forbidden) as caught:
        enroll(label, request, NOW)
    assert caught.value.reason == SUBJECT_MISMATCH


# --- serverkeygen ------------------------------------------------------------


def multipart_parts(enrollment: Enrollment) -> list[tuple[str, bytes]]:
    """(type, decoded content) of each part of a /serverkeygen body."""
    assert enrollment.content_type is not None
    message = email.message_from_bytes(
        b"Content-Type: "
        + enrollment.content_type.encode()
        + b"\r\n\r\n"
        + enrollment.body
    )
    assert message.is_multipart()
    parts = []
    for part in message.get_payload():
        assert part["Content-Transfer-Encoding"] == "base64"
        parts.append((part["Content-Type"], part.get_payload(decode=True)))
    return parts


def serverkeygen(
    key_type: str = "csr",
    csr_key: ec.EllipticCurvePrivateKey | None = None,
) -> tuple[Enrollment, x509.CertificateSigningRequest]:
    """A /serverkeygen enrollment of device 0's subject, and the CSR it sent."""
    pair = device()
    body = csr_body(pair.certificate.subject, csr_key)
    request = EnrollmentRequest(ENROLL, body, client=identity(pair), server_keygen=True)
    label = settings(serverkeygen="yes", serverkeygen_key_type=key_type)
    return enroll(label, request, NOW), x509.load_der_x509_csr(decode_body(body))


def test_serverkeygen_multipart_response() -> None:
    """/serverkeygen answers multipart/mixed: a PKCS#8 key, then the certificate."""
    result, _ = serverkeygen()
    assert result.content_type is not None
    assert result.content_type.startswith("multipart/mixed; boundary=estd-")
    parts = multipart_parts(result)
    assert [content_type for content_type, _ in parts] == [
        "application/pkcs8",
        "application/pkcs7-mime; smime-type=certs-only",
    ]
    assert pkcs7.load_der_pkcs7_certificates(parts[1][1]) == [result.issued.certificate]


def test_serverkeygen_certifies_generated_key() -> None:
    """The certificate carries the generated key, not the CSR's, and the CSR subject."""
    result, csr = serverkeygen()
    key_der = multipart_parts(result)[0][1]
    private_key = serialization.load_der_private_key(key_der, None)
    certificate = result.issued.certificate
    assert certificate.public_key() == private_key.public_key()
    assert certificate.public_key() != csr.public_key()
    assert raw_subject_of_certificate(certificate) == raw_subject_of_csr(csr)
    certificate.verify_directly_issued_by(demo_pki().est_ca.certificate)


@pytest.mark.parametrize(
    ("key_type", "csr_curve", "expected_curve"),
    [
        ("csr", ec.SECP256R1(), "secp256r1"),
        ("csr", ec.SECP384R1(), "secp384r1"),
        ("ec-p384", ec.SECP256R1(), "secp384r1"),
        ("ec-p521", ec.SECP256R1(), "secp521r1"),
    ],
)
def test_serverkeygen_key_type_ec(
    key_type: str, csr_curve: ec.EllipticCurve, expected_curve: str
) -> None:
    """serverkeygen-key-type picks the curve; csr copies the CSR key's curve."""
    result, _ = serverkeygen(key_type, ec.generate_private_key(csr_curve))
    private_key = serialization.load_der_private_key(
        multipart_parts(result)[0][1], None
    )
    assert isinstance(private_key, ec.EllipticCurvePrivateKey)
    assert private_key.curve.name == expected_curve
    assert result.issued.certificate.public_key() == private_key.public_key()


def test_serverkeygen_key_type_ed25519() -> None:
    """serverkeygen-key-type = ed25519 makes an Ed25519 key for an EC CSR."""
    result, _ = serverkeygen("ed25519")
    private_key = serialization.load_der_private_key(
        multipart_parts(result)[0][1], None
    )
    assert isinstance(private_key, ed25519.Ed25519PrivateKey)
    assert result.issued.certificate.public_key() == private_key.public_key()


def test_serverkeygen_subject_policy_is_simpleenroll_s() -> None:
    """/serverkeygen for another subject is refused like simpleenroll (403)."""
    body = csr_body(device_name("someone-else"))
    request = EnrollmentRequest(
        ENROLL, body, client=identity(device()), server_keygen=True
    )
    with pytest.raises(Forbidden) as caught:
        enroll(settings(serverkeygen="yes"), request, NOW)
    assert caught.value.reason == SUBJECT_MISMATCH


# --- Proof of possession -----------------------------------------------------


def pop_request(
    challenge_password: bytes | None, channel_binding: bytes | None
) -> EnrollmentRequest:
    """A renewal of device 0 on a connection with ``channel_binding``."""
    pair = device()
    body = csr_body(pair.certificate.subject, challenge_password=challenge_password)
    return EnrollmentRequest(
        REENROLL, body, client=identity(pair), channel_binding=channel_binding
    )


def test_pop_required_and_matching_is_issued() -> None:
    """With require-pop a CSR carrying this connection's binding is issued."""
    request = pop_request(base64.b64encode(BINDING), BINDING)
    result = enroll(settings(require_pop="yes"), request, NOW)
    assert result.requester.channel_binding == BINDING
    assert result.issued.certificate.subject == device().certificate.subject


def test_pop_required_and_absent_is_401() -> None:
    """With require-pop a CSR without challengePassword gets 401."""
    with pytest.raises(Unauthorized) as caught:
        enroll(settings(require_pop="yes"), pop_request(None, BINDING), NOW)
    assert caught.value.status == 401
    assert caught.value.reason == POP_MISMATCH


def test_pop_wrong_binding_is_401_even_when_not_required() -> None:
    """A challengePassword for another connection gets 401 even without require-pop."""
    request = pop_request(base64.b64encode(bytes(32)), BINDING)
    with pytest.raises(Unauthorized) as caught:
        enroll(settings(), request, NOW)
    assert caught.value.reason == POP_MISMATCH


def test_pop_without_channel_binding_is_401() -> None:
    """With require-pop, a connection without a channel binding cannot prove it."""
    request = pop_request(base64.b64encode(BINDING), None)
    with pytest.raises(Unauthorized) as caught:
        enroll(settings(require_pop="yes"), request, NOW)
    assert caught.value.reason == POP_MISMATCH


# --- Re-enrolling an expired certificate -------------------------------------


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


def expired_request(operation: Operation = REENROLL) -> EnrollmentRequest:
    """A renewal by the expired device, let in by TLS as expired."""
    pair = expired_pair()
    return EnrollmentRequest(
        operation, renewal_body(pair), client=identity(pair, expired=True)
    )


def test_expired_within_grace_reenrolls() -> None:
    """With reenroll-grace = 30d a certificate expired 10 days ago is renewed."""
    result = enroll(settings(reenroll_grace="30d"), expired_request(), NOW)
    certificate = result.issued.certificate
    assert certificate.subject == expired_pair().certificate.subject
    assert certificate.not_valid_before_utc == NOW - datetime.timedelta(minutes=1)
    assert result.requester.client is not None
    assert result.requester.client.expired is True


def test_expired_beyond_grace_is_403() -> None:
    """With reenroll-grace = 7d a certificate expired 10 days ago is refused."""
    with pytest.raises(Forbidden) as caught:
        enroll(settings(reenroll_grace="7d"), expired_request(), NOW)
    expired_at = expired_pair().certificate.not_valid_after_utc
    assert caught.value.reason == (
        f"the client certificate expired on {expired_at:%Y-%m-%d}, "
        "beyond this label's re-enrollment grace"
    )


def test_expired_simpleenroll_is_403_before_parsing() -> None:
    """An expired certificate may not simpleenroll; refused before the body is read."""
    pair = expired_pair()
    request = EnrollmentRequest(
        ENROLL, b"!!! garbage", client=identity(pair, expired=True)
    )
    with pytest.raises(Forbidden) as caught:
        enroll(settings(reenroll_grace="30d"), request, NOW)
    assert caught.value.reason.endswith(
        "only simplereenroll accepts an expired certificate"
    )


def test_expired_within_grace_other_subject_is_403() -> None:
    """Within the grace, re-enrollment still keeps the certificate's subject."""
    pair = expired_pair()
    request = EnrollmentRequest(
        REENROLL, renewal_body(device()), client=identity(pair, expired=True)
    )
    with pytest.raises(Forbidden) as caught:
        enroll(settings(reenroll_grace="30d"), request, NOW)
    assert caught.value.reason == SUBJECT_MISMATCH


# --- HTTP Basic --------------------------------------------------------------


@pytest.fixture
def users_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A users file holding dev-1 (bcrypt at the lowest cost, for speed)."""
    monkeypatch.setattr(auth, "BCRYPT_ROUNDS", 4)
    path = tmp_path / "users.htpasswd"
    auth.set_password(str(path), USER, PASSWORD)
    return str(path)


def basic_label(users_file: str, mode: str = "basic") -> LabelConfig:
    """A label with auth = ``mode`` against ``users_file``, realm "factory"."""
    return demo_config(auth=mode, users_file=users_file, realm="factory").default


def test_basic_user_enrolls_without_certificate(users_file: str) -> None:
    """With auth = basic a user enrolls its own common name without a certificate."""
    request = EnrollmentRequest(
        ENROLL, csr_body(user_name(USER)), credentials=(USER, PASSWORD)
    )
    result = enroll(basic_label(users_file), request, NOW)
    assert result.issued.certificate.subject == user_name(USER)
    assert result.requester == Requester(client=None, user=USER)
    assert certificates_of(result) == [result.issued.certificate]


class _AwayLedger:
    """A ledger whose database is away: every write raises LedgerUnavailable."""

    def certificate(self, serial: int) -> None:
        return None

    def record_issuance(self, *args: object, **kwargs: object) -> None:
        raise LedgerUnavailable("database is away")


def test_refusals_after_authentication_carry_the_user(users_file: str) -> None:
    """403 and the ledger's 503 name the authenticated user; a 401 names nobody."""
    label = basic_label(users_file)
    other = EnrollmentRequest(
        ENROLL, csr_body(user_name("someone-else")), credentials=(USER, PASSWORD)
    )
    with pytest.raises(Forbidden) as refused:
        enroll(label, other, NOW)
    assert refused.value.user == USER
    own = EnrollmentRequest(
        ENROLL, csr_body(user_name(USER)), credentials=(USER, PASSWORD)
    )
    with pytest.raises(ServiceUnavailable) as away:
        enroll(label, own, NOW, _AwayLedger())  # type: ignore[arg-type]
    assert (away.value.status, away.value.user) == (503, USER)
    assert away.value.headers == {"Retry-After": "30"}
    wrong = EnrollmentRequest(
        ENROLL, csr_body(user_name(USER)), credentials=(USER, "x")
    )
    with pytest.raises(BadCredentials) as unknown:
        enroll(label, wrong, NOW)
    assert unknown.value.user is None


def test_basic_wrong_password_is_401_before_parsing(users_file: str) -> None:
    """A wrong password gets 401 with the realm's challenge, whatever the body."""
    request = EnrollmentRequest(ENROLL, b"!!! garbage", credentials=(USER, "wrong"))
    with pytest.raises(BadCredentials) as caught:
        enroll(basic_label(users_file), request, NOW)
    assert caught.value.status == 401
    assert caught.value.reason == "wrong user name or password"
    assert caught.value.headers == {"WWW-Authenticate": 'Basic realm="factory"'}


def test_basic_without_credentials_is_401(users_file: str) -> None:
    """With auth = basic and no credentials the client is challenged."""
    request = EnrollmentRequest(ENROLL, csr_body(user_name(USER)))
    with pytest.raises(Unauthorized) as caught:
        enroll(basic_label(users_file), request, NOW)
    assert caught.value.reason == "HTTP Basic credentials are required"
    assert caught.value.headers == {"WWW-Authenticate": 'Basic realm="factory"'}


def test_basic_user_other_common_name_is_403(users_file: str) -> None:
    """A basic-auth user may not enroll another common name."""
    request = EnrollmentRequest(
        ENROLL, csr_body(user_name("dev-2")), credentials=(USER, PASSWORD)
    )
    with pytest.raises(Forbidden) as caught:
        enroll(basic_label(users_file), request, NOW)
    assert caught.value.reason == "CSR common name does not match the user name"


def test_cert_or_basic_requester_is_the_certificate(users_file: str) -> None:
    """With auth = cert-or-basic a device renews with its certificate alone."""
    pair = device()
    request = EnrollmentRequest(REENROLL, renewal_body(pair), client=identity(pair))
    result = enroll(basic_label(users_file, "cert-or-basic"), request, NOW)
    assert result.requester == Requester(client=identity(pair), user=None)


def test_cert_and_basic_requester_carries_both(users_file: str) -> None:
    """With auth = cert-and-basic the requester carries the certificate and user."""
    pair = device()
    request = EnrollmentRequest(
        REENROLL,
        renewal_body(pair),
        client=identity(pair),
        credentials=(USER, PASSWORD),
    )
    result = enroll(basic_label(users_file, "cert-and-basic"), request, NOW)
    assert result.requester == Requester(client=identity(pair), user=USER)
    assert result.issued.certificate.subject == pair.certificate.subject
