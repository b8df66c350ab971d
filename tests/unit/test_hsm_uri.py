"""RFC 7512 pkcs11: URIs: parsing, percent-encoding, formatting, and what is refused."""

# "token" here is a PKCS#11 token label, not a secret.
# ruff: noqa: S105, S106

from __future__ import annotations

import pytest

from hsm.errors import HsmError
from hsm.keystore import KeyRef
from hsm.uri import InvalidPkcs11Uri, Pkcs11Uri


def test_parse_reads_every_supported_attribute() -> None:
    uri = Pkcs11Uri.parse(
        "pkcs11:token=Issuer;object=intermediate;id=%01%02%FF;type=private"
        "?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/appliance/pin"
    )
    assert uri == Pkcs11Uri(
        token="Issuer",
        object="intermediate",
        id=b"\x01\x02\xff",
        type="private",
        module_path="/usr/lib/softhsm/libsofthsm2.so",
        pin_source="file:/etc/appliance/pin",
    )


def test_absent_attributes_are_none() -> None:
    assert Pkcs11Uri.parse("pkcs11:") == Pkcs11Uri()
    assert Pkcs11Uri.parse("pkcs11:object=k") == Pkcs11Uri(object="k")


def test_percent_decoding_yields_utf8_text_and_raw_id_bytes() -> None:
    uri = Pkcs11Uri.parse("pkcs11:token=My%20Token;object=cl%C3%A9%3B%2Fx;id=ab")
    assert uri.token == "My Token"
    assert uri.object == "clé;/x"
    # An id given literally is the bytes of those characters.
    assert uri.id == b"ab"


def test_format_percent_encodes_what_the_rfc_requires() -> None:
    uri = Pkcs11Uri(token="My Token", object="a;b/c?d", id=b"\x01\xab", type="private")
    assert uri.format() == "pkcs11:token=My%20Token;object=a%3Bb%2Fc%3Fd;id=%01%AB;type=private"
    assert str(uri) == uri.format()
    with_query = Pkcs11Uri(object="k", module_path="/opt/my hsm/lib.so", pin_source="|/bin/pin")
    assert with_query.format() == (
        "pkcs11:object=k?module-path=/opt/my%20hsm/lib.so&pin-source=|/bin/pin"
    )


@pytest.mark.parametrize(
    "uri",
    [
        Pkcs11Uri(),
        Pkcs11Uri(token="Issuer", object="intermediate", id=b"\x00\x01", type="private"),
        Pkcs11Uri(token="t=1&2", object="ünïcode ;?/%", id=bytes(range(256))),
        Pkcs11Uri(object="k", module_path="/usr/lib/x.so", pin_source="file:/run/pin file"),
        Pkcs11Uri(id=b"", token=""),
    ],
)
def test_format_and_parse_round_trip(uri: Pkcs11Uri) -> None:
    assert Pkcs11Uri.parse(uri.format()) == uri
    assert Pkcs11Uri.parse(str(uri)).format() == uri.format()


def test_scheme_and_attribute_names_are_case_insensitive() -> None:
    assert Pkcs11Uri.parse("PKCS11:Object=k;ID=%01") == Pkcs11Uri(object="k", id=b"\x01")


def test_key_ref_to_uri() -> None:
    ref = KeyRef(token_label="Issuer", label="intermediate", id=b"\x01\x02")
    assert ref.to_uri() == "pkcs11:token=Issuer;object=intermediate;id=%01%02;type=private"
    assert ref.to_uri("/usr/lib/softhsm/libsofthsm2.so") == (
        "pkcs11:token=Issuer;object=intermediate;id=%01%02;type=private"
        "?module-path=/usr/lib/softhsm/libsofthsm2.so"
    )
    parsed = Pkcs11Uri.parse(ref.to_uri())
    assert (parsed.token, parsed.object, parsed.id) == (ref.token_label, ref.label, ref.id)


@pytest.mark.parametrize(
    "text",
    [
        "pkcs11:object=k?pin-value=1234",
        "pkcs11:object=k?module-path=/x.so&pin-value=1234",
        "pkcs11:object=k;pin-value=1234",
    ],
)
def test_pin_value_is_refused(text: str) -> None:
    with pytest.raises(InvalidPkcs11Uri) as caught:
        Pkcs11Uri.parse(text)
    message = str(caught.value)
    assert "1234" not in message
    if "?" in text:
        assert "PINs do not belong in URIs" in message


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("http://example.com/", "must start with 'pkcs11:'"),
        ("object=k", "must start with 'pkcs11:'"),
        ("", "must start with 'pkcs11:'"),
        ("pkcs11:object", "expected name=value"),
        ("pkcs11:=k", "expected name=value"),
        ("pkcs11:object=a;object=b", "more than once"),
        ("pkcs11:serial=1234", "unsupported pkcs11 URI path attribute 'serial'"),
        ("pkcs11:x-vendor=1", "unsupported"),
        ("pkcs11:object=k?module-name=softhsm2", "unsupported pkcs11 URI query attribute"),
        ("pkcs11:module-path=/x.so", "belongs in the query"),
        ("pkcs11:type=secret", "type must be one of"),
        ("pkcs11:object=a b", "percent-encoded"),
        ("pkcs11:object=%zz", "percent"),
        ("pkcs11:object=a/b", "percent-encoded"),
        ("pkcs11:object=%FF", "not UTF-8"),
    ],
)
def test_invalid_uris_are_refused_with_a_reason(text: str, reason: str) -> None:
    with pytest.raises(InvalidPkcs11Uri, match=reason.replace("(", r"\(").replace(")", r"\)")):
        Pkcs11Uri.parse(text)


def test_invalid_uri_is_both_a_value_error_and_an_hsm_error() -> None:
    with pytest.raises(ValueError):
        Pkcs11Uri.parse("nope")
    with pytest.raises(HsmError):
        Pkcs11Uri.parse("nope")


def test_constructing_with_an_unknown_type_is_refused() -> None:
    with pytest.raises(InvalidPkcs11Uri):
        Pkcs11Uri(type="key")
