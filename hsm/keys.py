"""cryptography private-key classes whose sign() runs in the token.

cryptography's builders (certificates, CRLs, OCSP responses) accept any subclass of its abstract
private-key classes and call its sign() from their Rust core, so the X.509 layer stays in
cryptography and only the signature is made by the token. Digests are computed here, in Python:
SoftHSM2 2.6.1 has no CKM_ECDSA_SHA256, and a raw mechanism works with every token.

sign() goes through store.run(), so it is safe from any thread and does not deadlock when called
on the PKCS#11 thread itself (builder.sign run via store.run_async calls sign() there).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final, NoReturn

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric import padding as asym_padding
from cryptography.hazmat.primitives.asymmetric.utils import (
    NoDigestInfo,
    Prehashed,
    encode_dss_signature,
)
from cryptography.utils import Buffer
from pkcs11.mechanisms import MGF, Mechanism

from hsm.errors import KeyNotExportable, UnsupportedKey, UnsupportedOperation
from hsm.keystore import KeyRef

if TYPE_CHECKING:
    from hsm.pkcs11_store import Pkcs11KeyStore

__all__ = ["TokenEd25519PrivateKey", "TokenEllipticCurvePrivateKey", "TokenRSAPrivateKey"]

# DER DigestInfo prefixes (RFC 8017 section 9.2, note 1) for EMSA-PKCS1-v1_5 over CKM_RSA_PKCS.
_DIGEST_INFO_PREFIX: Final[dict[str, bytes]] = {
    "sha224": bytes.fromhex("302d300d06096086480165030402040500041c"),
    "sha256": bytes.fromhex("3031300d060960864801650304020105000420"),
    "sha384": bytes.fromhex("3041300d060960864801650304020205000430"),
    "sha512": bytes.fromhex("3051300d060960864801650304020305000440"),
}

# Hash and MGF1 identifiers for CK_RSA_PKCS_PSS_PARAMS.
_PSS_HASH: Final[dict[str, tuple[Mechanism, MGF]]] = {
    "sha224": (Mechanism.SHA224, MGF.SHA224),
    "sha256": (Mechanism.SHA256, MGF.SHA256),
    "sha384": (Mechanism.SHA384, MGF.SHA384),
    "sha512": (Mechanism.SHA512, MGF.SHA512),
}


def _never_leaves(ref: KeyRef) -> NoReturn:
    raise KeyNotExportable(
        f"the private key {ref.label!r} lives in token {ref.token_label!r} and never leaves it"
    )


def _not_a(ref: KeyRef, kind: str) -> UnsupportedKey:
    return UnsupportedKey(f"key {ref.label!r} on token {ref.token_label!r} is not an {kind} key")


def _digest(
    data: Buffer, algorithm: Prehashed | hashes.HashAlgorithm
) -> tuple[bytes, hashes.HashAlgorithm]:
    """Digest `data` (or take it as the digest when Prehashed); return it and its hash."""
    if isinstance(algorithm, Prehashed):
        # Prehashed keeps the hash it stands for only in a private attribute.
        hash_algorithm = algorithm._algorithm
        digest = bytes(data)
        if len(digest) != algorithm.digest_size:
            raise ValueError(
                f"the prehashed data is {len(digest)} bytes, but {hash_algorithm.name} digests "
                f"are {algorithm.digest_size} bytes"
            )
        return digest, hash_algorithm
    hasher = hashes.Hash(algorithm)
    hasher.update(data)
    return hasher.finalize(), algorithm


class _InTheToken:
    """What every token key shares: its token and reference, and that it never leaves."""

    _store: Pkcs11KeyStore
    _ref: KeyRef

    @property
    def ref(self) -> KeyRef:
        return self._ref

    @property
    def store(self) -> Pkcs11KeyStore:
        return self._store

    def private_bytes(
        self,
        encoding: serialization.Encoding,
        format: serialization.PrivateFormat,
        encryption_algorithm: serialization.KeySerializationEncryption,
    ) -> bytes:
        _never_leaves(self._ref)

    def __copy__(self) -> Any:
        return self  # one handle per key in the token: a copy is the same key

    def __deepcopy__(self, memo: dict[int, object]) -> Any:
        return self


class TokenEllipticCurvePrivateKey(_InTheToken, ec.EllipticCurvePrivateKey):
    """An EC private key in the token: ECDSA with the digest made here and CKM_ECDSA there."""

    def __init__(
        self, store: Pkcs11KeyStore, ref: KeyRef, public: ec.EllipticCurvePublicKey | None = None
    ) -> None:
        self._store = store
        self._ref = ref
        if public is None:
            fetched = store.public_key(ref)
            if not isinstance(fetched, ec.EllipticCurvePublicKey):
                raise _not_a(ref, "EC")
            public = fetched
        self._public = public

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._public.curve

    @property
    def key_size(self) -> int:
        return self._public.key_size

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public

    def sign(self, data: Buffer, signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes:
        """ECDSA signature, DER-encoded as cryptography returns it."""
        if not isinstance(signature_algorithm, ec.ECDSA):
            raise UnsupportedAlgorithm("token EC keys sign with ECDSA only")
        if signature_algorithm.deterministic_signing:
            raise UnsupportedAlgorithm(
                "the token cannot make deterministic (RFC 6979) ECDSA signatures"
            )
        digest, _ = _digest(data, signature_algorithm.algorithm)
        raw = self._store.sign_raw(self._ref, Mechanism.ECDSA, digest)
        half = len(raw) // 2
        r = int.from_bytes(raw[:half], "big")
        s = int.from_bytes(raw[half:], "big")
        return encode_dss_signature(r, s)

    def exchange(self, algorithm: ec.ECDH, peer_public_key: ec.EllipticCurvePublicKey) -> bytes:
        raise UnsupportedOperation(
            f"the token key {self._ref.label!r} is for signing only; it does no key exchange"
        )

    def private_numbers(self) -> ec.EllipticCurvePrivateNumbers:
        _never_leaves(self._ref)

    def __repr__(self) -> str:
        return f"<TokenEllipticCurvePrivateKey {self._ref.to_uri()} {self.curve.name}>"


class TokenRSAPrivateKey(_InTheToken, rsa.RSAPrivateKey):
    """An RSA private key in the token: PKCS#1 v1.5 over CKM_RSA_PKCS, PSS over CKM_RSA_PKCS_PSS."""

    def __init__(
        self, store: Pkcs11KeyStore, ref: KeyRef, public: rsa.RSAPublicKey | None = None
    ) -> None:
        self._store = store
        self._ref = ref
        if public is None:
            fetched = store.public_key(ref)
            if not isinstance(fetched, rsa.RSAPublicKey):
                raise _not_a(ref, "RSA")
            public = fetched
        self._public = public

    @property
    def key_size(self) -> int:
        return self._public.key_size

    def public_key(self) -> rsa.RSAPublicKey:
        return self._public

    def sign(
        self,
        data: Buffer,
        padding: asym_padding.AsymmetricPadding,
        algorithm: Prehashed | hashes.HashAlgorithm | NoDigestInfo,
    ) -> bytes:
        """RSA signature with PKCS#1 v1.5 or PSS padding; the digest is computed here."""
        if isinstance(algorithm, NoDigestInfo):
            if not isinstance(padding, asym_padding.PKCS1v15):
                raise ValueError("NoDigestInfo is only meaningful with PKCS1v15 padding")
            # The caller built the DigestInfo (or wants none): sign the bytes as given.
            return self._store.sign_raw(self._ref, Mechanism.RSA_PKCS, bytes(data))
        digest, hash_algorithm = _digest(data, algorithm)
        if isinstance(padding, asym_padding.PKCS1v15):
            prefix = _DIGEST_INFO_PREFIX.get(hash_algorithm.name)
            if prefix is None:
                raise UnsupportedAlgorithm(
                    f"token RSA keys sign with SHA-2 digests, not {hash_algorithm.name}"
                )
            return self._store.sign_raw(self._ref, Mechanism.RSA_PKCS, prefix + digest)
        if isinstance(padding, asym_padding.PSS):
            return self._sign_pss(digest, padding, hash_algorithm)
        raise UnsupportedAlgorithm(
            f"token RSA keys sign with PKCS1v15 or PSS padding, not {padding.name}"
        )

    def _sign_pss(
        self, digest: bytes, pss: asym_padding.PSS, algorithm: hashes.HashAlgorithm
    ) -> bytes:
        # cryptography keeps the PSS parameters only in private attributes.
        mgf = pss._mgf
        if not isinstance(mgf, asym_padding.MGF1):
            raise UnsupportedAlgorithm("PSS padding must use MGF1")
        hash_ids = _PSS_HASH.get(algorithm.name)
        mgf_ids = _PSS_HASH.get(mgf._algorithm.name)
        if hash_ids is None or mgf_ids is None:
            raise UnsupportedAlgorithm(
                "token RSA-PSS signatures use SHA-2 digests and MGF1 with SHA-2"
            )
        salt = pss._salt_length
        if isinstance(salt, int):
            salt_length = salt
        elif salt is asym_padding.PSS.DIGEST_LENGTH:
            salt_length = algorithm.digest_size
        elif salt is asym_padding.PSS.MAX_LENGTH:
            salt_length = asym_padding.calculate_max_pss_salt_length(self._public, algorithm)
        else:
            raise ValueError("PSS salt length AUTO is only for verifying; choose one to sign")
        return self._store.sign_raw(
            self._ref,
            Mechanism.RSA_PKCS_PSS,
            digest,
            (hash_ids[0], mgf_ids[1], salt_length),
        )

    def decrypt(self, ciphertext: bytes, padding: asym_padding.AsymmetricPadding) -> bytes:
        raise UnsupportedOperation(
            f"the token key {self._ref.label!r} is for signing only; it does not decrypt"
        )

    def private_numbers(self) -> rsa.RSAPrivateNumbers:
        _never_leaves(self._ref)

    def __repr__(self) -> str:
        return f"<TokenRSAPrivateKey {self._ref.to_uri()} {self.key_size} bits>"


class TokenEd25519PrivateKey(_InTheToken, ed25519.Ed25519PrivateKey):
    """An Ed25519 private key in the token: pure EdDSA (CKM_EDDSA) over the whole message."""

    def __init__(
        self, store: Pkcs11KeyStore, ref: KeyRef, public: ed25519.Ed25519PublicKey | None = None
    ) -> None:
        self._store = store
        self._ref = ref
        if public is None:
            fetched = store.public_key(ref)
            if not isinstance(fetched, ed25519.Ed25519PublicKey):
                raise _not_a(ref, "Ed25519")
            public = fetched
        self._public = public

    def public_key(self) -> ed25519.Ed25519PublicKey:
        return self._public

    def sign(self, data: Buffer) -> bytes:
        return self._store.sign_raw(self._ref, Mechanism.EDDSA, bytes(data))

    def private_bytes_raw(self) -> bytes:
        _never_leaves(self._ref)

    def __repr__(self) -> str:
        return f"<TokenEd25519PrivateKey {self._ref.to_uri()}>"
