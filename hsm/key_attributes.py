"""The one table of what a CA private key's attributes must be.

Three users read it: key generation (the attributes a template sets), the server's start-up
check (Pkcs11KeyStore.check_protected: the attributes it refuses to serve without) and
`applianctl kms check` (every row, with what the right value means). It names attributes by
their PKCS#11 names, so it can be read without loading python-pkcs11.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

__all__ = ["REQUIRED_KEY_ATTRIBUTES", "RequiredAttribute", "KeyInspection"]


@dataclass(frozen=True)
class RequiredAttribute:
    """One attribute of a CA private key and the value it must have."""

    name: str  # "CKA_SENSITIVE"
    value: bool
    meaning: str  # what the right value says about the key (kms check prints it)
    # Why the server refuses to serve when the value is wrong; None: kms check reports it only.
    serving_refusal: str | None = None
    # The token sets it (CKA_LOCAL ...); a generation template cannot ask for it.
    set_by_token: bool = False


REQUIRED_KEY_ATTRIBUTES: Final[tuple[RequiredAttribute, ...]] = (
    RequiredAttribute("CKA_TOKEN", True, "stored on the token, not a session object"),
    RequiredAttribute("CKA_PRIVATE", True, "usable only after login with the PIN",
                      "CKA_PRIVATE is false (the key is usable without logging in)"),
    RequiredAttribute("CKA_SENSITIVE", True, "the token never reveals the key's value",
                      "CKA_SENSITIVE is false (the key value can be read)"),
    RequiredAttribute("CKA_ALWAYS_SENSITIVE", True, "it never has",
                      "CKA_ALWAYS_SENSITIVE is false (the key was once readable)",
                      set_by_token=True),
    RequiredAttribute("CKA_EXTRACTABLE", False, "it cannot be wrapped out of the token",
                      "CKA_EXTRACTABLE is true (the key can be exported)"),
    RequiredAttribute("CKA_NEVER_EXTRACTABLE", True, "it never could be",
                      "CKA_NEVER_EXTRACTABLE is false (the key was once exportable)",
                      set_by_token=True),
    RequiredAttribute("CKA_LOCAL", True, "generated inside the token, not imported",
                      set_by_token=True),
    RequiredAttribute("CKA_SIGN", True, "it signs"),
    RequiredAttribute("CKA_DECRYPT", False, "it decrypts nothing"),
    RequiredAttribute("CKA_UNWRAP", False, "it unwraps nothing"),
    RequiredAttribute("CKA_DERIVE", False, "it derives nothing"),
    # Without it a PIN holder could C_SetAttributeValue CKA_DERIVE or CKA_DECRYPT to true. Keys
    # made before it was required have it true: kms check reports them, the server still serves.
    RequiredAttribute("CKA_MODIFIABLE", False, "its attributes cannot be changed (nobody can "
                      "turn on decrypt or derive)"),
)


@dataclass(frozen=True)
class KeyInspection:
    """A private key as the token describes it (see Pkcs11KeyStore.inspect)."""

    attributes: dict[str, bool | None]  # "CKA_SENSITIVE" -> True; None: not reported
    secret_attribute: str  # CKA_VALUE (EC, EdDSA) or CKA_PRIVATE_EXPONENT (RSA)
    secret_refusal: str  # the token's answer when asked for it; "" if it gave it out
