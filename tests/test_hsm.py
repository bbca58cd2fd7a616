"""The EST CA key in a PKCS#11 token: URIs, signing, est.ini, hsm-import.

The signing tests run against a private SoftHSM2 (tests/softhsm_support.py)
and compare every certificate and CRL with what the same key signs from a
file: the TBS bytes must be identical and the signature must verify with
the CA certificate.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import pkcs11
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.oid import SignatureAlgorithmOID

from estd import hsm
from estd.admin import CommandError
from estd.ca import CAPrivateKey, CertificateAuthority, SignerPublicKey
from estd.config import Config, load_config
from estd.errors import ConfigError
from estd.hsm import HsmError, Pkcs11Signer, Pkcs11Uri, WrongPin, import_key
from estd.wire import raw_subject_of_certificate, raw_subject_of_csr
from tests.pki import NOW, demo_pki, write_pki
from tests.test_ca import (
    DURATION,
    KEY_USAGE_DIGITAL_SIGNATURE_DER,
    ca_key,
    csr_for,
    make_ca_certificate,
)

if TYPE_CHECKING:
    from tests.softhsm_support import SoftHsm

pytest_plugins = ["tests.softhsm_support"]

KINDS = ["P-256", "P-384", "P-521", "RSA"]
ALGORITHMS = {
    "P-256": SignatureAlgorithmOID.ECDSA_WITH_SHA256,
    "P-384": SignatureAlgorithmOID.ECDSA_WITH_SHA384,
    "P-521": SignatureAlgorithmOID.ECDSA_WITH_SHA512,
    "RSA": SignatureAlgorithmOID.RSA_WITH_SHA256,
}
SUBJECT = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "hsm-device")])
REVOKED = [(0x1234, NOW - datetime.timedelta(days=1), "keyCompromise")]


# --- Helpers -----------------------------------------------------------------


class KeySigner:
    """A :class:`estd.ca.Signer` over a cryptography key, to test the CA alone."""

    def __init__(self, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> None:
        self.key = key
        self.calls = 0

    def public_key(self) -> SignerPublicKey:
        """The key's public half."""
        return self.key.public_key()

    def sign(self, data: bytes, hash_algorithm: hashes.HashAlgorithm) -> bytes:
        """Sign as X.509 wants it (ECDSA DER, PKCS#1 v1.5)."""
        self.calls += 1
        if isinstance(self.key, ec.EllipticCurvePrivateKey):
            return self.key.sign(data, ec.ECDSA(hash_algorithm))
        return self.key.sign(data, padding.PKCS1v15(), hash_algorithm)


class CorruptSigner(KeySigner):
    """A signer whose signatures do not verify (a token fault)."""

    def sign(self, data: bytes, hash_algorithm: hashes.HashAlgorithm) -> bytes:
        """A signature over other bytes."""
        return super().sign(data + b"!", hash_algorithm)


_token_uris: dict[str, str] = {}


def token_uri(softhsm: SoftHsm, kind: str) -> str:
    """The URI of ``ca_key(kind)`` in the token, imported once per session."""
    if kind not in _token_uris:
        _token_uris[kind] = softhsm.import_key(ca_key(kind), kind.lower())
    return _token_uris[kind]


def authorities(
    softhsm: SoftHsm, kind: str
) -> tuple[CertificateAuthority, CertificateAuthority]:
    """The CA of ``kind`` with its key in the token, and with the key in memory."""
    key = ca_key(kind)
    certificate = make_ca_certificate(key)
    signer = Pkcs11Signer.open(softhsm.module, token_uri(softhsm, kind), softhsm.pin)
    return CertificateAuthority(certificate, signer), CertificateAuthority(
        certificate, key
    )


def token_session(softhsm: SoftHsm, rw: bool = False) -> pkcs11.Session:
    """A session on the test token (the process is logged in already)."""
    # The module is loaded already: by its real path, as estd.hsm loads it.
    lib = pkcs11.lib(os.path.realpath(softhsm.module))
    return lib.get_token(token_label=softhsm.token).open(rw=rw)


def destroy_objects(softhsm: SoftHsm, label: str, kind: pkcs11.ObjectClass) -> None:
    """Delete the token objects of one class with ``label``."""
    with token_session(softhsm, rw=True) as session:
        for found in list(
            session.get_objects(
                {pkcs11.Attribute.LABEL: label, pkcs11.Attribute.CLASS: kind}
            )
        ):
            found.destroy()


def object_label(uri: str) -> str:
    """The object= of a URI."""
    label = Pkcs11Uri.parse(uri).object_label
    assert label is not None
    return label


# --- RFC 7512 URIs -----------------------------------------------------------


def test_uri_attributes_are_percent_decoded() -> None:
    """token, object and id are percent-decoded; id is bytes."""
    uri = Pkcs11Uri.parse(
        "pkcs11:token=EST%20CA%3Bone;object=est-ca;id=%01%FF;type=private"
    )
    assert uri.token == "EST CA;one"
    assert uri.object_label == "est-ca"
    assert uri.object_id == b"\x01\xff"
    assert uri.key_description == "private key 'est-ca' id 01ff"


def test_uri_prints_and_parses_back() -> None:
    """A URI estd prints (hsm-import's) parses back to the same key selection."""
    uri = Pkcs11Uri(token="my token", serial="42", object_label="é/ca", object_id=b"\0")
    text = str(uri)
    assert text == (
        "pkcs11:token=my%20token;serial=42;object=%C3%A9%2Fca;id=%00;type=private"
    )
    assert Pkcs11Uri.parse(text) == uri


def test_uri_refuses_pin_value() -> None:
    """A PIN in the URI is refused with a pointer to pkcs11-pin-file, unquoted."""
    with pytest.raises(HsmError) as caught:
        Pkcs11Uri.parse("pkcs11:token=estd;object=est-ca?pin-value=31337")
    assert "pkcs11-pin-file" in str(caught.value)
    assert "31337" not in str(caught.value)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("pkcs11:token=estd", "names no key"),
        ("pkcs11:object=a;object=b", "gives object twice"),
        ("pkcs11:object=a;pin=1234", "'pin' is not one estd uses"),
        ("pkcs11:object=a%2", "% not followed by two hex digits"),
        ("pkcs11:object=a;type=cert", "type must be private"),
        ("pkcs11:object=%FF", "object is not UTF-8"),
        ("pkcs11:object", "lacks '='"),
        ("pkcs11:object=a?module-path=/usr/lib", "query (module-path)"),
        ("est-ca.key", "starts with pkcs11:"),
    ],
)
def test_uri_refusals(text: str, problem: str) -> None:
    """URIs that would not pick exactly the intended key are refused, clearly."""
    with pytest.raises(HsmError) as caught:
        Pkcs11Uri.parse(text)
    assert problem in str(caught.value)
    assert "1234" not in str(caught.value)


# --- The CA with a signer (no token needed) ----------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_signer_certificate_is_the_file_key_certificate(kind: str) -> None:
    """Through a signer, the CA signs the very TBS bytes it signs with the key."""
    key = ca_key(kind)
    assert isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey)
    certificate = make_ca_certificate(key)
    signer = KeySigner(key)
    via_signer = CertificateAuthority(certificate, signer)
    direct = CertificateAuthority(certificate, key)
    csr = csr_for(SUBJECT)
    signed = via_signer.issue(csr, NOW, DURATION, serial=7).certificate
    expected = direct.issue(csr, NOW, DURATION, serial=7).certificate
    assert signer.calls == 1
    assert signed.tbs_certificate_bytes == expected.tbs_certificate_bytes
    assert signed.signature_algorithm_oid == ALGORITHMS[kind]
    signed.verify_directly_issued_by(certificate)


def test_corrupt_signature_is_never_returned() -> None:
    """A signer whose signature does not verify makes issue() and sign_crl() fail."""
    key = ca_key("P-256")
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    ca = CertificateAuthority(make_ca_certificate(key), CorruptSigner(key))
    with pytest.raises(ValueError, match="signature on the certificate"):
        ca.issue(csr_for(SUBJECT), NOW, DURATION)
    with pytest.raises(ValueError, match="signature on the CRL"):
        ca.sign_crl(REVOKED, NOW, NOW + datetime.timedelta(days=1), 1)


def test_signer_must_match_ca_certificate() -> None:
    """A signer whose public key is not the CA certificate's is refused."""
    key = ca_key("P-256")
    other = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(ValueError, match="does not belong to the CA certificate"):
        CertificateAuthority(make_ca_certificate(key), KeySigner(other))


# --- Signing in the token ----------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_token_certificate(softhsm: SoftHsm, kind: str) -> None:
    """A certificate signed in the token verifies and has the file-key bytes."""
    in_token, in_memory = authorities(softhsm, kind)
    csr = csr_for(SUBJECT)
    now = NOW + datetime.timedelta(seconds=30)
    certificate = in_token.issue(csr, now, DURATION, serial=0xABCDEF).certificate
    expected = in_memory.issue(csr, now, DURATION, serial=0xABCDEF).certificate
    certificate.verify_directly_issued_by(in_token.certificate)
    assert certificate.tbs_certificate_bytes == expected.tbs_certificate_bytes
    assert certificate.signature_algorithm_oid == ALGORITHMS[kind]
    assert raw_subject_of_certificate(certificate) == raw_subject_of_csr(csr)
    usage = certificate.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical is True
    assert usage.value.public_bytes() == KEY_USAGE_DIGITAL_SIGNATURE_DER
    assert certificate.serial_number == 0xABCDEF
    assert certificate.not_valid_before_utc == NOW - datetime.timedelta(seconds=30)
    assert certificate.not_valid_after_utc == now + DURATION


@pytest.mark.parametrize("kind", KINDS)
def test_token_crl(softhsm: SoftHsm, kind: str) -> None:
    """A CRL signed in the token is valid under the CA key and lists the serials."""
    in_token, in_memory = authorities(softhsm, kind)
    next_update = NOW + datetime.timedelta(days=1)
    crl = x509.load_der_x509_crl(in_token.sign_crl(REVOKED, NOW, next_update, 9))
    expected = x509.load_der_x509_crl(in_memory.sign_crl(REVOKED, NOW, next_update, 9))
    assert crl.is_signature_valid(ca_key(kind).public_key())
    assert crl.tbs_certlist_bytes == expected.tbs_certlist_bytes
    assert crl.signature_algorithm_oid == ALGORITHMS[kind]
    revoked = crl.get_revoked_certificate_by_serial_number(0x1234)
    assert revoked is not None


@pytest.mark.parametrize(
    ("kind", "key_type", "curve"),
    [
        ("P-256", "ec-p256", "secp256r1"),
        ("P-384", "ec-p384", "secp384r1"),
        ("P-521", "ec-p521", "secp521r1"),
        ("RSA", "rsa-2048", None),
    ],
)
def test_signer_key_type(
    softhsm: SoftHsm, kind: str, key_type: str, curve: str | None
) -> None:
    """The signer reports the key type and curve of the token key."""
    signer = Pkcs11Signer.open(softhsm.module, token_uri(softhsm, kind), softhsm.pin)
    assert signer.key_type == key_type
    assert (signer.curve.name if signer.curve else None) == curve
    assert signer.public_key() == ca_key(kind).public_key()


def test_concurrent_issuance(softhsm: SoftHsm) -> None:
    """8 threads issuing 25 certificates each through one token CA all succeed."""
    in_token, _ = authorities(softhsm, "P-256")
    csr = csr_for(SUBJECT)
    start = threading.Barrier(8)

    def issue_many() -> list[x509.Certificate]:
        start.wait()
        return [in_token.issue(csr, NOW, DURATION).certificate for _ in range(25)]

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        batches = [pool.submit(issue_many) for _ in range(8)]
        certificates = [c for batch in batches for c in batch.result()]
    assert len(certificates) == 200
    for certificate in certificates:
        certificate.verify_directly_issued_by(in_token.certificate)
    assert len({c.serial_number for c in certificates}) == 200


def test_signing_in_a_forked_child(softhsm: SoftHsm) -> None:
    """After a fork (twistd going to the background), the child logs in anew."""
    in_token, _ = authorities(softhsm, "P-256")
    signer = Pkcs11Signer.open(softhsm.module, token_uri(softhsm, "P-256"), softhsm.pin)
    token = signer._token
    parent_login = token._login
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        try:
            issued = in_token.issue(csr_for(SUBJECT), NOW, DURATION).certificate
            issued.verify_directly_issued_by(in_token.certificate)
            fresh = token._login is not parent_login and token._pid == os.getpid()
            os.write(write_end, b"ok" if fresh else b"not logged in anew")
        except BaseException as error:
            os.write(write_end, repr(error).encode()[:1000])
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as report:
        assert report.read() == b"ok"
    os.waitpid(pid, 0)
    assert token._login is parent_login
    issued = in_token.issue(csr_for(SUBJECT), NOW, DURATION).certificate
    issued.verify_directly_issued_by(in_token.certificate)


def test_public_key_from_certificate(softhsm: SoftHsm) -> None:
    """Without a public key object in the token, the certificate's key is used."""
    key = ec.generate_private_key(ec.SECP384R1())
    uri = softhsm.import_key(key, "private-only")
    destroy_objects(softhsm, object_label(uri), pkcs11.ObjectClass.PUBLIC_KEY)
    with pytest.raises(HsmError, match="has no public key for the private key"):
        Pkcs11Signer.open(softhsm.module, uri, softhsm.pin)
    certificate = make_ca_certificate(key)
    signer = Pkcs11Signer.open(softhsm.module, uri, softhsm.pin, certificate)
    issued = CertificateAuthority(certificate, signer).issue(
        csr_for(SUBJECT), NOW, DURATION
    )
    issued.certificate.verify_directly_issued_by(certificate)


def test_token_key_not_of_the_certificate(softhsm: SoftHsm) -> None:
    """A token key without public object and a foreign certificate are refused."""
    uri = softhsm.import_key(ec.generate_private_key(ec.SECP256R1()), "foreign")
    destroy_objects(softhsm, object_label(uri), pkcs11.ObjectClass.PUBLIC_KEY)
    other = make_ca_certificate(ca_key("P-256"))
    with pytest.raises(HsmError) as caught:
        Pkcs11Signer.open(softhsm.module, uri, softhsm.pin, other)
    assert str(caught.value) == (
        f"the private key {object_label(uri)!r} in token 'estd' does not belong "
        "to the CA certificate"
    )


def test_key_removed_from_token(softhsm: SoftHsm) -> None:
    """A key deleted under a running CA makes issuance fail with a clear error."""
    key = ec.generate_private_key(ec.SECP256R1())
    uri = softhsm.import_key(key, "doomed")
    certificate = make_ca_certificate(key)
    ca = CertificateAuthority(
        certificate, Pkcs11Signer.open(softhsm.module, uri, softhsm.pin)
    )
    ca.issue(csr_for(SUBJECT), NOW, DURATION)
    destroy_objects(softhsm, object_label(uri), pkcs11.ObjectClass.PRIVATE_KEY)
    with pytest.raises(HsmError, match="did not sign"):
        ca.issue(csr_for(SUBJECT), NOW, DURATION)
    with pytest.raises(HsmError, match="has no private key"):
        ca.issue(csr_for(SUBJECT), NOW, DURATION)


def test_open_errors(softhsm: SoftHsm, tmp_path: Path) -> None:
    """A missing module, token or key each gives a one-line HsmError."""
    uri = token_uri(softhsm, "P-256")
    with pytest.raises(hsm.ModuleError) as caught:
        Pkcs11Signer.open(str(tmp_path / "libnone.so"), uri, softhsm.pin)
    assert str(caught.value) == (
        f"the PKCS#11 module {tmp_path / 'libnone.so'} does not exist"
    )
    not_a_library = tmp_path / "libbroken.so"
    not_a_library.write_text("not ELF\n")
    with pytest.raises(hsm.ModuleError, match="cannot load the PKCS#11 module"):
        Pkcs11Signer.open(str(not_a_library), uri, softhsm.pin)
    with pytest.raises(HsmError) as caught:
        Pkcs11Signer.open(softhsm.module, "pkcs11:token=nope;object=x", softhsm.pin)
    assert str(caught.value) == (
        f"no token 'nope' in {softhsm.module} (tokens: 'estd', 'estd-fresh')"
    )
    with pytest.raises(HsmError) as caught:
        Pkcs11Signer.open(softhsm.module, "pkcs11:token=estd;object=x", softhsm.pin)
    assert str(caught.value) == "token 'estd' has no private key 'x'"


def test_wrong_pin(softhsm: SoftHsm) -> None:
    """A wrong PIN is WrongPin, from the token and after an earlier login alike."""
    fresh = f"pkcs11:token={softhsm.fresh_token};object=x"
    with pytest.raises(WrongPin) as caught:
        Pkcs11Signer.open(softhsm.module, fresh, "0000-wrong")
    assert (
        str(caught.value)
        == f"the PKCS#11 PIN of token {softhsm.fresh_token!r} is wrong"
    )
    token_uri(softhsm, "P-256")  # the process is logged in to 'estd' now
    with pytest.raises(WrongPin) as caught:
        Pkcs11Signer.open(softhsm.module, token_uri(softhsm, "P-256"), "0000-wrong")
    assert "PIN of token 'estd' is wrong" in str(caught.value)
    assert "0000" not in str(caught.value)


# --- est.ini -----------------------------------------------------------------

_demo_uri: list[str] = []


def demo_token_uri(softhsm: SoftHsm) -> str:
    """The demo EST CA's key in the token, imported once per session."""
    if not _demo_uri:
        _demo_uri.append(softhsm.import_key(demo_pki().est_ca.key, "demo-est-ca"))
    return _demo_uri[0]


def token_ini(softhsm: SoftHsm, directory: Path, **changes: str | None) -> Path:
    """The demo est.ini with ca-key in the token; ``changes`` set or drop keys."""
    ini = Path(write_pki(str(directory), demo_pki()))
    (directory / "est-ca.key").unlink()
    softhsm.pin_file(directory)
    settings: dict[str, str | None] = {
        "ca-key": demo_token_uri(softhsm),
        "pkcs11-module": softhsm.module,
        "pkcs11-pin-file": "pin.txt",
    }
    settings.update({name.replace("_", "-"): value for name, value in changes.items()})
    lines = [
        line
        for line in ini.read_text().splitlines()
        if line.partition(" =")[0] not in settings
    ]
    lines += [f"{name} = {value}" for name, value in settings.items() if value]
    ini.write_text("\n".join(lines) + "\n")
    return ini


def load(ini: Path) -> Config:
    """Load est.ini at NOW."""
    return load_config(str(ini), {}, NOW)


def config_error(ini: Path) -> ConfigError:
    """The ConfigError loading ``ini`` raises."""
    with pytest.raises(ConfigError) as caught:
        load(ini)
    return caught.value


def test_config_with_token_key(softhsm: SoftHsm, tmp_path: Path) -> None:
    """ca-key = pkcs11:... loads, and the CA signs in the token."""
    ini = token_ini(softhsm, tmp_path)
    with ini.open("a") as handle:
        handle.write("[label fleet]\nresponse-profile = rfc7030\n")
    config = load(ini)
    ca = config.default.ca
    assert config.labels["fleet"].ca is ca
    issued = ca.issue(csr_for(SUBJECT), NOW, DURATION).certificate
    issued.verify_directly_issued_by(demo_pki().est_ca.certificate)


def test_config_wrong_pin(softhsm: SoftHsm, tmp_path: Path) -> None:
    """A wrong PIN fails load_config naming ca-key and the PIN file, not the PIN."""
    ini = token_ini(softhsm, tmp_path)
    softhsm.pin_file(tmp_path, "1111-wrong")
    error = config_error(ini)
    assert error.key == "ca-key"
    assert str(error) == (
        f"{ini}: ca-key: the PKCS#11 PIN of token 'estd' is wrong (not the one "
        "estd logged in with; a changed PIN takes effect at restart) "
        f"(pkcs11-pin-file {tmp_path / 'pin.txt'})"
    )
    assert "1111" not in str(error)


def test_config_wrong_pin_fresh_token(softhsm: SoftHsm, tmp_path: Path) -> None:
    """A PIN the token itself refuses gives the plain wrong-PIN message."""
    ini = token_ini(
        softhsm, tmp_path, ca_key=f"pkcs11:token={softhsm.fresh_token};object=est-ca"
    )
    softhsm.pin_file(tmp_path, "2222-wrong")
    assert str(config_error(ini)) == (
        f"{ini}: ca-key: the PKCS#11 PIN of token 'estd-fresh' is wrong "
        f"(pkcs11-pin-file {tmp_path / 'pin.txt'})"
    )


@pytest.mark.parametrize(
    ("changes", "key", "problem"),
    [
        (
            {"pkcs11_module": None},
            "pkcs11-module",
            "is required when ca-key is a pkcs11: URI",
        ),
        (
            {"pkcs11_pin_file": None},
            "pkcs11-pin-file",
            "is required when ca-key is a pkcs11: URI",
        ),
        (
            {"pkcs11_module": "libnone.so"},
            "pkcs11-module",
            "the PKCS#11 module {dir}/libnone.so does not exist",
        ),
        (
            {"ca_key": "pkcs11:token=nope;object=est-ca"},
            "ca-key",
            "no token 'nope' in {module} (tokens: 'estd', 'estd-fresh')",
        ),
        (
            {"ca_key": "pkcs11:token=estd;object=nope"},
            "ca-key",
            "token 'estd' has no private key 'nope'",
        ),
        (
            {"ca_key": "pkcs11:token=estd;object=est-ca?pin-value=4711-user"},
            "ca-key",
            "the URI holds a PIN (pin-value); estd refuses PINs in est.ini: "
            "put the PIN in pkcs11-pin-file",
        ),
    ],
    ids=[
        "module-missing",
        "pin-file-missing",
        "module-not-found",
        "unknown-token",
        "unknown-object",
        "pin-value",
    ],
)
def test_config_errors(
    softhsm: SoftHsm,
    tmp_path: Path,
    changes: dict[str, str | None],
    key: str,
    problem: str,
) -> None:
    """Each token problem fails load_config naming the key and the file."""
    ini = token_ini(softhsm, tmp_path, **changes)
    error = config_error(ini)
    assert error.key == key
    assert error.source == str(ini)
    assert error.problem == problem.format(dir=tmp_path, module=softhsm.module)


def test_config_empty_pin_file(softhsm: SoftHsm, tmp_path: Path) -> None:
    """An empty PIN file is named as such."""
    ini = token_ini(softhsm, tmp_path)
    (tmp_path / "pin.txt").write_text("\n")
    error = config_error(ini)
    assert error.key == "pkcs11-pin-file"
    assert error.problem == (
        f"{tmp_path / 'pin.txt'}: the PIN file is empty; its first line is the user PIN"
    )


def test_config_token_key_not_of_ca_cert(softhsm: SoftHsm, tmp_path: Path) -> None:
    """A token key that is not ca-cert's key fails load_config on ca-key."""
    ini = token_ini(softhsm, tmp_path, ca_key=token_uri(softhsm, "P-256"))
    error = config_error(ini)
    assert error.key == "ca-key"
    assert error.problem == (
        "the private key does not belong to the CA certificate "
        f"({tmp_path / 'est-ca.pem'})"
    )


# --- Importing keys ----------------------------------------------------------


def test_import_key_round_trip(softhsm: SoftHsm) -> None:
    """An encrypted key file goes in as a sensitive key the signer then uses."""
    key = ec.generate_private_key(ec.SECP384R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"backup passphrase"),
    )
    uri = import_key(
        softhsm.module, "estd", softhsm.pin, pem, "round-trip", b"backup passphrase"
    )
    assert uri == "pkcs11:token=estd;object=round-trip;type=private"
    signer = Pkcs11Signer.open(softhsm.module, uri, softhsm.pin)
    assert signer.public_key() == key.public_key()
    with token_session(softhsm) as session:
        private = session.get_key(pkcs11.ObjectClass.PRIVATE_KEY, label="round-trip")
        assert private[pkcs11.Attribute.SENSITIVE] is True
        assert private[pkcs11.Attribute.EXTRACTABLE] is False
        assert private[pkcs11.Attribute.TOKEN] is True
        assert private.id == (
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()).digest
        )


@pytest.mark.parametrize(
    ("key", "passphrase", "problem"),
    [
        ("encrypted", None, "the key needs a passphrase"),
        ("encrypted", b"wrong", "cannot load the key: wrong passphrase"),
        ("plain", b"unneeded", "the key is not encrypted"),
        ("ed25519", None, "estd signs with EC or RSA keys in a token, not Ed25519"),
        ("p192", None, "estd does not use the curve secp192r1"),
    ],
)
def test_import_key_refusals(
    softhsm: SoftHsm, key: str, passphrase: bytes | None, problem: str
) -> None:
    """Keys that cannot go into the token are refused before it is touched."""
    private: CAPrivateKey | ec.EllipticCurvePrivateKey = ca_key("P-256")
    if key == "ed25519":
        private = ed25519.Ed25519PrivateKey.generate()
    elif key == "p192":
        private = ec.generate_private_key(ec.SECP192R1())
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(b"right")
        if key == "encrypted"
        else serialization.NoEncryption()
    )
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )
    with pytest.raises(HsmError) as caught:
        import_key(softhsm.module, "estd", softhsm.pin, pem, "refused", passphrase)
    assert str(caught.value).startswith(problem)
    with token_session(softhsm) as session:
        assert not list(session.get_objects({pkcs11.Attribute.LABEL: "refused"}))


def test_import_key_refuses_used_label(softhsm: SoftHsm) -> None:
    """A label the token already uses is refused, keeping the old key."""
    uri = token_uri(softhsm, "P-256")
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(HsmError) as caught:
        import_key(softhsm.module, "estd", softhsm.pin, pem, object_label(uri))
    assert str(caught.value) == (
        f"token 'estd' already holds an object labelled {object_label(uri)!r}"
    )
    signer = Pkcs11Signer.open(softhsm.module, uri, softhsm.pin)
    assert signer.public_key() == ca_key("P-256").public_key()


def hsm_import_args(*argv: str) -> argparse.Namespace:
    """Parse an ``estctl hsm-import`` command line."""
    parser = argparse.ArgumentParser(prog="estctl")
    hsm.add_commands(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["hsm-import", *argv])


def test_estctl_hsm_import(
    softhsm: SoftHsm, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """estctl hsm-import stores an RSA key file and prints est.ini lines that work."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    key_file = tmp_path / "est-ca.key"
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    pin_file = softhsm.pin_file(tmp_path)
    args = hsm_import_args(
        "--module",
        softhsm.module,
        "--token",
        "estd",
        "--pin-file",
        str(pin_file),
        "--label",
        "estctl-rsa",
        str(key_file),
    )
    assert args.run(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:4] == [
        f"stored {key_file} in token 'estd'; in est.ini:",
        "ca-key = pkcs11:token=estd;object=estctl-rsa;type=private",
        f"pkcs11-module = {softhsm.module}",
        f"pkcs11-pin-file = {pin_file}",
    ]
    uri = lines[1].removeprefix("ca-key = ")
    signer = Pkcs11Signer.open(softhsm.module, uri, softhsm.pin)
    assert signer.key_type == "rsa-2048"
    assert signer.public_key() == key.public_key()


def test_estctl_hsm_import_errors(softhsm: SoftHsm, tmp_path: Path) -> None:
    """hsm-import failures are one-line CommandErrors naming the problem."""
    key_file = tmp_path / "est-ca.key"
    key_file.write_bytes(demo_pki().est_ca.key_pem())
    common = ["--module", softhsm.module, "--label", "estctl-refused", str(key_file)]
    missing = hsm_import_args(
        "--token", "estd", "--pin-file", str(tmp_path / "none"), *common
    )
    with pytest.raises(CommandError) as caught:
        missing.run(missing)
    assert str(caught.value) == (
        f"cannot read {tmp_path / 'none'}: No such file or directory"
    )
    wrong = hsm_import_args(
        "--token",
        softhsm.fresh_token,
        "--pin-file",
        str(softhsm.pin_file(tmp_path, "3333-wrong")),
        *common,
    )
    with pytest.raises(CommandError) as caught:
        wrong.run(wrong)
    assert (
        str(caught.value)
        == f"the PKCS#11 PIN of token {softhsm.fresh_token!r} is wrong"
    )
