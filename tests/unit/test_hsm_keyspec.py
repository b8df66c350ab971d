"""KeySpec: defaults, normalisation of operator input, and refusal of what we do not support."""

from __future__ import annotations

import pytest

from hsm.keystore import KeySpec, UnsupportedKey


@pytest.mark.parametrize(
    ("kty", "curve", "size", "expected"),
    [
        ("EC", None, None, KeySpec("EC", "P-256")),
        ("ec", "p-256", None, KeySpec("EC", "P-256")),
        ("EC", "secp256r1", None, KeySpec("EC", "P-256")),
        ("EC", "prime256v1", 256, KeySpec("EC", "P-256")),
        ("EC", "P-384", None, KeySpec("EC", "P-384")),
        ("EC", "secp384r1", None, KeySpec("EC", "P-384")),
        ("EC", None, 384, KeySpec("EC", "P-384")),
        (" Ec ", "", None, KeySpec("EC", "P-256")),
        ("RSA", None, None, KeySpec("RSA", size=2048)),
        ("rsa", None, 3072, KeySpec("RSA", size=3072)),
        ("RSA", None, 4096, KeySpec("RSA", size=4096)),
        ("OKP", None, None, KeySpec("OKP", "Ed25519")),
        ("okp", "ed25519", None, KeySpec("OKP", "Ed25519")),
    ],
)
def test_parse_normalises(kty: str, curve: str | None, size: int | None, expected: KeySpec) -> None:
    assert KeySpec.parse(kty, curve, size) == expected


@pytest.mark.parametrize(
    ("kty", "curve", "size", "reason"),
    [
        ("DSA", None, None, "unsupported key type"),
        ("", None, None, "unsupported key type"),
        ("EC", "P-521", None, "unsupported EC curve 'P-521'"),
        ("EC", "secp256k1", None, "unsupported EC curve"),
        ("EC", "P-256", 384, "does not match curve P-256"),
        ("EC", None, 521, "no supported EC curve has 521 bits"),
        ("RSA", None, 1024, "unsupported RSA key size 1024"),
        ("RSA", None, 2047, "unsupported RSA key size"),
        ("RSA", None, 8192, "unsupported RSA key size"),
        ("RSA", "P-256", None, "RSA keys have no curve"),
        ("OKP", "Ed448", None, "unsupported OKP curve 'Ed448'"),
        ("OKP", "X25519", None, "unsupported OKP curve"),
    ],
)
def test_parse_refuses_unsupported_keys(
    kty: str, curve: str | None, size: int | None, reason: str
) -> None:
    with pytest.raises(UnsupportedKey, match=reason):
        KeySpec.parse(kty, curve, size)


def test_size_must_be_an_integer() -> None:
    with pytest.raises(UnsupportedKey, match="whole number"):
        KeySpec.parse("RSA", None, True)
    with pytest.raises(UnsupportedKey, match="whole number"):
        KeySpec.parse("RSA", None, "2048")  # type: ignore[arg-type]


def test_direct_construction_fills_defaults_and_checks_spelling() -> None:
    assert KeySpec("EC") == KeySpec("EC", "P-256")
    assert KeySpec("RSA") == KeySpec("RSA", None, 2048)
    assert KeySpec("OKP") == KeySpec("OKP", "Ed25519")
    # Aliases are for parse(); the dataclass holds canonical names only.
    with pytest.raises(UnsupportedKey):
        KeySpec("EC", "secp256r1")
    with pytest.raises(UnsupportedKey):
        KeySpec("ec")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("spec", "description"),
    [
        (KeySpec("EC"), "EC P-256"),
        (KeySpec("EC", "P-384"), "EC P-384"),
        (KeySpec("RSA", size=3072), "RSA 3072"),
        (KeySpec("OKP"), "OKP Ed25519"),
    ],
)
def test_description(spec: KeySpec, description: str) -> None:
    assert spec.description == description


def test_specs_are_hashable_and_frozen() -> None:
    assert len({KeySpec("EC"), KeySpec.parse("ec", "secp256r1", None)}) == 1
    with pytest.raises(AttributeError):
        KeySpec("EC").curve = "P-384"  # type: ignore[misc]
