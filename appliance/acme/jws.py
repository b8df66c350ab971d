"""ACME's JWS layer over jwcrypto (RFC 8555 §6.2-§6.5, §7.3.4, §7.3.5; RFC 7638).

Nothing else in the project parses JWS. `parse` checks the shape of an untrusted request body and
refuses what RFC 8555 forbids; `verify` checks the signature with the key the caller chose (the
embedded jwk for newAccount and certificate-key revokeCert, the account's stored key for kid);
checking the nonce and the url against the request is the caller's job. Every refusal is an
AcmeProblem whose detail says what is wrong. The signing helpers serve test clients.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn

from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwcrypto.common import JWException
from jwcrypto.jwk import JWK
from jwcrypto.jws import JWS

from appliance import strict_json
from appliance.acme.problems import AcmeProblem
from appliance.authority.csr import MAX_RSA_BITS, MIN_RSA_BITS
from appliance.jws_signature import signature_is_valid

# ES256 is mandatory and EdDSA recommended (§6.2); PS256 costs nothing more than RS256 here.
SUPPORTED_ALGS: tuple[str, ...] = ("RS256", "ES256", "ES384", "EdDSA", "PS256")
EAB_MAC_ALGS: tuple[str, ...] = ("HS256", "HS384", "HS512")
JOSE_CONTENT_TYPE = "application/jose+json"
MAX_JWS_BYTES = 65536

SigningKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey

_FLATTENED_MEMBERS = ("protected", "payload", "signature")
_BASE64URL = re.compile(r"[A-Za-z0-9_-]*")
# RFC 7638 §3.2: the members a thumbprint covers, which are also all a public key needs.
_PUBLIC_MEMBERS = {"RSA": ("e", "kty", "n"), "EC": ("crv", "kty", "x", "y"),
                   "OKP": ("crv", "kty", "x")}
_PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "oth", "k")
_KEY_FOR_ALG = {"RS256": ("RSA", None), "PS256": ("RSA", None), "ES256": ("EC", "P-256"),
                "ES384": ("EC", "P-384"), "EdDSA": ("OKP", "Ed25519")}
_COORDINATE_BYTES = {"P-256": 32, "P-384": 48, "Ed25519": 32}
# JWS ECDSA signatures are r||s at the curve's size (RFC 7518 §3.4), so a DER one is refused.
_SIGNATURE_BYTES = {"ES256": 64, "ES384": 96, "EdDSA": 64}
_MAC_BITS = {"HS256": 256, "HS384": 384, "HS512": 512}
# NIST SP 800-89 bounds e from above; a huge exponent would make each verification costly.
_MAX_RSA_EXPONENT = 2**256


@dataclass(frozen=True)
class JwsMessage:
    """A flattened JWS request body whose shape is checked; its signature is not, until verify."""

    protected: dict[str, Any]
    payload: bytes
    post_as_get: bool
    alg: str
    nonce: str
    url: str
    kid: str | None
    jwk: dict[str, Any] | None
    _protected_b64: str = field(repr=False)
    _payload_b64: str = field(repr=False)
    _signature_b64: str = field(repr=False)

    def payload_json(self) -> dict[str, Any]:
        """The payload as a JSON object; malformed if it is empty, not UTF-8 JSON, or no object."""
        if self.post_as_get:
            _malformed("JWS payload is empty (POST-as-GET) but this request needs a JSON object")
        value = _json_loads(self.payload, "JWS payload")
        if not isinstance(value, dict):
            _malformed(f"JWS payload must be a JSON object, not {_json_kind(value)}")
        return value


@dataclass(frozen=True)
class _Flattened:
    protected: dict[str, Any]
    payload: bytes
    signature: bytes
    protected_b64: str
    payload_b64: str
    signature_b64: str


# -- parsing ---------------------------------------------------------------------------------
def parse(untrusted_body: bytes, max_bytes: int = MAX_JWS_BYTES) -> JwsMessage:
    """Check an ACME request body (§6.2): flattened JWS, protected alg/nonce/url, jwk xor kid."""
    if len(untrusted_body) > max_bytes:
        raise AcmeProblem.malformed(f"request body is larger than {max_bytes} bytes",
                                    status=413)
    parts = _split_flattened(_json_loads(untrusted_body, "request body"), "JWS")
    header = parts.protected
    alg = _request_alg(header.get("alg"), "JWS")
    has_jwk, has_kid = "jwk" in header, "kid" in header
    if has_jwk and has_kid:
        _malformed('JWS protected header has both "jwk" and "kid"; exactly one is allowed '
                   '("jwk" for newAccount and certificate-key revokeCert, "kid" otherwise)')
    if not has_jwk and not has_kid:
        _malformed('JWS protected header has neither "jwk" nor "kid"; exactly one is required')
    if "nonce" not in header:
        raise AcmeProblem.bad_nonce('JWS protected header has no "nonce"')
    nonce = header["nonce"]
    if not isinstance(nonce, str) or not nonce or not _BASE64URL.fullmatch(nonce):
        # §6.5.2: a nonce that is not base64url is malformed, not merely unacceptable.
        _malformed('JWS "nonce" must be a non-empty base64url string')
    url = header.get("url")
    if not isinstance(url, str) or not url:
        _malformed('JWS protected header has no "url" (a non-empty string)')
    kid: str | None = None
    jwk: dict[str, Any] | None = None
    if has_kid:
        kid = header["kid"]
        if not isinstance(kid, str) or not kid:
            _malformed('JWS "kid" must be the account URL, a non-empty string')
    else:
        jwk = header["jwk"]
        _public_key(jwk, alg, "JWS jwk")
    return JwsMessage(protected=header, payload=parts.payload, post_as_get=parts.payload_b64 == "",
                      alg=alg, nonce=nonce, url=url, kid=kid, jwk=jwk,
                      _protected_b64=parts.protected_b64, _payload_b64=parts.payload_b64,
                      _signature_b64=parts.signature_b64)


def _split_flattened(untrusted: object, what: str) -> _Flattened:
    """Decode a flattened JWS object whose members are exactly protected, payload, signature."""
    if not isinstance(untrusted, dict):
        _malformed(f"{what} must be a JSON object in the flattened JWS JSON serialization, "
                   f"not {_json_kind(untrusted)}")
    if "signatures" in untrusted:
        _malformed(f"{what} uses the general JWS JSON serialization (\"signatures\"); "
                   "only the flattened serialization with one signature is accepted")
    if "header" in untrusted:
        _malformed(f"{what} has an unprotected \"header\"; every header parameter must be in "
                   "\"protected\"")
    missing = [m for m in _FLATTENED_MEMBERS if m not in untrusted]
    if missing:
        _malformed(f"{what} has no {_quoted(missing)} member")
    extra = sorted(set(untrusted) - set(_FLATTENED_MEMBERS))
    if extra:
        _malformed(f"{what} has unexpected member(s) {_quoted(extra)}; only \"protected\", "
                   "\"payload\" and \"signature\" are allowed")
    protected_b64, payload_b64, signature_b64 = (untrusted[m] for m in _FLATTENED_MEMBERS)
    protected_raw = _b64url_decode(protected_b64, f"{what} \"protected\"")
    payload = _b64url_decode(payload_b64, f"{what} \"payload\"")
    signature = _b64url_decode(signature_b64, f"{what} \"signature\"")
    if not signature:
        _malformed(f"{what} \"signature\" is empty")
    header = _json_loads(protected_raw, f"{what} protected header")
    if not isinstance(header, dict):
        _malformed(f"{what} protected header must be a JSON object, not {_json_kind(header)}")
    if "b64" in header:
        # RFC 7797 unencoded payloads are refused by §6.2; "b64" would also need "crit".
        _malformed(f"{what} protected header has \"b64\"; the unencoded payload option "
                   "(RFC 7797) is not allowed")
    if "crit" in header:
        _malformed(f"{what} protected header has \"crit\"; no critical extensions are supported")
    return _Flattened(header, payload, signature, protected_b64, payload_b64, signature_b64)


def _request_alg(alg: object, what: str) -> str:
    supported = ", ".join(SUPPORTED_ALGS)
    if alg is None:
        _malformed(f"{what} protected header has no \"alg\"")
    if not isinstance(alg, str):
        _malformed(f"{what} \"alg\" must be a string")
    if alg == "none":
        raise AcmeProblem.bad_signature_algorithm(
            f"{what} alg \"none\" is not allowed; use one of {supported}", SUPPORTED_ALGS)
    if alg.startswith("HS"):
        raise AcmeProblem.bad_signature_algorithm(
            f"{what} alg \"{_clip(alg)}\" is a MAC algorithm, which ACME requests may not use; "
            f"use one of {supported}", SUPPORTED_ALGS)
    if alg not in SUPPORTED_ALGS:
        raise AcmeProblem.bad_signature_algorithm(
            f"{what} alg \"{_clip(alg)}\" is not supported; use one of {supported}",
            SUPPORTED_ALGS)
    return alg


def _public_key(untrusted_jwk: object, alg: str, what: str) -> JWK:
    """The jwcrypto key for a public JWK that suits alg and the key policy, else badPublicKey."""
    if not isinstance(untrusted_jwk, dict):
        _bad_key(f"{what} must be a JSON object")
    private = [m for m in _PRIVATE_MEMBERS if m in untrusted_jwk]
    if private:
        _bad_key(f"{what} holds private key material ({_quoted(private)}); send only the "
                 "public key")
    kty, crv = untrusted_jwk.get("kty"), untrusted_jwk.get("crv")
    want_kty, want_crv = _KEY_FOR_ALG[alg]
    wanted = f"an {want_kty} {want_crv} key" if want_crv else f"an {want_kty} key"
    if kty != want_kty:
        _bad_key(f"alg {alg} needs {wanted}, but {what} has kty {_clip(repr(kty))}")
    if want_crv is not None and crv != want_crv:
        _bad_key(f"alg {alg} needs {wanted}, but {what} has crv {_clip(repr(crv))}")
    members = {}
    for name in _PUBLIC_MEMBERS[want_kty]:
        value = untrusted_jwk.get(name)
        if not isinstance(value, str) or not value:
            _bad_key(f"{what} has no \"{name}\" member (a non-empty string)")
        members[name] = value
    for name in ("x", "y"):
        if name in members and want_crv is not None:
            size = len(_b64url_decode(members[name], f"{what} \"{name}\"", _bad_key))
            if size != _COORDINATE_BYTES[want_crv]:
                _bad_key(f"{what} \"{name}\" must be {_COORDINATE_BYTES[want_crv]} bytes for "
                         f"{want_crv}, not {size}")
    if want_kty == "RSA":
        n = _b64url_decode(members["n"], f"{what} \"n\"", _bad_key)
        bits = int.from_bytes(n, "big").bit_length()
        if bits < MIN_RSA_BITS:
            _bad_key(f"{what} is an RSA key of {bits} bits; at least {MIN_RSA_BITS} are required")
        if bits > MAX_RSA_BITS:
            _bad_key(f"{what} is an RSA key of {bits} bits; at most {MAX_RSA_BITS} are allowed")
        exponent = _b64url_decode(members["e"], f"{what} \"e\"", _bad_key)
        if int.from_bytes(exponent, "big") >= _MAX_RSA_EXPONENT:
            _bad_key(f"{what} has an RSA exponent of 2^256 or more")
    try:
        key = JWK(**members)
        key.get_op_key("verify")  # builds the cryptography key: rejects points off the curve
    except (JWException, ValueError, TypeError):
        _bad_key(f"{what} is not a valid {want_kty}{' ' + want_crv if want_crv else ''} "
                 "public key")
    return key


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
            f"{_clip(repr(jwk.get('kty')))}); use {' or '.join(fitting) or 'another key'}",
            fitting)
    key, verifier = _checked_key(jwk, message.alg)
    signature = _b64url_decode(message._signature_b64, "JWS \"signature\"")
    length_problem = _signature_length_problem(message.alg, key, len(signature))
    if length_problem:
        _malformed(f"JWS signature is invalid: {length_problem}")
    signing_input = f"{message._protected_b64}.{message._payload_b64}".encode("ascii")
    if not signature_is_valid(verifier, message.alg, signature, signing_input):
        _malformed("JWS signature is invalid")


_KEY_CACHE: OrderedDict[tuple[str, str], tuple[JWK, Any]] = OrderedDict()
_KEY_CACHE_SIZE = 4096


def _checked_key(jwk: dict[str, Any], alg: str) -> tuple[JWK, Any]:
    """The checked jwcrypto key and its cryptography public key, cached per key and alg.

    Every request of an account is signed by the same key: checking it against the key policy
    and building key objects once, not per request, is most of what verification costs.
    """
    try:
        ident = (alg, json.dumps(jwk, sort_keys=True))
    except (TypeError, ValueError):
        ident = None
    if ident is not None and ident in _KEY_CACHE:
        _KEY_CACHE.move_to_end(ident)
        return _KEY_CACHE[ident]
    key = _public_key(jwk, alg, "account key")
    entry = (key, key.get_op_key("verify"))
    if ident is not None:
        _KEY_CACHE[ident] = entry
        while len(_KEY_CACHE) > _KEY_CACHE_SIZE:
            _KEY_CACHE.popitem(last=False)
    return entry


def algs_for_key(jwk: Mapping[str, Any]) -> tuple[str, ...]:
    """The supported algs that a key of this type and curve can sign with."""
    return tuple(alg for alg in SUPPORTED_ALGS
                 if _KEY_FOR_ALG[alg] in ((jwk.get("kty"), jwk.get("crv")),
                                          (jwk.get("kty"), None)))


def _signature_length_problem(alg: str, key: JWK, length: int) -> str | None:
    if alg in _SIGNATURE_BYTES:
        expected = _SIGNATURE_BYTES[alg]
    else:
        expected = (_b64url_int(key["n"]).bit_length() + 7) // 8
    if length == expected:
        return None
    hint = " (ECDSA signatures must be r||s, not DER)" if alg.startswith("ES") else ""
    return f"an {alg} signature for this key is {expected} bytes, not {length}{hint}"


def _signature_valid(protected_b64: str, payload_b64: str, signature_b64: str, alg: str,
                     key: JWK) -> bool:
    # The b64 members are canonical (checked when decoded), so jwcrypto, which re-encodes what
    # it decoded, verifies over exactly the bytes the client sent.
    token = JWS()
    token.allowed_algs = [alg]
    try:
        token.deserialize(json.dumps({"protected": protected_b64, "payload": payload_b64,
                                      "signature": signature_b64}))
        token.verify(key, alg=alg)
    except (JWException, ValueError, TypeError):
        return False
    return True


# -- RFC 7638 thumbprints and challenge values -----------------------------------------------
def thumbprint(jwk: Mapping[str, Any]) -> str:
    """RFC 7638 SHA-256 thumbprint of a public JWK, base64url without padding."""
    kty = jwk.get("kty")
    if kty not in _PUBLIC_MEMBERS:
        _bad_key(f"cannot take the thumbprint of a key with kty {_clip(repr(kty))}")
    names = _PUBLIC_MEMBERS[str(kty)]
    values = tuple(jwk.get(name) for name in names)
    if not all(isinstance(value, str) and value for value in values):
        _bad_key(f"cannot take the thumbprint of an incomplete {kty} key")
    return _thumbprint(names, values)


@functools.lru_cache(maxsize=4096)
def _thumbprint(names: tuple[str, ...], values: tuple[str, ...]) -> str:
    # Cached: an account's thumbprint is taken for every challenge it validates; a refusal
    # raises, so only valid keys are remembered.
    members = dict(zip(names, values, strict=True))
    try:
        return str(JWK(**members).thumbprint())
    except (JWException, ValueError, TypeError):
        _bad_key(f"cannot take the thumbprint of an invalid {members['kty']} key")


def key_authorization(token: str, jwk: Mapping[str, Any]) -> str:
    """The key authorization of a challenge token (§8.1): token "." thumbprint."""
    return f"{token}.{thumbprint(jwk)}"


def dns01_txt_value(key_authorization: str) -> str:
    """The _acme-challenge TXT value (§8.4): base64url(SHA-256(key authorization))."""
    return _b64url_encode(hashlib.sha256(key_authorization.encode("utf-8")).digest())


# -- external account binding (§7.3.4) and key rollover (§7.3.5) -----------------------------
def verify_external_account_binding(eab: Any, outer_jwk: dict[str, Any], url: str,
                                    lookup: Callable[[str], bytes | None]) -> str:
    """Check a newAccount externalAccountBinding and return its key id (the EAB "kid")."""
    what = "externalAccountBinding"
    parts = _split_flattened(eab, what)
    header = parts.protected
    alg = header.get("alg")
    if alg not in EAB_MAC_ALGS:
        _malformed(f"{what} alg {_clip(repr(alg))} is not a MAC algorithm; use one of "
                   f"{', '.join(EAB_MAC_ALGS)}")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid or not kid.isascii():
        _malformed(f"{what} protected header needs \"kid\", the external account key id "
                   "(a non-empty ASCII string)")
    if "jwk" in header:
        _malformed(f"{what} must name its MAC key with \"kid\", not carry a \"jwk\"")
    if "nonce" in header:
        _malformed(f"{what} must not have a \"nonce\" (RFC 8555 §7.3.4)")
    eab_url = header.get("url")
    if not isinstance(eab_url, str):
        _malformed(f"{what} protected header has no \"url\"")
    if eab_url != url:
        raise AcmeProblem.unauthorized(
            f"{what} url {_clip(repr(eab_url))} is not the newAccount URL {url!r}")
    mac_key = lookup(kid)
    if mac_key is None:
        raise AcmeProblem.unauthorized(f"unknown external account key {_clip(repr(kid))}")
    if len(mac_key) * 8 < _MAC_BITS[alg]:
        # RFC 7518 §3.2: the key must be at least as long as the hash; jwcrypto enforces it.
        usable = [a for a in EAB_MAC_ALGS if len(mac_key) * 8 >= _MAC_BITS[a]]
        _malformed(f"{what} alg {alg} needs a MAC key of at least {_MAC_BITS[alg]} bits, and "
                   "this external account key is shorter"
                   + (f"; use {' or '.join(usable)}" if usable else ""))
    mac = JWK(kty="oct", k=_b64url_encode(mac_key))
    if not _signature_valid(parts.protected_b64, parts.payload_b64, parts.signature_b64, alg,
                            mac):
        raise AcmeProblem.unauthorized(f"{what} MAC is invalid")
    bound_key = _json_loads(parts.payload, f"{what} payload")
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
    parts = _split_flattened(inner, what)
    header = parts.protected
    alg = _request_alg(header.get("alg"), what)
    if "kid" in header:
        _malformed(f"{what} must carry the new key in \"jwk\", not name a \"kid\"")
    if "jwk" not in header:
        _malformed(f"{what} protected header has no \"jwk\" (the new account key)")
    if "nonce" in header:
        _malformed(f"{what} must not have a \"nonce\" (RFC 8555 §7.3.5)")
    inner_url = header.get("url")
    if not isinstance(inner_url, str):
        _malformed(f"{what} protected header has no \"url\"")
    if inner_url != outer.url:
        _malformed(f"{what} url {_clip(repr(inner_url))} differs from the outer JWS url "
                   f"{outer.url!r}")
    new_jwk: dict[str, Any] = header["jwk"]
    key = _public_key(new_jwk, alg, f"{what} jwk")
    length_problem = _signature_length_problem(alg, key, len(parts.signature))
    if length_problem or not _signature_valid(parts.protected_b64, parts.payload_b64,
                                              parts.signature_b64, alg, key):
        _malformed(f"{what} signature is invalid: it does not verify with the new key in its "
                   f"\"jwk\"{'; ' + length_problem if length_problem else ''}")
    change = _json_loads(parts.payload, f"{what} payload")
    if not isinstance(change, dict):
        _malformed(f"{what} payload must be a keyChange JSON object, not {_json_kind(change)}")
    account = change.get("account")
    if not isinstance(account, str):
        _malformed("keyChange object has no \"account\" (the account URL)")
    if account != account_url:
        _malformed(f"keyChange account {_clip(repr(account))} is not the account that signed "
                   f"the request ({account_url!r})")
    old_key = change.get("oldKey")
    if not isinstance(old_key, dict):
        _malformed("keyChange object has no \"oldKey\" (the current account key as a JWK)")
    try:
        same_old_key = thumbprint(old_key) == thumbprint(old_jwk)
    except AcmeProblem:
        _malformed("keyChange \"oldKey\" is not a valid public JWK")
    if not same_old_key:
        _malformed("keyChange \"oldKey\" is not the current key of the account")
    if thumbprint(new_jwk) == thumbprint(old_jwk):
        _malformed("keyChange new key is the same as the current account key")
    return dict(new_jwk)


# -- signing, for test clients ---------------------------------------------------------------
def public_jwk(key: SigningKey | PublicKey) -> dict[str, Any]:
    """The public JWK of a key (private or public), with only the RFC 7638 members.

    A public key serves revokeCert by certificate key: compare thumbprints with the cert's key.
    """
    if not isinstance(key, SigningKey | PublicKey):
        raise ValueError(f"no JWK form for {type(key).__name__}")
    exported = JWK.from_pyca(key).export_public(as_dict=True)
    return {name: exported[name] for name in _PUBLIC_MEMBERS[exported["kty"]]}


def default_alg(key: SigningKey) -> str:
    """The alg a client would use with this key: RS256, ES256, ES384 or EdDSA."""
    if isinstance(key, rsa.RSAPrivateKey):
        return "RS256"
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "EdDSA"
    curves = {"secp256r1": "ES256", "secp384r1": "ES384"}
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name in curves:
        return curves[key.curve.name]
    raise ValueError(f"no supported JWS alg for {type(key).__name__}")


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
    body = b"" if payload is None else _json_dumps(payload)
    return _sign_flattened(JWK.from_pyca(key), header, body)


def sign_eab(hmac_key: bytes, kid: str, outer_jwk: Mapping[str, Any], url: str,
             alg: str = "HS256") -> dict[str, Any]:
    """An externalAccountBinding value: the account key MACed under the external account key."""
    header = {"alg": alg, "kid": kid, "url": url}
    mac = JWK(kty="oct", k=_b64url_encode(hmac_key))
    return _sign_flattened(mac, header, _json_dumps(outer_jwk))


def _sign_flattened(key: JWK, header: Mapping[str, Any], payload: bytes) -> dict[str, Any]:
    token = JWS(payload)
    token.add_signature(key, alg=None, protected=_json_dumps(header).decode())
    flattened: dict[str, Any] = json.loads(token.serialize(compact=False))
    return flattened


# -- encoding helpers ------------------------------------------------------------------------
def _b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(value: object, what: str,
                   fail: Callable[[str], NoReturn] | None = None) -> bytes:
    """Strict RFC 7515 §2 base64url: URL-safe alphabet, no padding, canonical trailing bits."""
    fail = fail or _malformed
    if not isinstance(value, str):
        fail(f"{what} must be a base64url string")
    if not _BASE64URL.fullmatch(value) or len(value) % 4 == 1:
        fail(f"{what} is not base64url (URL-safe alphabet, no \"=\" padding)")
    data = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    if _b64url_encode(data) != value:
        fail(f"{what} is not canonical base64url")
    return data


def _b64url_int(value: str) -> int:
    return int.from_bytes(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)), "big")


def _json_loads(data: bytes, what: str) -> Any:
    """Strict JSON: UTF-8, no duplicate member names (parsers disagree on them), no NaN."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        _malformed(f"{what} is not UTF-8")
    try:
        return strict_json.loads(text)
    except json.JSONDecodeError as e:
        _malformed(f"{what} is not valid JSON: {e.msg} at position {e.pos}")
    except RecursionError:
        _malformed(f"{what} is not valid JSON: it is nested too deeply")
    except ValueError as e:
        _malformed(f"{what} is not valid JSON: {e}")


def _json_dumps(value: Mapping[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _json_kind(value: object) -> str:
    kinds = {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
             int: "a number", float: "a number", type(None): "null"}
    return kinds.get(type(value), "a value")


def _quoted(names: list[str]) -> str:
    return ", ".join(f"\"{_clip(name)}\"" for name in names)


def _clip(text: str, limit: int = 80) -> str:
    """Requester text echoed in a detail, cut short so a problem stays small."""
    return text if len(text) <= limit else text[:limit] + "..."


def _malformed(detail: str) -> NoReturn:
    raise AcmeProblem.malformed(detail)


def _bad_key(detail: str) -> NoReturn:
    raise AcmeProblem.bad_public_key(detail)
