"""Unit tests of estd.wire: request bodies in, certs-only PKCS#7 out."""

from __future__ import annotations

import base64
import datetime
import functools

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import NameOID
from pyasn1.codec.der import decoder as der_decoder
from pyasn1_alt_modules import rfc5652

from estd.errors import BadRequest
from estd.wire import (
    PKCS7_CERTS_ONLY,
    PKCS7_MIME,
    PKCS10,
    ResponseProfile,
    certs_only,
    decode_body,
    encode_base64,
    load_csr,
    media_type,
    raw_subject_of_certificate,
    raw_subject_of_csr,
)
from tests.pki import NOW, demo_pki, fioconfig_csr


@functools.cache
def csr_der() -> bytes:
    """One fioconfig-style CSR (DER) shared by the decoding tests."""
    return fioconfig_csr(demo_pki().devices[0].certificate.subject)[1]


def wrap(text: bytes, columns: int, newline: bytes) -> bytes:
    """Split ``text`` into lines of ``columns`` characters joined by ``newline``."""
    return newline.join(text[i : i + columns] for i in range(0, len(text), columns))


def der_of(certificate: x509.Certificate) -> bytes:
    """The DER encoding of a certificate."""
    return certificate.public_bytes(serialization.Encoding.DER)


# --- decode_body: liberal in what we accept ----------------------------------


@pytest.mark.parametrize("columns", [64, 76])
@pytest.mark.parametrize("newline", [b"\n", b"\r\n"], ids=["LF", "CRLF"])
@pytest.mark.parametrize("trailing", [True, False], ids=["trailing", "no-trailing"])
def test_decode_wrapped_base64(columns: int, newline: bytes, trailing: bool) -> None:
    """A base64 CSR wrapped at 64 or 76 columns with LF or CRLF decodes to its DER."""
    der = csr_der()
    body = wrap(base64.b64encode(der), columns, newline)
    if trailing:
        body += newline
    assert newline in body
    assert decode_body(body) == der


@pytest.mark.parametrize("trailing", [b"", b"\n", b"\r\n"])
def test_decode_one_line_base64(trailing: bytes) -> None:
    """A CSR posted as one line of base64 (fioconfig's form) decodes to its DER."""
    der = csr_der()
    assert decode_body(base64.b64encode(der) + trailing) == der


def test_decode_stray_blanks() -> None:
    """Spaces and tabs anywhere in the base64, and blank lines around, are ignored."""
    der = csr_der()
    text = base64.b64encode(der)
    body = b"\n \t" + text[:10] + b" " + text[10:50] + b"\t\t" + text[50:] + b" \r\n\n"
    assert decode_body(body) == der


@pytest.mark.parametrize("length", [30, 31, 32], ids=["no-pad", "pad-2", "pad-1"])
def test_decode_missing_padding(length: int) -> None:
    """Base64 whose '=' padding was dropped decodes to the same bytes as padded."""
    der = bytes(range(0x30, 0x30 + length))
    padded = base64.b64encode(der)
    unpadded = padded.rstrip(b"=")
    assert len(padded) - len(unpadded) == {30: 0, 31: 2, 32: 1}[length]
    assert decode_body(unpadded) == der
    assert decode_body(padded) == der


@pytest.mark.parametrize("label", [b"CERTIFICATE REQUEST", b"NEW CERTIFICATE REQUEST"])
@pytest.mark.parametrize("newline", [b"\n", b"\r\n"], ids=["LF", "CRLF"])
def test_decode_pem_armour(label: bytes, newline: bytes) -> None:
    """A PEM-armoured CSR (either label, LF or CRLF) has its armour stripped."""
    der = csr_der()
    body = (
        b"-----BEGIN " + label + b"-----" + newline
        + wrap(base64.b64encode(der), 64, newline) + newline
        + b"-----END " + label + b"-----" + newline
    )  # fmt: skip
    assert decode_body(body) == der


def test_decode_pem_after_text() -> None:
    """A PEM block preceded by `openssl req -text` output is still found."""
    der = csr_der()
    pem = x509.load_der_x509_csr(der).public_bytes(serialization.Encoding.PEM)
    body = b"Certificate Request:\n    Data:\n        Version: 1 (0x0)\n" + pem
    assert decode_body(body) == der


def test_decode_raw_der() -> None:
    """A body that is the DER CSR itself is returned unchanged."""
    der = csr_der()
    assert decode_body(der) == der


@pytest.mark.parametrize(
    "body", [b"", b"\r\n", b" \t \n"], ids=["empty", "CRLF", "blanks"]
)
def test_decode_empty_body(body: bytes) -> None:
    """An empty or blank body is a 400 saying the body is empty."""
    with pytest.raises(BadRequest) as caught:
        decode_body(body)
    assert caught.value.status == 400
    assert caught.value.reason == "the request body is empty; expected a base64 CSR"


@pytest.mark.parametrize(
    "body",
    [b"hello, world!", b"MIIB=CDE", b"MIIBx", b"MIIB\x00CDEF", "Zürich".encode()],
    ids=["punctuation", "inner-padding", "one-extra-char", "nul", "non-ascii"],
)
def test_decode_garbage(body: bytes) -> None:
    """A body that is not base64 is a 400 saying it is not base64."""
    with pytest.raises(BadRequest) as caught:
        decode_body(body)
    assert caught.value.status == 400
    assert (
        caught.value.reason == "the request body is not base64; expected a base64 CSR"
    )


def test_decode_garbage_names_what() -> None:
    """The error message names the object the caller expected."""
    with pytest.raises(BadRequest) as caught:
        decode_body(b"not base64!", what="certificate")
    assert caught.value.reason == (
        "the request body is not base64; expected a base64 certificate"
    )


# --- load_csr ----------------------------------------------------------------


def test_load_csr_round_trip() -> None:
    """A base64 CSR body loads into the same CSR."""
    der = csr_der()
    csr = load_csr(base64.b64encode(der))
    assert csr.public_bytes(serialization.Encoding.DER) == der


def test_load_csr_refuses_a_certificate() -> None:
    """Valid base64 of something other than a CSR (a certificate) is a 400."""
    body = base64.b64encode(der_of(demo_pki().devices[0].certificate))
    with pytest.raises(BadRequest) as caught:
        load_csr(body)
    assert caught.value.status == 400
    assert (
        caught.value.reason == "the request body is not a PKCS#10 certificate request"
    )


def test_load_csr_refuses_truncated_csr() -> None:
    """A CSR cut short in transit is a 400, not a server error."""
    body = base64.b64encode(csr_der()[:-10])
    with pytest.raises(BadRequest) as caught:
        load_csr(body)
    assert (
        caught.value.reason == "the request body is not a PKCS#10 certificate request"
    )


# --- encode_base64: exact in what we send ------------------------------------


def test_encode_64_exactly_one_line() -> None:
    """48 bytes make exactly one 64-column line followed by a single CRLF."""
    assert encode_base64(b"\x00" * 48, 64) == b"A" * 64 + b"\r\n"


def test_encode_64_two_full_lines() -> None:
    """96 bytes make two 64-column lines, each ending in CRLF, and no empty line."""
    assert encode_base64(b"\x00" * 96, 64) == b"A" * 64 + b"\r\n" + b"A" * 64 + b"\r\n"


def test_encode_64_short_last_line() -> None:
    """A payload not filling its last line ends in a short padded line and CRLF."""
    assert encode_base64(b"\x00" * 49, 64) == b"A" * 64 + b"\r\nAA==\r\n"


def test_encode_64_real_payload() -> None:
    """Every line of a 64-column payload but the last has 64 characters, CRLF-joined."""
    der = bytes(range(256)) * 3 + b"\x01"
    body = encode_base64(der, 64)
    assert body.endswith(b"\r\n")
    assert not body.endswith(b"\r\n\r\n")
    lines = body[:-2].split(b"\r\n")
    assert [len(line) for line in lines] == [64] * 16 + [4]
    assert b"".join(lines) == base64.b64encode(der)
    assert b"\n" not in body.replace(b"\r\n", b"")


def test_encode_76_matches_mime() -> None:
    """76 columns gives the MIME line layout (base64.encodebytes) with CRLF."""
    der = bytes(range(256)) * 3
    expected = base64.encodebytes(der).replace(b"\n", b"\r\n")
    assert encode_base64(der, 76) == expected


def test_encode_zero_is_one_line() -> None:
    """Line length 0 gives the whole payload on one line plus one CRLF."""
    der = bytes(range(256)) * 3
    assert encode_base64(der, 0) == base64.b64encode(der) + b"\r\n"


def test_encode_decodes_back() -> None:
    """What estd sends decodes back to the same DER with estd's own decoder."""
    der = csr_der()
    for line_length in (0, 64, 76):
        assert decode_body(encode_base64(der, line_length)) == der


# --- certs_only --------------------------------------------------------------


def test_certs_only_holds_exactly_the_given_certificates() -> None:
    """A certs-only PKCS#7 parses back to exactly the certificates given, each once."""
    pki = demo_pki()
    given = [pki.devices[0].certificate, pki.est_ca.certificate, pki.root.certificate]
    parsed = pkcs7.load_der_pkcs7_certificates(certs_only(given))
    assert sorted(map(der_of, parsed)) == sorted(map(der_of, given))
    assert len(parsed) == 3


def test_certs_only_order_is_der_set_order() -> None:
    """The certificates come out in DER SET OF order, whatever order they went in.

    SignedData.certificates is a SET OF (RFC 5652 §5.1), so a DER encoder
    sorts it by encoding; callers must not rely on the order they pass.
    """
    pki = demo_pki()
    given = [pki.devices[0].certificate, pki.est_ca.certificate, pki.root.certificate]
    expected = sorted(given, key=der_of)
    assert pkcs7.load_der_pkcs7_certificates(certs_only(given)) == expected
    reverse = list(reversed(given))
    assert pkcs7.load_der_pkcs7_certificates(certs_only(reverse)) == expected


def test_certs_only_one_certificate() -> None:
    """An enrollment response holds exactly the one issued certificate."""
    certificate = demo_pki().devices[1].certificate
    assert pkcs7.load_der_pkcs7_certificates(certs_only([certificate])) == [certificate]


def test_certs_only_is_degenerate_signed_data() -> None:
    """The PKCS#7 is a ContentInfo of SignedData with no signers and no content."""
    pki = demo_pki()
    message = certs_only([pki.est_ca.certificate, pki.root.certificate])
    info, rest = der_decoder.decode(message, asn1Spec=rfc5652.ContentInfo())
    assert rest == b""
    assert info["contentType"] == rfc5652.id_signedData
    signed, rest = der_decoder.decode(info["content"], asn1Spec=rfc5652.SignedData())
    assert rest == b""
    assert len(signed["signerInfos"]) == 0
    assert signed["encapContentInfo"]["eContentType"] == rfc5652.id_data
    assert not signed["encapContentInfo"]["eContent"].isValue
    assert len(signed["certificates"]) == 2


# --- Response profiles and media types ---------------------------------------


def test_fioconfig_profile() -> None:
    """The fioconfig profile answers 201 with exactly application/pkcs7-mime."""
    profile = ResponseProfile("fioconfig")
    assert profile is ResponseProfile.FIOCONFIG
    assert profile.enroll_status == 201
    assert profile.enroll_content_type == "application/pkcs7-mime"


def test_rfc7030_profile() -> None:
    """The rfc7030 profile answers 200 with the certs-only smime-type, with a space."""
    profile = ResponseProfile("rfc7030")
    assert profile is ResponseProfile.RFC7030
    assert profile.enroll_status == 200
    assert (
        profile.enroll_content_type == "application/pkcs7-mime; smime-type=certs-only"
    )


def test_media_type_constants() -> None:
    """The media type constants are the exact strings clients compare against."""
    assert PKCS7_MIME == "application/pkcs7-mime"
    assert PKCS7_CERTS_ONLY == "application/pkcs7-mime; smime-type=certs-only"
    assert PKCS10 == "application/pkcs10"


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("application/pkcs10", "application/pkcs10"),
        ("Application/PKCS10", "application/pkcs10"),
        ("application/pkcs10; charset=utf-8", "application/pkcs10"),
        (" APPLICATION/pkcs10 ;name=csr.p10", "application/pkcs10"),
        (b"application/PKCS10; charset=latin-1", "application/pkcs10"),
        ("text/plain", "text/plain"),
        ("", ""),
        (None, ""),
    ],
)
def test_media_type(header: str | bytes | None, expected: str) -> None:
    """The media type is matched case-insensitively with parameters ignored."""
    assert media_type(header) == expected


# --- Raw subjects ------------------------------------------------------------


def test_raw_subject_of_csr_simple_name() -> None:
    """A CSR's raw subject is the DER of its Name."""
    subject = demo_pki().devices[0].certificate.subject
    csr = x509.load_der_x509_csr(fioconfig_csr(subject)[1])
    assert raw_subject_of_csr(csr) == subject.public_bytes()


def test_raw_subject_of_certificate_is_subject_not_issuer() -> None:
    """A certificate's raw subject is its subject's DER, not its issuer's."""
    certificate = demo_pki().devices[0].certificate
    assert raw_subject_of_certificate(certificate) == certificate.subject.public_bytes()
    assert raw_subject_of_certificate(certificate) != certificate.issuer.public_bytes()


def test_raw_subject_of_self_signed_root() -> None:
    """A root certificate's raw subject is the DER of its Name."""
    root = demo_pki().root.certificate
    assert raw_subject_of_certificate(root) == root.subject.public_bytes()


def der_tlv(tag: int, contents: bytes) -> bytes:
    """One DER element (definite length, short or long form)."""
    length = len(contents)
    if length < 0x80:
        return bytes([tag, length]) + contents
    size = (length.bit_length() + 7) // 8
    return bytes([tag, 0x80 | size]) + length.to_bytes(size, "big") + contents


def test_raw_subject_of_v1_certificate() -> None:
    """A v1 certificate (no version field, as some old PKIs issue) gives its subject."""
    pki = demo_pki()
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "v1-device")])
    v3 = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(pki.root.certificate.subject)
        .public_key(key.public_key())
        .serial_number(12345)
        .not_valid_before(NOW)
        .not_valid_after(NOW + datetime.timedelta(days=1))
        .sign(pki.root.key, hashes.SHA256())
    )
    version = bytes.fromhex("a003020102")
    tbs = v3.tbs_certificate_bytes
    # Skip the TBSCertificate's tag and length to reach its first field.
    start = 2 if tbs[1] < 0x80 else 2 + (tbs[1] & 0x7F)
    assert tbs[start : start + 5] == version
    v1_tbs = der_tlv(0x30, tbs[start + 5 :])
    signature = pki.root.key.sign(v1_tbs, ec.ECDSA(hashes.SHA256()))
    algorithm = bytes.fromhex("300a06082a8648ce3d040302")
    v1 = x509.load_der_x509_certificate(
        der_tlv(0x30, v1_tbs + algorithm + der_tlv(0x03, b"\x00" + signature))
    )
    assert v1.version is x509.Version.v1
    assert raw_subject_of_certificate(v1) == subject.public_bytes()
    v1.verify_directly_issued_by(pki.root.certificate)


def test_raw_subject_printable_string() -> None:
    """A PrintableString subject keeps its exact bytes (tag 0x13) in a CSR."""
    subject = x509.Name(
        [
            x509.NameAttribute(
                NameOID.COMMON_NAME, "dev", _type=_ASN1Type.PrintableString
            )
        ]
    )
    csr = x509.load_der_x509_csr(fioconfig_csr(subject)[1])
    expected = bytes.fromhex("300e310c300a06035504031303646576")
    assert raw_subject_of_csr(csr) == expected
    utf8 = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dev")])
    assert utf8.public_bytes() == bytes.fromhex("300e310c300a06035504030c03646576")


def test_raw_subject_empty() -> None:
    """An empty subject is the two bytes of an empty SEQUENCE."""
    csr = x509.load_der_x509_csr(fioconfig_csr(x509.Name([]))[1])
    assert raw_subject_of_csr(csr) == b"\x30\x00"


def test_raw_subject_long_form_length() -> None:
    """A subject over 255 bytes (two-byte DER length) is read whole."""
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, "c" * 64),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "u" * 64),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "o" * 64),
            x509.NameAttribute(NameOID.LOCALITY_NAME, "l" * 64),
        ]
    )
    expected = subject.public_bytes()
    assert expected[:2] == b"\x30\x82"
    csr = x509.load_der_x509_csr(fioconfig_csr(subject)[1])
    assert raw_subject_of_csr(csr) == expected
