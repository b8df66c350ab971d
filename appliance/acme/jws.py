"""ACME's request authentication rules over appliance.jose (RFC 8555 §6.2-§6.5, §7.3.4, §7.3.5).

appliance.jose decodes the flattened JWS (strict base64url and JSON), turns JWKs into keys and
checks signatures; this module adds what RFC 8555 asks of a request: the algorithms ACME
accepts, a protected alg/nonce/url, jwk xor kid, the account-key policy, the external account
binding MAC and the keyChange inner JWS. `verify` checks the signature with the key the caller
chose (the embedded jwk for newAccount and certificate-key revokeCert, the account's stored key
for kid); checking the nonce and the url against the request is the caller's job. Every
refusal is an AcmeProblem whose detail says what is wrong. The signing helpers serve test
clients.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from appliance.acme.problems import AcmeProblem, from_appliance_error
from appliance.authority.csr import MAX_RSA_BITS, MIN_RSA_BITS
from appliance.jose import jwa
from appliance.jose import jwk as jose_jwk
from appliance.jose import jws as jose_jws
from appliance.jose.base64url import b64url_encode
from appliance.jose.errors import JoseError, UnsupportedAlgorithm, clip
from appliance.jose.jws import FlattenedJws, json_kind

# ES256 is mandatory and EdDSA recommended (§6.2); PS256 costs nothing more than RS256 here.
SUPPORTED_ALGS: tuple[str, ...] = ("RS256", "ES256", "ES384", "EdDSA", "PS256")
EAB_MAC_ALGS: tuple[str, ...] = tuple(jose_jws.MAC_ALGS)
JOSE_CONTENT_TYPE = "application/jose+json"
MAX_JWS_BYTES = 65536

SigningKey = jwa.SigningKey
PublicKey = jwa.PublicKey

_BASE64URL = re.compile(r"[A-Za-z0-9_-]*")
_MAC_BITS = {"HS256": 256, "HS384": 384, "HS512": 512}


@contextmanager
def _problems() -> Iterator[None]:
    """JOSE refusals as the ACME problems they are (malformed, badPublicKey, ...)."""
    try:
        yield
    except UnsupportedAlgorithm as e:
        raise AcmeProblem.bad_signature_algorithm(e.message, e.algorithms) from None
    except JoseError as e:
        raise from_appliance_error(e) from None


@dataclass(frozen=True)
class JwsMessage:
    """A flattened JWS request body whose shape is checked; its signature is not, until verify."""

    alg: str
    nonce: str
    url: str
    kid: str | None
    jwk: dict[str, Any] | None
    jws: FlattenedJws = field(repr=False)

    @property
    def protected(self) -> dict[str, Any]:
        return self.jws.protected

    @property
    def payload(self) -> bytes:
        return self.jws.payload

    @property
    def post_as_get(self) -> bool:
        """An empty payload (§6.3): a GET of the resource, not an update."""
        return self.jws.payload_b64 == ""

    def payload_json(self) -> dict[str, Any]:
        """The payload as a JSON object; malformed if it is empty, not UTF-8 JSON, or no object."""
        if self.post_as_get:
            raise AcmeProblem.malformed(
                "JWS payload is empty (POST-as-GET) but this request needs a JSON object")
        with _problems():
            value = jose_jws.json_value(self.payload, "JWS payload")
        if not isinstance(value, dict):
            raise AcmeProblem.malformed(
                f"JWS payload must be a JSON object, not {json_kind(value)}")
        return value


# -- parsing ---------------------------------------------------------------------------------
def parse(untrusted_body: bytes, max_bytes: int = MAX_JWS_BYTES) -> JwsMessage:
    """Check an ACME request body (§6.2): flattened JWS, protected alg/nonce/url, jwk xor kid."""
    if len(untrusted_body) > max_bytes:
        raise AcmeProblem.malformed(f"request body is larger than {max_bytes} bytes",
                                    status=413)
    with _problems():
        parts = jose_jws.parse_flattened(jose_jws.json_value(untrusted_body, "request body"))
    header = parts.protected
    alg = _request_alg(header.get("alg"), "JWS")
    has_jwk, has_kid = "jwk" in header, "kid" in header
    if has_jwk and has_kid:
        raise AcmeProblem.malformed(
            'JWS protected header has both "jwk" and "kid"; exactly one is allowed ("jwk" for '
            'newAccount and certificate-key revokeCert, "kid" otherwise)')
    if not has_jwk and not has_kid:
        raise AcmeProblem.malformed(
            'JWS protected header has neither "jwk" nor "kid"; exactly one is required')
    if "nonce" not in header:
        raise AcmeProblem.bad_nonce('JWS protected header has no "nonce"')
    nonce = header["nonce"]
    if not isinstance(nonce, str) or not nonce or not _BASE64URL.fullmatch(nonce):
        # §6.5.2: a nonce that is not base64url is malformed, not merely unacceptable.
        raise AcmeProblem.malformed('JWS "nonce" must be a non-empty base64url string')
    url = header.get("url")
    if not isinstance(url, str) or not url:
        raise AcmeProblem.malformed('JWS protected header has no "url" (a non-empty string)')
    kid: str | None = None
    jwk: dict[str, Any] | None = None
    if has_kid:
        kid = header["kid"]
        if not isinstance(kid, str) or not kid:
            raise AcmeProblem.malformed('JWS "kid" must be the account URL, a non-empty string')
    else:
        jwk = header["jwk"]
        _public_key(jwk, alg, "JWS jwk")
    return JwsMessage(alg=alg, nonce=nonce, url=url, kid=kid, jwk=jwk, jws=parts)


def _request_alg(alg: object, what: str) -> str:
    supported = ", ".join(SUPPORTED_ALGS)
    if alg is None:
        raise AcmeProblem.malformed(f"{what} protected header has no \"alg\"")
    if not isinstance(alg, str):
        raise AcmeProblem.malformed(f"{what} \"alg\" must be a string")
    if alg == "none":
        raise AcmeProblem.bad_signature_algorithm(
            f"{what} alg \"none\" is not allowed; use one of {supported}", SUPPORTED_ALGS)
    if alg.startswith("HS"):
        raise AcmeProblem.bad_signature_algorithm(
            f"{what} alg \"{clip(alg)}\" is a MAC algorithm, which ACME requests may not use; "
            f"use one of {supported}", SUPPORTED_ALGS)
    if alg not in SUPPORTED_ALGS:
        raise AcmeProblem.bad_signature_algorithm(
            f"{what} alg \"{clip(alg)}\" is not supported; use one of {supported}",
            SUPPORTED_ALGS)
    return alg


def _public_key(untrusted_jwk: object, alg: str, what: str) -> PublicKey:
    """The key of a public JWK that suits alg and the account-key policy, else badPublicKey."""
    with _problems():
        return jose_jwk.public_key(untrusted_jwk, alg, what,
                                   rsa_bits=(MIN_RSA_BITS, MAX_RSA_BITS))


# -- verification ----------------------------------------------------------------------------
def verify(message: JwsMessage, jwk: dict[str, Any]) -> None:
    """Check the signature with `jwk` (the embedded key, or the account's key for kid requests).

    RFC 8555 has no badSignature type, so a bad signature is malformed (as Boulder does).
    An alg that does not suit the key is badSignatureAlgorithm listing the algs that do.
    """
    fitting = algs_for_key(jwk)
    if message.alg not in fitting:
        raise AcmeProblem.bad_signature_algorithm(
            f"JWS alg {message.alg} does not suit the account key (kty "
            f"{clip(repr(jwk.get('kty')))}); use {' or '.join(fitting) or 'another key'}",
            fitting)
    key = _checked_key(jwk, message.alg)
    length_problem = _signature_length_problem(message.alg, key, len(message.jws.signature))
    if length_problem:
        raise AcmeProblem.malformed(f"JWS signature is invalid: {length_problem}")
    if not message.jws.signed_by(key, message.alg):
        raise AcmeProblem.malformed("JWS signature is invalid")


_KEY_CACHE: OrderedDict[tuple[str, str], PublicKey] = OrderedDict()
_KEY_CACHE_SIZE = 4096


def _checked_key(jwk: dict[str, Any], alg: str) -> PublicKey:
    """The account key, checked against the key policy, cached per key and alg.

    Every request of an account is signed by the same key: checking it against the key policy
    and building the key object once, not per request, is most of what verification costs.
    """
    try:
        ident = (alg, json.dumps(jwk, sort_keys=True))
    except (TypeError, ValueError):
        ident = None
    if ident is not None and ident in _KEY_CACHE:
        _KEY_CACHE.move_to_end(ident)
        return _KEY_CACHE[ident]
    key = _public_key(jwk, alg, "account key")
    if ident is not None:
        _KEY_CACHE[ident] = key
        while len(_KEY_CACHE) > _KEY_CACHE_SIZE:
            _KEY_CACHE.popitem(last=False)
    return key


def algs_for_key(jwk: Mapping[str, Any]) -> tuple[str, ...]:
    """The supported algs that a key of this type and curve can sign with."""
    fitting = jwa.algs_for(jwk.get("kty"), jwk.get("crv"))
    return tuple(alg for alg in SUPPORTED_ALGS if alg in fitting)


def _signature_length_problem(alg: str, key: PublicKey, length: int) -> str | None:
    expected = jwa.signature_size(alg, key)
    if expected is None or length == expected:
        return None
    hint = " (ECDSA signatures must be r||s, not DER)" if alg.startswith("ES") else ""
    return f"an {alg} signature for this key is {expected} bytes, not {length}{hint}"


# -- RFC 7638 thumbprints and challenge values -----------------------------------------------
def thumbprint(jwk: Mapping[str, Any]) -> str:
    """RFC 7638 SHA-256 thumbprint of a public JWK, base64url without padding."""
    with _problems():
        return jose_jwk.thumbprint(jwk)


def key_authorization(token: str, jwk: Mapping[str, Any]) -> str:
    """The key authorization of a challenge token (§8.1): token "." thumbprint."""
    return f"{token}.{thumbprint(jwk)}"


def dns01_txt_value(key_authorization: str) -> str:
    """The _acme-challenge TXT value (§8.4): base64url(SHA-256(key authorization))."""
    return b64url_encode(hashlib.sha256(key_authorization.encode("utf-8")).digest())


# -- external account binding (§7.3.4) and key rollover (§7.3.5) -----------------------------
def _nested_url(header: Mapping[str, Any], what: str, section: str) -> str:
    """The url of a JWS nested in a request (EAB, keyChange inner), which has no nonce."""
    if "nonce" in header:
        raise AcmeProblem.malformed(f"{what} must not have a \"nonce\" (RFC 8555 {section})")
    url = header.get("url")
    if not isinstance(url, str):
        raise AcmeProblem.malformed(f"{what} protected header has no \"url\"")
    return url


def verify_external_account_binding(eab: Any, outer_jwk: dict[str, Any], url: str,
                                    lookup: Callable[[str], bytes | None]) -> str:
    """Check a newAccount externalAccountBinding and return its key id (the EAB "kid")."""
    what = "externalAccountBinding"
    with _problems():
        parts = jose_jws.parse_flattened(eab, what)
    header = parts.protected
    alg = header.get("alg")
    if alg not in EAB_MAC_ALGS:
        raise AcmeProblem.malformed(f"{what} alg {clip(repr(alg))} is not a MAC algorithm; use "
                                    f"one of {', '.join(EAB_MAC_ALGS)}")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid or not kid.isascii():
        raise AcmeProblem.malformed(f"{what} protected header needs \"kid\", the external "
                                    "account key id (a non-empty ASCII string)")
    if "jwk" in header:
        raise AcmeProblem.malformed(f"{what} must name its MAC key with \"kid\", not carry a "
                                    "\"jwk\"")
    eab_url = _nested_url(header, what, "§7.3.4")
    if eab_url != url:
        raise AcmeProblem.unauthorized(
            f"{what} url {clip(repr(eab_url))} is not the newAccount URL {url!r}")
    mac_key = lookup(kid)
    if mac_key is None:
        raise AcmeProblem.unauthorized(f"unknown external account key {clip(repr(kid))}")
    if len(mac_key) * 8 < _MAC_BITS[alg]:
        # RFC 7518 §3.2: the key must be at least as long as the hash.
        usable = [a for a in EAB_MAC_ALGS if len(mac_key) * 8 >= _MAC_BITS[a]]
        raise AcmeProblem.malformed(
            f"{what} alg {alg} needs a MAC key of at least {_MAC_BITS[alg]} bits, and this "
            "external account key is shorter" + (f"; use {' or '.join(usable)}" if usable else ""))
    if not parts.mac_is_valid(alg, mac_key):
        raise AcmeProblem.unauthorized(f"{what} MAC is invalid")
    with _problems():
        bound_key = jose_jws.json_value(parts.payload, f"{what} payload")
    if bound_key != outer_jwk:
        raise AcmeProblem.unauthorized(
            f"{what} payload is not the account key of this request (the outer JWS \"jwk\")")
    return kid


def verify_key_change(inner: Any, outer: JwsMessage, account_url: str,
                      old_jwk: dict[str, Any]) -> dict[str, Any]:
    """Check a keyChange inner JWS (signed by the new key) and return the new key's JWK.

    The outer JWS must already be verified with `old_jwk`, the key of the account at
    `account_url`. Whether another account holds the new key (409) is the caller's to check.
    """
    what = "inner JWS"
    with _problems():
        parts = jose_jws.parse_flattened(inner, what)
    header = parts.protected
    alg = _request_alg(header.get("alg"), what)
    if "kid" in header:
        raise AcmeProblem.malformed(f"{what} must carry the new key in \"jwk\", not name a "
                                    "\"kid\"")
    if "jwk" not in header:
        raise AcmeProblem.malformed(f"{what} protected header has no \"jwk\" (the new account "
                                    "key)")
    inner_url = _nested_url(header, what, "§7.3.5")
    if inner_url != outer.url:
        raise AcmeProblem.malformed(f"{what} url {clip(repr(inner_url))} differs from the outer "
                                    f"JWS url {outer.url!r}")
    new_jwk: dict[str, Any] = header["jwk"]
    key = _public_key(new_jwk, alg, f"{what} jwk")
    length_problem = _signature_length_problem(alg, key, len(parts.signature))
    if length_problem or not parts.signed_by(key, alg):
        raise AcmeProblem.malformed(
            f"{what} signature is invalid: it does not verify with the new key in its \"jwk\""
            f"{'; ' + length_problem if length_problem else ''}")
    with _problems():
        change = jose_jws.json_value(parts.payload, f"{what} payload")
    if not isinstance(change, dict):
        raise AcmeProblem.malformed(f"{what} payload must be a keyChange JSON object, not "
                                    f"{json_kind(change)}")
    account = change.get("account")
    if not isinstance(account, str):
        raise AcmeProblem.malformed("keyChange object has no \"account\" (the account URL)")
    if account != account_url:
        raise AcmeProblem.malformed(f"keyChange account {clip(repr(account))} is not the account "
                                    f"that signed the request ({account_url!r})")
    old_key = change.get("oldKey")
    if not isinstance(old_key, dict):
        raise AcmeProblem.malformed(
            "keyChange object has no \"oldKey\" (the current account key as a JWK)")
    try:
        same_old_key = thumbprint(old_key) == thumbprint(old_jwk)
    except AcmeProblem:
        raise AcmeProblem.malformed("keyChange \"oldKey\" is not a valid public JWK") from None
    if not same_old_key:
        raise AcmeProblem.malformed("keyChange \"oldKey\" is not the current key of the account")
    if thumbprint(new_jwk) == thumbprint(old_jwk):
        raise AcmeProblem.malformed("keyChange new key is the same as the current account key")
    return dict(new_jwk)


# -- signing, for test clients ---------------------------------------------------------------
def public_jwk(key: SigningKey | PublicKey) -> dict[str, Any]:
    """The public JWK of a key (private or public), with only the RFC 7638 members.

    A public key serves revokeCert by certificate key: compare thumbprints with the cert's key.
    """
    if not isinstance(key, SigningKey | PublicKey):
        raise ValueError(f"no JWK form for {type(key).__name__}")
    try:
        return jose_jwk.public_jwk(key)
    except JoseError as e:
        raise ValueError(e.message) from None


def default_alg(key: SigningKey) -> str:
    """The alg a client would use with this key: RS256, ES256, ES384 or EdDSA."""
    algs = [alg for alg in jwa.algs_for_key(key) if alg in SUPPORTED_ALGS]
    if not algs:
        raise ValueError(f"no supported JWS alg for {type(key).__name__}")
    return algs[0]


def sign(key: SigningKey, payload: Mapping[str, Any] | None, *, url: str, nonce: str | None,
         kid: str | None = None, jwk: Mapping[str, Any] | None = None,
         alg: str | None = None) -> dict[str, Any]:
    """A flattened JWS as an ACME client sends it; payload None makes a POST-as-GET.

    With neither kid nor jwk the key's public JWK is embedded; nonce None omits the nonce (for
    a keyChange inner JWS).
    """
    if kid is not None and jwk is not None:
        raise ValueError("pass kid or jwk, not both")
    header: dict[str, Any] = {"alg": alg or default_alg(key)}
    if kid is not None:
        header["kid"] = kid
    else:
        header["jwk"] = dict(jwk) if jwk is not None else public_jwk(key)
    if nonce is not None:
        header["nonce"] = nonce
    header["url"] = url
    body = b"" if payload is None else jose_jws.json_bytes(payload)
    return jose_jws.sign_flattened(key, header, body)


def sign_eab(hmac_key: bytes, kid: str, outer_jwk: Mapping[str, Any], url: str,
             alg: str = "HS256") -> dict[str, Any]:
    """An externalAccountBinding value: the account key MACed under the external account key."""
    header = {"alg": alg, "kid": kid, "url": url}
    return jose_jws.mac_flattened(hmac_key, header, jose_jws.json_bytes(outer_jwk))
