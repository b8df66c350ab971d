"""What the appliance knows of CA keys: KeySpec, KeyRef, the KeyStore protocol and the errors.

Callers name keys with KeyRef (token label, object label, id) or an RFC 7512 URI, describe new keys
with KeySpec, and catch the narrow HsmError subclass they can act on.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal, Protocol, TypeVar, cast

from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from hsm.errors import (
    DeviceError,
    HsmError,
    KeyAmbiguous,
    KeyExists,
    KeyNotExportable,
    KeyNotFound,
    KeyNotProtected,
    ModuleLoadError,
    PinIncorrect,
    PinInvalid,
    PinLocked,
    TokenAlreadyOpen,
    TokenExists,
    TokenNotFound,
    UnsupportedKey,
    UnsupportedOperation,
)
from hsm.uri import Pkcs11Uri

__all__ = [
    "DeviceError",
    "HsmError",
    "KeyAmbiguous",
    "KeyExists",
    "KeyNotExportable",
    "KeyNotFound",
    "KeyNotProtected",
    "KeyRef",
    "KeySpec",
    "KeyStore",
    "KeyType",
    "ModuleLoadError",
    "PinIncorrect",
    "PinInvalid",
    "PinLocked",
    "PublicKey",
    "TokenAlreadyOpen",
    "TokenExists",
    "TokenNotFound",
    "TokenPrivateKey",
    "UnsupportedKey",
    "UnsupportedOperation",
]

KeyType = Literal["EC", "RSA", "OKP"]

PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey
TokenPrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

T = TypeVar("T")

EC_CURVES: Final = ("P-256", "P-384")
RSA_SIZES: Final = (2048, 3072, 4096)
OKP_CURVES: Final = ("Ed25519",)

_CURVE_BITS: Final = {"P-256": 256, "P-384": 384, "Ed25519": 256}

_CURVE_ALIASES: Final = {
    "p-256": "P-256",
    "p256": "P-256",
    "secp256r1": "P-256",
    "prime256v1": "P-256",
    "p-384": "P-384",
    "p384": "P-384",
    "secp384r1": "P-384",
    "ed25519": "Ed25519",
}


@dataclass(frozen=True)
class KeySpec:
    """The kind of key to generate: EC P-256/P-384, RSA 2048/3072/4096 or OKP Ed25519.

    Constructing one directly fills the default curve or size and checks the canonical spelling;
    use KeySpec.parse for operator input ("ec", "secp384r1", "rsa" ...).
    """

    kty: KeyType
    curve: str | None = None
    size: int | None = None

    def __post_init__(self) -> None:
        if self.kty == "EC":
            if self.curve is None:
                object.__setattr__(self, "curve", "P-256")
            if self.curve not in EC_CURVES:
                raise UnsupportedKey(
                    f"unsupported EC curve {self.curve!r}: use one of {', '.join(EC_CURVES)}"
                )
            self._check_size_matches_curve()
        elif self.kty == "RSA":
            if self.curve is not None:
                raise UnsupportedKey("RSA keys have no curve")
            if self.size is None:
                object.__setattr__(self, "size", 2048)
            if self.size not in RSA_SIZES:
                raise UnsupportedKey(
                    f"unsupported RSA key size {self.size!r}: use one of "
                    f"{', '.join(str(s) for s in RSA_SIZES)}"
                )
        elif self.kty == "OKP":
            if self.curve is None:
                object.__setattr__(self, "curve", "Ed25519")
            if self.curve not in OKP_CURVES:
                raise UnsupportedKey(
                    f"unsupported OKP curve {self.curve!r}: use one of {', '.join(OKP_CURVES)}"
                )
            self._check_size_matches_curve()
        else:
            raise UnsupportedKey(f"unsupported key type {self.kty!r}: use EC, RSA or OKP")

    def _check_size_matches_curve(self) -> None:
        assert self.curve is not None
        if self.size is not None and self.size != _CURVE_BITS[self.curve]:
            raise UnsupportedKey(
                f"key size {self.size} does not match curve {self.curve}; leave the size out"
            )
        # The curve fixes the size; store None so equal specs compare equal.
        object.__setattr__(self, "size", None)

    @classmethod
    def parse(cls, kty: str, curve: str | None = None, size: int | None = None) -> KeySpec:
        """Normalise and validate operator input (case, curve aliases); raise UnsupportedKey."""
        normal_kty = kty.strip().upper() if isinstance(kty, str) else ""
        if normal_kty not in ("EC", "RSA", "OKP"):
            raise UnsupportedKey(f"unsupported key type {kty!r}: use EC, RSA or OKP")
        normal_curve: str | None = None
        if curve is not None and curve != "":
            normal_curve = _CURVE_ALIASES.get(curve.strip().lower(), curve)
        if size is not None and (isinstance(size, bool) or not isinstance(size, int)):
            raise UnsupportedKey(f"key size must be a whole number of bits, not {size!r}")
        if normal_kty == "EC" and normal_curve is None and size is not None:
            # "EC 384" names the curve by its size.
            normal_curve = {256: "P-256", 384: "P-384"}.get(size)
            if normal_curve is None:
                raise UnsupportedKey(f"no supported EC curve has {size} bits: use 256 or 384")
        return cls(cast(KeyType, normal_kty), normal_curve, size)

    @property
    def description(self) -> str:
        """Human name of the key kind, e.g. "EC P-256", "RSA 3072", "OKP Ed25519"."""
        if self.kty == "RSA":
            return f"RSA {self.size}"
        return f"{self.kty} {self.curve}"


@dataclass(frozen=True)
class KeyRef:
    """Names one key pair on one token: the private and public objects share label and id."""

    token_label: str
    label: str
    id: bytes

    def to_uri(self, module_path: str | None = None) -> str:
        """RFC 7512 URI of the private key: pkcs11:token=T;object=L;id=%01%02;type=private."""
        return Pkcs11Uri(
            token=self.token_label,
            object=self.label,
            id=self.id,
            type="private",
            module_path=module_path,
        ).format()

    def __str__(self) -> str:
        return self.to_uri()


class KeyStore(Protocol):
    """The operations the appliance needs from a token holding its CA keys."""

    @property
    def token_label(self) -> str: ...

    @property
    def module_path(self) -> str: ...

    @property
    def executor(self) -> concurrent.futures.Executor: ...

    def generate(self, spec: KeySpec, label: str, key_id: bytes | None = None) -> KeyRef: ...

    def find(self, label: str | None = None, key_id: bytes | None = None) -> KeyRef: ...

    def find_uri(self, uri: str | Pkcs11Uri) -> KeyRef: ...

    def public_key(self, ref: KeyRef) -> PublicKey: ...

    def private_key(self, ref: KeyRef) -> TokenPrivateKey: ...

    def check_protected(self, ref: KeyRef) -> None: ...

    def destroy(self, ref: KeyRef) -> None: ...

    def run(self, fn: Callable[..., T], *args: object) -> T: ...

    async def run_async(self, fn: Callable[..., T], *args: object) -> T: ...

    def close(self) -> None: ...
