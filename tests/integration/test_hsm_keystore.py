"""Pkcs11KeyStore and the token key classes against a real SoftHSM2 token.

Every signature the token makes is verified with cryptography, and certificates and CRLs also with
the openssl command line.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import os
import secrets
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pkcs11
import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature
from cryptography.x509 import ocsp
from cryptography.x509.oid import NameOID
from pkcs11 import exceptions as p11
from pkcs11.constants import Attribute, MechanismFlag, ObjectClass
from pkcs11.mechanisms import KeyType as P11KeyType

from hsm.inprocess_sign import GilHoldingSigner, is_in_process
from hsm.keys import TokenEllipticCurvePrivateKey, TokenRSAPrivateKey
from hsm.keystore import (
    KeyExists,
    KeyNotExportable,
    KeyNotFound,
    KeyNotProtected,
    KeyRef,
    KeySpec,
    ModuleLoadError,
    PinIncorrect,
    TokenAlreadyOpen,
    TokenNotFound,
    TokenPrivateKey,
    UnsupportedKey,
    UnsupportedOperation,
)
from hsm.pkcs11_store import Pkcs11KeyStore
from hsm.uri import Pkcs11Uri

T = TypeVar("T")

# The SoftHsmEnv of tests/integration/conftest.py (conftest modules are not imported by name).
SoftHsmEnv = Any

# The hashes cryptography's builders accept (None for Ed25519).
SignHash = hashes.SHA256 | hashes.SHA384 | hashes.SHA512 | None

SPECS = [
    KeySpec("EC", "P-256"),
    KeySpec("EC", "P-384"),
    KeySpec("RSA", size=2048),
    KeySpec("RSA", size=3072),
    KeySpec("RSA", size=4096),
    KeySpec("OKP", "Ed25519"),
]


@dataclass(frozen=True)
class TokenKey:
    spec: KeySpec
    ref: KeyRef
    key: TokenPrivateKey


@pytest.fixture(scope="module", params=SPECS, ids=lambda spec: spec.description.replace(" ", "-"))
def token_key(request: pytest.FixtureRequest, keystore: Pkcs11KeyStore) -> Iterator[TokenKey]:
    spec: KeySpec = request.param
    ref = keystore.generate(spec, f"test {spec.description} {secrets.token_hex(4)}")
    try:
        yield TokenKey(spec, ref, keystore.private_key(ref))
    finally:
        keystore.destroy(ref)


@pytest.fixture(scope="module")
def p256(keystore: Pkcs11KeyStore) -> Iterator[TokenKey]:
    spec = KeySpec("EC", "P-256")
    ref = keystore.generate(spec, f"p256 {secrets.token_hex(4)}")
    try:
        yield TokenKey(spec, ref, keystore.private_key(ref))
    finally:
        keystore.destroy(ref)


def with_raw_session(store: Pkcs11KeyStore, fn: Callable[[pkcs11.Session], T]) -> T:
    """Run fn with a second, plain python-pkcs11 session on the store's token and thread.

    The process is logged in already, so the session sees private objects; it is closed without
    logging out, which leaves the store's session logged in.
    """

    def on_thread() -> T:
        token = pkcs11.lib(store.module_path).get_token(token_label=store.token_label)
        with token.open(rw=True) as session:
            return fn(session)

    return store.run(on_thread)


def hash_for(spec: KeySpec) -> SignHash:
    if spec.kty == "OKP":
        return None
    if spec.curve == "P-384":
        return hashes.SHA384()
    return hashes.SHA256()


def name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def ca_certificate(
    key: TokenPrivateKey,
    algorithm: SignHash,
    rsa_padding: padding.PSS | padding.PKCS1v15 | None = None,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    public = key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(name("Token Test CA"))
        .issuer_name(name("Token Test CA"))
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
    )
    if rsa_padding is not None:
        return builder.sign(key, algorithm, rsa_padding=rsa_padding)
    return builder.sign(key, algorithm)


def leaf_certificate(
    ca: x509.Certificate,
    ca_key: TokenPrivateKey,
    algorithm: SignHash,
    rsa_padding: padding.PSS | padding.PKCS1v15 | None = None,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(name("leaf.example.test"))
        .issuer_name(ca.subject)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("leaf.example.test")]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if rsa_padding is not None:
        return builder.sign(ca_key, algorithm, rsa_padding=rsa_padding)
    return builder.sign(ca_key, algorithm)


def revocation_list(
    ca: x509.Certificate,
    ca_key: TokenPrivateKey,
    revoked_serial: int,
    algorithm: SignHash,
    rsa_padding: padding.PSS | padding.PKCS1v15 | None = None,
) -> x509.CertificateRevocationList:
    now = datetime.datetime.now(datetime.UTC)
    revoked = (
        x509.RevokedCertificateBuilder()
        .serial_number(revoked_serial)
        .revocation_date(now - datetime.timedelta(minutes=1))
        .build()
    )
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.subject)
        .last_update(now - datetime.timedelta(minutes=1))
        .next_update(now + datetime.timedelta(hours=1))
        .add_revoked_certificate(revoked)
        .add_extension(x509.CRLNumber(1), critical=False)
    )
    if rsa_padding is not None:
        return builder.sign(ca_key, algorithm, rsa_padding=rsa_padding)
    return builder.sign(ca_key, algorithm)


def write_pem(path: Path, obj: x509.Certificate | x509.CertificateRevocationList) -> Path:
    path.write_bytes(obj.public_bytes(serialization.Encoding.PEM))
    return path


def openssl(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", *(str(a) for a in args)], capture_output=True, text=True, check=False
    )


def verify_with_public_key(
    public: Any, signature: bytes, data: bytes, algorithm: hashes.HashAlgorithm | None
) -> None:
    if isinstance(public, ec.EllipticCurvePublicKey):
        assert algorithm is not None
        public.verify(signature, data, ec.ECDSA(algorithm))
    elif isinstance(public, rsa.RSAPublicKey):
        assert algorithm is not None
        public.verify(signature, data, padding.PKCS1v15(), algorithm)
    else:
        assert isinstance(public, ed25519.Ed25519PublicKey)
        public.verify(signature, data)


# -- generation and protection -------------------------------------------------------------------


def test_generated_key_is_protected_and_described_by_the_token(
    keystore: Pkcs11KeyStore, token_key: TokenKey, softhsm_env: SoftHsmEnv
) -> None:
    keystore.check_protected(token_key.ref)
    public = keystore.public_key(token_key.ref)
    assert public == token_key.key.public_key()
    if token_key.spec.kty == "EC":
        assert isinstance(public, ec.EllipticCurvePublicKey)
        assert (
            public.curve.name
            == {"P-256": "secp256r1", "P-384": "secp384r1"}[str(token_key.spec.curve)]
        )
    elif token_key.spec.kty == "RSA":
        assert isinstance(public, rsa.RSAPublicKey)
        assert public.key_size == token_key.spec.size
        assert public.public_numbers().e == 65537
    else:
        assert isinstance(public, ed25519.Ed25519PublicKey)

    # An independent reader of the token agrees: pkcs11-tool, PIN through the environment.
    listing = subprocess.run(
        [
            "pkcs11-tool",
            "--module",
            softhsm_env.module,
            "--token-label",
            softhsm_env.token_label,
            "--login",
            "--pin",
            "env:HSM_TEST_PIN",
            "--list-objects",
            "--type",
            "privkey",
            "--id",
            token_key.ref.id.hex(),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "HSM_TEST_PIN": softhsm_env.user_pin},
        check=False,
    )
    assert listing.returncode == 0, listing.stderr
    assert token_key.ref.label in listing.stdout
    access = next(line for line in listing.stdout.splitlines() if "Access:" in line)
    for flag in ("sensitive", "always sensitive", "never extractable"):
        assert flag in access, f"pkcs11-tool does not report the key {flag}: {access}"
    assert "extractable," not in access.replace("never extractable", "")
    usage = next(line for line in listing.stdout.splitlines() if "Usage:" in line)
    assert "sign" in usage and "decrypt" not in usage and "unwrap" not in usage, usage


def test_private_key_value_cannot_be_read_from_the_token(
    keystore: Pkcs11KeyStore, token_key: TokenKey
) -> None:
    secret = Attribute.PRIVATE_EXPONENT if token_key.spec.kty == "RSA" else Attribute.VALUE

    def read_secret(session: pkcs11.Session) -> object:
        private = session.get_key(
            object_class=ObjectClass.PRIVATE_KEY, label=token_key.ref.label, id=token_key.ref.id
        )
        return private[secret]

    with pytest.raises(p11.AttributeSensitive):
        with_raw_session(keystore, read_secret)
    # The second session closed without logging the store out.
    token_key.key.public_key()
    assert keystore.find(token_key.ref.label) == token_key.ref


def test_token_key_refuses_to_export_or_decrypt(token_key: TokenKey) -> None:
    key = token_key.key
    with pytest.raises(KeyNotExportable, match="never leaves"):
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    if isinstance(key, ed25519.Ed25519PrivateKey):
        with pytest.raises(KeyNotExportable):
            key.private_bytes_raw()
        return
    with pytest.raises(TypeError):
        key.private_numbers()
    if isinstance(key, ec.EllipticCurvePrivateKey):
        with pytest.raises(UnsupportedOperation):
            key.exchange(ec.ECDH(), ec.generate_private_key(key.curve).public_key())
    else:
        with pytest.raises(UnsupportedOperation):
            key.decrypt(b"\0" * 32, padding.PKCS1v15())


@pytest.mark.parametrize("usage", [Attribute.DERIVE, Attribute.DECRYPT, Attribute.UNWRAP])
def test_a_pin_holder_cannot_turn_on_another_use_of_the_key(
    keystore: Pkcs11KeyStore, token_key: TokenKey, usage: Attribute
) -> None:
    """CKA_MODIFIABLE false: the token refuses C_SetAttributeValue on the generated key pair."""

    def turn_on(session: pkcs11.Session) -> tuple[object, object]:
        private = session.get_key(
            object_class=ObjectClass.PRIVATE_KEY, label=token_key.ref.label, id=token_key.ref.id
        )
        public = session.get_key(
            object_class=ObjectClass.PUBLIC_KEY, label=token_key.ref.label, id=token_key.ref.id
        )
        modifiable = (private[Attribute.MODIFIABLE], public[Attribute.MODIFIABLE])
        for obj, attribute in ((private, usage), (public, Attribute.ENCRYPT)):
            # SoftHSM2 answers CKR_ACTION_PROHIBITED (0x1b, unnamed in python-pkcs11); other
            # tokens CKR_ATTRIBUTE_READ_ONLY. Any other error would not be a refusal.
            with pytest.raises(p11.PKCS11Error) as refused:
                obj[attribute] = True
            assert isinstance(refused.value, p11.AttributeReadOnly) or "0x1b" in str(
                refused.value), f"setting {attribute.name}: {refused.value!r}"
            assert obj[attribute] is False, f"the token let {attribute.name} be turned on"
        return modifiable

    assert with_raw_session(keystore, turn_on) == (False, False)
    assert keystore.inspect(token_key.ref).attributes[f"CKA_{usage.name}"] is False


def test_check_protected_names_the_failing_attribute(keystore: Pkcs11KeyStore) -> None:
    label = f"weak {secrets.token_hex(4)}"
    key_id = secrets.token_bytes(8)

    def make_weak_key(session: pkcs11.Session) -> None:
        session.generate_keypair(
            P11KeyType.EC,
            id=key_id,
            label=label,
            store=True,
            capabilities=MechanismFlag.SIGN | MechanismFlag.VERIFY,
            public_template={Attribute.EC_PARAMS: bytes.fromhex("06082a8648ce3d030107")},
            private_template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: True},
        )

    with_raw_session(keystore, make_weak_key)
    ref = keystore.find(label)
    try:
        with pytest.raises(KeyNotProtected, match="CKA_EXTRACTABLE"):
            keystore.check_protected(ref)
    finally:
        keystore.destroy(ref)


def test_inspect_reports_what_the_token_says_of_the_key(
    keystore: Pkcs11KeyStore, token_key: TokenKey
) -> None:
    report = keystore.inspect(token_key.ref)
    assert report.attributes == {
        "CKA_TOKEN": True, "CKA_PRIVATE": True, "CKA_SENSITIVE": True,
        "CKA_ALWAYS_SENSITIVE": True, "CKA_EXTRACTABLE": False, "CKA_NEVER_EXTRACTABLE": True,
        "CKA_LOCAL": True, "CKA_SIGN": True, "CKA_DECRYPT": False, "CKA_UNWRAP": False,
        "CKA_DERIVE": False, "CKA_MODIFIABLE": False}
    rsa_key = token_key.spec.kty == "RSA"
    assert report.secret_attribute == ("CKA_PRIVATE_EXPONENT" if rsa_key else "CKA_VALUE")
    assert report.secret_refusal == "CKR_ATTRIBUTE_SENSITIVE"


def test_inspect_shows_a_key_that_was_imported_and_can_be_read(
    keystore: Pkcs11KeyStore,
) -> None:
    """A key made outside the token (imported) and left readable: inspect must say so."""
    label = f"imported {secrets.token_hex(4)}"
    key_id = secrets.token_bytes(8)
    outside = ec.generate_private_key(ec.SECP256R1())
    point = outside.public_key().public_bytes(serialization.Encoding.X962,
                                              serialization.PublicFormat.UncompressedPoint)
    params = bytes.fromhex("06082a8648ce3d030107")

    def import_key(session: pkcs11.Session) -> None:
        session.create_object({
            Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.KEY_TYPE: P11KeyType.EC,
            Attribute.TOKEN: True, Attribute.PRIVATE: True, Attribute.SENSITIVE: False,
            Attribute.EXTRACTABLE: True, Attribute.SIGN: True, Attribute.LABEL: label,
            Attribute.ID: key_id, Attribute.EC_PARAMS: params,
            Attribute.VALUE: outside.private_numbers().private_value.to_bytes(32, "big")})
        session.create_object({
            Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.KEY_TYPE: P11KeyType.EC,
            Attribute.TOKEN: True, Attribute.VERIFY: True, Attribute.LABEL: label,
            Attribute.ID: key_id, Attribute.EC_PARAMS: params,
            Attribute.EC_POINT: bytes([0x04, len(point)]) + point})

    with_raw_session(keystore, import_key)
    ref = keystore.find(label)
    try:
        report = keystore.inspect(ref)
        assert report.attributes["CKA_LOCAL"] is False
        assert report.attributes["CKA_SENSITIVE"] is False
        assert report.attributes["CKA_ALWAYS_SENSITIVE"] is False
        assert report.attributes["CKA_EXTRACTABLE"] is True
        assert report.attributes["CKA_NEVER_EXTRACTABLE"] is False
        assert report.secret_refusal == ""  # the token handed the value out
    finally:
        keystore.destroy(ref)


# -- signing through cryptography's builders -----------------------------------------------------


def test_certificates_and_crl_signed_in_the_token_verify(
    token_key: TokenKey, tmp_path: Path
) -> None:
    algorithm = hash_for(token_key.spec)
    ca = ca_certificate(token_key.key, algorithm)
    leaf = leaf_certificate(ca, token_key.key, algorithm)
    crl = revocation_list(ca, token_key.key, leaf.serial_number, algorithm)

    ca.verify_directly_issued_by(ca)
    leaf.verify_directly_issued_by(ca)
    assert crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]

    ca_pem = write_pem(tmp_path / "ca.pem", ca)
    leaf_pem = write_pem(tmp_path / "leaf.pem", leaf)
    crl_pem = write_pem(tmp_path / "crl.pem", crl)
    for cert in (ca_pem, leaf_pem):
        done = openssl("verify", "-CAfile", ca_pem, cert)
        assert done.returncode == 0, f"openssl verify rejected {cert.name}: {done.stderr}"
    done = openssl("crl", "-in", crl_pem, "-CAfile", ca_pem, "-noout")
    assert done.returncode == 0 and "verify OK" in done.stdout + done.stderr, done.stderr
    # openssl trusts the CRL's signature enough to act on it: the leaf is revoked.
    done = openssl("verify", "-crl_check", "-CRLfile", crl_pem, "-CAfile", ca_pem, leaf_pem)
    assert done.returncode != 0 and "revoked" in done.stdout + done.stderr, done.stdout


@pytest.mark.parametrize(
    "token_key",
    [spec for spec in SPECS if spec.kty == "RSA"],
    indirect=True,
    ids=lambda spec: spec.description.replace(" ", "-"),
)
def test_rsa_pss_certificates_signed_in_the_token_verify(
    token_key: TokenKey, tmp_path: Path
) -> None:
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH)
    ca = ca_certificate(token_key.key, hashes.SHA256(), rsa_padding=pss)
    leaf = leaf_certificate(ca, token_key.key, hashes.SHA256(), rsa_padding=pss)
    crl = revocation_list(ca, token_key.key, leaf.serial_number, hashes.SHA256(), rsa_padding=pss)
    leaf.verify_directly_issued_by(ca)
    assert crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    ca_pem = write_pem(tmp_path / "ca.pem", ca)
    leaf_pem = write_pem(tmp_path / "leaf.pem", leaf)
    crl_pem = write_pem(tmp_path / "crl.pem", crl)
    done = openssl("verify", "-CAfile", ca_pem, leaf_pem)
    assert done.returncode == 0, f"openssl verify rejected the PSS leaf: {done.stderr}"
    done = openssl("crl", "-in", crl_pem, "-CAfile", ca_pem, "-noout")
    assert done.returncode == 0 and "verify OK" in done.stdout + done.stderr, done.stderr

    # Direct PSS signatures with every salt length a signer may choose.
    public = token_key.key.public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    assert isinstance(token_key.key, rsa.RSAPrivateKey)
    for salt in (padding.PSS.DIGEST_LENGTH, padding.PSS.MAX_LENGTH, 0, 20):
        scheme = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=salt)
        signature = token_key.key.sign(b"message", scheme, hashes.SHA384())
        public.verify(
            signature,
            b"message",
            padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=padding.PSS.AUTO),
            hashes.SHA384(),
        )


def test_ocsp_response_signed_in_the_token_verifies(token_key: TokenKey, tmp_path: Path) -> None:
    algorithm = hash_for(token_key.spec)
    ca = ca_certificate(token_key.key, algorithm)
    leaf = leaf_certificate(ca, token_key.key, algorithm)
    now = datetime.datetime.now(datetime.UTC)
    response = (
        ocsp.OCSPResponseBuilder()
        .add_response(
            cert=leaf,
            issuer=ca,
            algorithm=hashes.SHA256(),
            cert_status=ocsp.OCSPCertStatus.GOOD,
            this_update=now,
            next_update=now + datetime.timedelta(hours=1),
            revocation_time=None,
            revocation_reason=None,
        )
        .responder_id(ocsp.OCSPResponderEncoding.HASH, ca)
        .sign(token_key.key, algorithm)
    )
    verify_with_public_key(
        ca.public_key(), response.signature, response.tbs_response_bytes, algorithm
    )
    ca_pem = write_pem(tmp_path / "ca.pem", ca)
    leaf_pem = write_pem(tmp_path / "leaf.pem", leaf)
    response_der = tmp_path / "response.der"
    response_der.write_bytes(response.public_bytes(serialization.Encoding.DER))
    done = openssl(
        "ocsp",
        "-respin",
        response_der,
        "-sha256",
        "-issuer",
        ca_pem,
        "-cert",
        leaf_pem,
        "-CAfile",
        ca_pem,
        "-VAfile",
        ca_pem,
        "-no_nonce",
    )
    assert done.returncode == 0 and "Response verify OK" in done.stdout + done.stderr, (
        done.stdout + done.stderr
    )


def test_direct_signatures_verify_for_every_hash(token_key: TokenKey) -> None:
    public = token_key.key.public_key()
    if token_key.spec.kty == "OKP":
        assert isinstance(token_key.key, ed25519.Ed25519PrivateKey)
        verify_with_public_key(public, token_key.key.sign(b"data"), b"data", None)
        return
    for algorithm in (hashes.SHA256(), hashes.SHA384(), hashes.SHA512()):
        if isinstance(token_key.key, ec.EllipticCurvePrivateKey):
            signature = token_key.key.sign(b"data", ec.ECDSA(algorithm))
        else:
            assert isinstance(token_key.key, rsa.RSAPrivateKey)
            signature = token_key.key.sign(b"data", padding.PKCS1v15(), algorithm)
        verify_with_public_key(public, signature, b"data", algorithm)
        with pytest.raises(InvalidSignature):
            verify_with_public_key(public, signature, b"other data", algorithm)


# -- finding, naming, destroying -----------------------------------------------------------------


def test_find_by_label_id_and_uri(keystore: Pkcs11KeyStore, p256: TokenKey) -> None:
    ref = p256.ref
    assert keystore.find(ref.label) == ref
    assert keystore.find(key_id=ref.id) == ref
    assert keystore.find(ref.label, ref.id) == ref
    assert keystore.find_uri(ref.to_uri()) == ref
    assert keystore.find_uri(ref.to_uri(keystore.module_path)) == ref
    assert keystore.find_uri(Pkcs11Uri(object=ref.label)) == ref
    assert ref in keystore.list_keys()
    with pytest.raises(KeyNotFound, match="no private key"):
        keystore.find("no such key")
    with pytest.raises(KeyNotFound, match="names token 'elsewhere'"):
        keystore.find_uri(f"pkcs11:token=elsewhere;object={ref.label.replace(' ', '%20')}")


def test_generate_refuses_a_label_or_id_already_taken(
    keystore: Pkcs11KeyStore, p256: TokenKey
) -> None:
    with pytest.raises(KeyExists, match="labelled"):
        keystore.generate(KeySpec("EC"), p256.ref.label)
    with pytest.raises(KeyExists, match="with id"):
        keystore.generate(KeySpec("EC"), "a fresh label", key_id=p256.ref.id)


def test_destroy_removes_private_and_public_key(keystore: Pkcs11KeyStore) -> None:
    ref = keystore.generate(KeySpec("EC"), f"doomed {secrets.token_hex(4)}", key_id=b"\x01\x02")
    assert ref.id == b"\x01\x02"
    keystore.destroy(ref)
    with pytest.raises(KeyNotFound):
        keystore.find(ref.label)
    with pytest.raises(KeyNotFound):
        keystore.public_key(ref)
    with pytest.raises(KeyNotFound):
        keystore.destroy(ref)


# -- opening: errors and the process-wide rules -------------------------------------------------


def test_wrong_pin_is_refused_without_echoing_it(softhsm_env: SoftHsmEnv) -> None:
    wrong = "wrong-" + secrets.token_hex(4)
    with pytest.raises(PinIncorrect) as caught:
        Pkcs11KeyStore.open(softhsm_env.module, softhsm_env.spare_token_label, wrong)
    assert wrong not in str(caught.value)
    assert softhsm_env.spare_token_label in str(caught.value)


def test_unknown_token_and_missing_module(softhsm_env: SoftHsmEnv) -> None:
    with pytest.raises(TokenNotFound, match="no-such-token"):
        Pkcs11KeyStore.open(softhsm_env.module, "no-such-token", softhsm_env.user_pin)
    with pytest.raises(ModuleLoadError, match="does not exist"):
        Pkcs11KeyStore.open("/nonexistent/libpkcs11.so", "any", "1234")
    with pytest.raises(ModuleLoadError, match="could not load"):
        Pkcs11KeyStore.open("/etc/hostname", "any", "1234")


def test_a_token_is_opened_once_per_process(
    keystore: Pkcs11KeyStore, softhsm_env: SoftHsmEnv
) -> None:
    with pytest.raises(TokenAlreadyOpen):
        Pkcs11KeyStore.open(softhsm_env.module, softhsm_env.token_label, softhsm_env.user_pin)
    # The refused open did not disturb the open store.
    keystore.list_keys()


def test_two_tokens_share_the_one_pkcs11_thread(
    keystore: Pkcs11KeyStore, softhsm_env: SoftHsmEnv, p256: TokenKey
) -> None:
    with Pkcs11KeyStore.open(
        softhsm_env.module, softhsm_env.spare_token_label, softhsm_env.spare_user_pin
    ) as spare:
        assert spare.executor is keystore.executor
        ref = spare.generate(KeySpec("EC", "P-384"), "spare key")
        key = spare.private_key(ref)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        signature = key.sign(b"spare", ec.ECDSA(hashes.SHA384()))
        verify_with_public_key(key.public_key(), signature, b"spare", hashes.SHA384())
        with pytest.raises(KeyNotFound, match="not on"):
            spare.public_key(p256.ref)
        spare.destroy(ref)
    with pytest.raises(Exception, match="closed"):
        spare.list_keys()
    # Closing the spare store neither logged out nor stopped the thread of the main one.
    assert isinstance(p256.key, ec.EllipticCurvePrivateKey)
    p256.key.sign(b"still here", ec.ECDSA(hashes.SHA256()))


# -- the single PKCS#11 thread ---------------------------------------------------------------------


def test_pkcs11_calls_run_on_one_named_thread(keystore: Pkcs11KeyStore) -> None:
    names = {keystore.run(lambda: threading.current_thread().name) for _ in range(5)}
    assert len(names) == 1 and names.pop().startswith("pkcs11")
    # Re-entering from the PKCS#11 thread runs directly instead of deadlocking.
    assert keystore.run(lambda: keystore.run(lambda: 42)) == 42


def test_eight_threads_signing_at_once_all_succeed(p256: TokenKey) -> None:
    key = p256.key
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    public = key.public_key()
    failures: list[BaseException] = []
    start = threading.Barrier(8)

    def worker(index: int) -> None:
        try:
            start.wait()
            for n in range(50):
                message = f"thread {index} message {n}".encode()
                signature = key.sign(message, ec.ECDSA(hashes.SHA256()))
                public.verify(signature, message, ec.ECDSA(hashes.SHA256()))
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a signing thread hung"
    assert not failures, f"{len(failures)} threads failed: {failures[0]!r}"


async def test_run_async_signs_certificates_from_the_event_loop(
    keystore: Pkcs11KeyStore, p256: TokenKey
) -> None:
    ca = ca_certificate(p256.key, hashes.SHA256())

    def issue(index: int) -> x509.Certificate:
        # builder.sign on the PKCS#11 thread calls key.sign there: run() must not re-submit.
        return leaf_certificate(ca, p256.key, hashes.SHA256())

    loop_ticks = 0

    async def ticker() -> None:
        nonlocal loop_ticks
        while True:
            loop_ticks += 1
            await asyncio.sleep(0)

    ticking = asyncio.create_task(ticker())
    try:
        leaves = await asyncio.gather(*(keystore.run_async(issue, i) for i in range(20)))
    finally:
        ticking.cancel()
    for leaf in leaves:
        leaf.verify_directly_issued_by(ca)
    assert len({leaf.serial_number for leaf in leaves}) == 20
    assert loop_ticks > 0, "the event loop was blocked while the token signed"


def test_prehashed_and_directly_constructed_keys(keystore: Pkcs11KeyStore, p256: TokenKey) -> None:
    key = TokenEllipticCurvePrivateKey(keystore, p256.ref)
    assert key.public_key() == p256.key.public_key()
    assert key.key_size == 256 and key.curve.name == "secp256r1"
    digest = hashlib.sha256(b"prehashed").digest()
    signature = key.sign(digest, ec.ECDSA(Prehashed(hashes.SHA256())))
    key.public_key().verify(signature, b"prehashed", ec.ECDSA(hashes.SHA256()))
    with pytest.raises(ValueError, match="prehashed data is 3 bytes"):
        key.sign(b"abc", ec.ECDSA(Prehashed(hashes.SHA256())))
    with pytest.raises(UnsupportedAlgorithm, match="deterministic"):
        key.sign(b"data", ec.ECDSA(hashes.SHA256(), deterministic_signing=True))
    with pytest.raises(UnsupportedKey, match="not an RSA key"):
        TokenRSAPrivateKey(keystore, p256.ref)


# -- the GIL-holding signing path (hsm.inprocess_sign) --------------------------------------------
def test_softhsm_is_signed_through_the_gil_holding_path(
    keystore: Pkcs11KeyStore, p256: TokenKey
) -> None:
    """SoftHSM2 computes in process, so the store signs without releasing the GIL; every other
    test in this module that signs goes through that path too."""
    assert keystore.holds_gil_while_signing
    assert is_in_process(keystore.module_path)
    opensc = "/usr/lib/x86_64-linux-gnu/opensc-pkcs11.so"
    assert not is_in_process(opensc)  # a device token: python-pkcs11's GIL-releasing calls
    if Path(opensc).exists():
        assert GilHoldingSigner.for_module(opensc) is None
    digest = hashlib.sha256(b"held").digest()

    def sign_directly(session: pkcs11.Session) -> tuple[bytes | None, bytes | None, bytes | None]:
        signer = GilHoldingSigner.for_module(keystore.module_path)
        assert signer is not None
        (private,) = session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY,
                                          Attribute.LABEL: p256.ref.label})
        handle: int = private.handle  # type: ignore[attr-defined]
        session_handle: int = session.handle  # type: ignore[attr-defined]
        good = signer.sign(session_handle, handle, pkcs11.Mechanism.ECDSA, digest)
        # Errors start no operation or end it: the caller falls back, and the session is free.
        bad_key = signer.sign(session_handle, 0x7FFFFFFF, pkcs11.Mechanism.ECDSA, digest)
        bad_mechanism = signer.sign(session_handle, handle, pkcs11.Mechanism.RSA_PKCS, digest)
        again = signer.sign(session_handle, handle, pkcs11.Mechanism.ECDSA, digest)
        assert again is not None
        return good, bad_key, bad_mechanism

    good, bad_key, bad_mechanism = with_raw_session(keystore, sign_directly)
    assert bad_key is None and bad_mechanism is None
    assert good is not None and len(good) == 64
    public = p256.key.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    der = encode_dss_signature(int.from_bytes(good[:32], "big"), int.from_bytes(good[32:], "big"))
    public.verify(der, digest, ec.ECDSA(Prehashed(hashes.SHA256())))
    with pytest.raises(InvalidSignature):
        public.verify(der, hashlib.sha256(b"other").digest(), ec.ECDSA(Prehashed(hashes.SHA256())))
