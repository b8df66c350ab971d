"""Key pairs as PKCS#11 objects: what generation asks for, how a public key is read back, and
what the token says of a private key. Pure functions over python-pkcs11 objects; the caller
runs them on the PKCS#11 thread.
"""

from __future__ import annotations

from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from pkcs11 import exceptions as p11
from pkcs11.constants import Attribute
from pkcs11.mechanisms import KeyType as P11KeyType
from pkcs11.mechanisms import Mechanism
from pkcs11.types import Object, PrivateKey

from hsm.errors import DeviceError, KeyNotFound, UnsupportedKey
from hsm.key_attributes import REQUIRED_KEY_ATTRIBUTES, KeyInspection
from hsm.keystore import KeyRef, KeySpec, PublicKey

__all__ = [
    "REQUIRED_MECHANISMS",
    "describe",
    "generation_templates",
    "inspect_private",
    "protection_failure",
    "public_key_from_object",
]

# DER of the ANSI X9.62 / RFC 8410 named-curve parameters (CKA_EC_PARAMS).
_EC_PARAMS: Final[dict[str, bytes]] = {
    "P-256": bytes.fromhex("06082a8648ce3d030107"),  # 1.2.840.10045.3.1.7
    "P-384": bytes.fromhex("06052b81040022"),  # 1.3.132.0.34
    "Ed25519": bytes.fromhex("06032b6570"),  # 1.3.101.112
}
# PKCS#11 3.0 also allows the curve name as a PrintableString for Edwards curves.
_ED25519_PRINTABLE: Final = b"\x13\x0cedwards25519"
_EC_CURVES: Final[dict[bytes, ec.EllipticCurve]] = {
    _EC_PARAMS["P-256"]: ec.SECP256R1(),
    _EC_PARAMS["P-384"]: ec.SECP384R1(),
}

# Mechanisms a token must offer for each key type: (generation, signing).
REQUIRED_MECHANISMS: Final[dict[str, tuple[Mechanism, Mechanism]]] = {
    "EC": (Mechanism.EC_KEY_PAIR_GEN, Mechanism.ECDSA),
    "RSA": (Mechanism.RSA_PKCS_KEY_PAIR_GEN, Mechanism.RSA_PKCS),
    "OKP": (Mechanism.EC_EDWARDS_KEY_PAIR_GEN, Mechanism.EDDSA),
}


def _attribute(name: str) -> Attribute:
    return Attribute[name.removeprefix("CKA_")]


def generation_templates(
    spec: KeySpec,
) -> tuple[P11KeyType, int | None, dict[Attribute, Any], dict[Attribute, Any]]:
    """Key type, length, public and private templates for generating a `spec` key pair.

    The private key gets every required attribute the token lets a template set: sensitive,
    never extractable, sign only, not modifiable. The public key is not modifiable either, so
    nobody can make it an encryption or wrapping key later.
    """
    public_template: dict[Attribute, Any] = {
        Attribute.TOKEN: True,
        Attribute.PRIVATE: False,
        Attribute.VERIFY: True,
        Attribute.ENCRYPT: False,
        Attribute.WRAP: False,
        Attribute.MODIFIABLE: False,
    }
    private_template: dict[Attribute, Any] = {
        _attribute(required.name): required.value
        for required in REQUIRED_KEY_ATTRIBUTES
        if not required.set_by_token
    }
    if spec.kty == "EC":
        assert spec.curve is not None
        public_template[Attribute.EC_PARAMS] = _EC_PARAMS[spec.curve]
        return P11KeyType.EC, None, public_template, private_template
    if spec.kty == "RSA":
        return P11KeyType.RSA, spec.size, public_template, private_template
    public_template[Attribute.EC_PARAMS] = _EC_PARAMS["Ed25519"]
    return P11KeyType.EC_EDWARDS, None, public_template, private_template


def protection_failure(private: PrivateKey) -> str | None:
    """Why the server must not serve with this key (the first required attribute that is
    wrong), or None when every attribute it checks is right."""
    for required in REQUIRED_KEY_ATTRIBUTES:
        if required.serving_refusal is None:
            continue
        try:
            value = private[_attribute(required.name)]
        except p11.AttributeTypeInvalid:
            value = None
        if value is None:
            return f"the token does not report {required.name}"
        if value is not required.value:
            return required.serving_refusal
    return None


def inspect_private(private: PrivateKey) -> KeyInspection:
    """Every required attribute as the token reports it, and whether it refuses the secret."""
    attributes: dict[str, bool | None] = {}
    for required in REQUIRED_KEY_ATTRIBUTES:
        try:
            value = private[_attribute(required.name)]
        except (p11.AttributeTypeInvalid, p11.AttributeSensitive):
            value = None
        attributes[required.name] = value if isinstance(value, bool) else None
    secret = Attribute.PRIVATE_EXPONENT if private.key_type == P11KeyType.RSA else Attribute.VALUE
    try:
        private[secret]
    except p11.AttributeSensitive:
        refusal = "CKR_ATTRIBUTE_SENSITIVE"
    except p11.AttributeTypeInvalid:
        refusal = "CKR_ATTRIBUTE_TYPE_INVALID"
    except p11.PKCS11Error as e:
        refusal = type(e).__name__
    else:
        refusal = ""  # the token handed the secret out; it is dropped, never shown
    return KeyInspection(attributes, f"CKA_{secret.name}", refusal)


def describe(label: str | None, key_id: bytes | None) -> str:
    """'labelled 'x' and with id 0102' for messages."""
    parts = []
    if label is not None:
        parts.append(f"labelled {label!r}")
    if key_id is not None:
        parts.append(f"with id {key_id.hex()}")
    return " and ".join(parts)


def public_key_from_object(obj: Object, ref: KeyRef, *, has_public_object: bool) -> PublicKey:
    """The cryptography public key of a public key object (or, for RSA, of the private one)."""
    key_type = obj[Attribute.KEY_TYPE]
    if key_type == P11KeyType.RSA:
        modulus = int.from_bytes(obj[Attribute.MODULUS], "big")
        exponent = int.from_bytes(obj[Attribute.PUBLIC_EXPONENT], "big")
        return rsa.RSAPublicNumbers(exponent, modulus).public_key()
    if not has_public_object:
        raise KeyNotFound(
            f"the public key object of {ref.label!r} (id {ref.id.hex()}) is missing from "
            f"token {ref.token_label!r}"
        )
    params = bytes(obj[Attribute.EC_PARAMS])
    point = bytes(obj[Attribute.EC_POINT])
    if key_type == P11KeyType.EC:
        curve = _EC_CURVES.get(params)
        if curve is None:
            raise UnsupportedKey(f"key {ref.label!r} is on an EC curve this appliance does not use")
        raw_length = 1 + 2 * ((curve.key_size + 7) // 8)
        return ec.EllipticCurvePublicKey.from_encoded_point(
            curve, _unwrap_octet_string(point, raw_length)
        )
    if key_type == P11KeyType.EC_EDWARDS:
        if params not in (_EC_PARAMS["Ed25519"], _ED25519_PRINTABLE):
            raise UnsupportedKey(f"key {ref.label!r} is on an Edwards curve other than Ed25519")
        return ed25519.Ed25519PublicKey.from_public_bytes(_unwrap_octet_string(point, 32))
    raise UnsupportedKey(f"key {ref.label!r} is of a type this appliance does not use")


def _unwrap_octet_string(value: bytes, raw_length: int) -> bytes:
    """CKA_EC_POINT is a DER OCTET STRING by the standard, but some tokens store it bare."""
    if len(value) == raw_length:
        return value
    if len(value) < 2 or value[0] != 0x04:
        raise DeviceError("the token returned a malformed EC point")
    length = value[1]
    offset = 2
    if length & 0x80:
        count = length & 0x7F
        length = int.from_bytes(value[2 : 2 + count], "big")
        offset = 2 + count
    body = value[offset:]
    if len(body) != length or length != raw_length:
        raise DeviceError("the token returned a malformed EC point")
    return body
