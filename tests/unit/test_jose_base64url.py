"""The JOSE base64url codec accepts only canonical unpadded text."""

from __future__ import annotations

import pytest

from appliance.errors import BadRequest
from appliance.jose.base64url import JoseError, b64url_decode, b64url_encode


@pytest.mark.parametrize(
    "data", [b"", b"f", b"fo", b"foo", b"foob", b"\xfb\xff", bytes(range(256))],
)
def test_round_trip_without_padding(data: bytes) -> None:
    text = b64url_encode(data)
    assert "=" not in text and "+" not in text and "/" not in text
    assert b64url_decode(text) == data


@pytest.mark.parametrize("text", [
    "Zg==",      # padding
    "Zg=",
    "+_8",       # standard-alphabet character
    "/w",
    "Zm 9v",     # whitespace
    "Zm9v\n",
    "Zh",        # "f" with a non-zero unused trailing bit
    "Zm9",       # trailing bits set ("fo" is Zm8)
    "Z",         # a length no encoding produces
    "Zm9vY",
    "é",
])
def test_non_canonical_text_is_refused(text: str) -> None:
    with pytest.raises(JoseError):
        b64url_decode(text)


def test_the_error_is_a_bad_request() -> None:
    with pytest.raises(BadRequest):
        b64url_decode("Zg==")
    assert JoseError("x").status == 400


def test_a_non_string_is_refused() -> None:
    with pytest.raises(JoseError):
        b64url_decode(b"Zg")  # type: ignore[arg-type]


def test_the_message_names_the_value() -> None:
    with pytest.raises(JoseError, match='JWS "payload" is not base64url'):
        b64url_decode("a+b/", 'JWS "payload"')
    with pytest.raises(JoseError, match='JWS "protected" is not canonical base64url'):
        b64url_decode("e31", 'JWS "protected"')
