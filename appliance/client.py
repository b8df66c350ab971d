"""Client side of the API, as `step ca` uses it: bootstrap, fetch, mint tokens, sign.

It trusts exactly the root it was bootstrapped with (never the system bundle or the
SSL_CERT_FILE / REQUESTS_CA_BUNDLE variables), except in bootstrap, which fetches the root over
an unverified connection and then refuses it unless its SHA-256 matches the fingerprint given.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from pathlib import Path
from typing import Any

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import NameOID

from appliance.authority.provisioners.jwk import TokenSigner
from appliance.authority.provisioners.jwk_keys import decrypt_private_key
from appliance.errors import ApplianceError, BadRequest, NotFound, Unauthorized
from appliance.issuance.ca_certs import fingerprint
from appliance.issuance.names import parse_san

TIMEOUT = aiohttp.ClientTimeout(total=30)


class ClientError(ApplianceError):
    """The CA could not be reached, or answered with an error (its message is kept)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


def trust_context(root: Path) -> ssl.SSLContext:
    try:
        return ssl.create_default_context(cafile=str(root))
    except (FileNotFoundError, ssl.SSLError):
        raise ClientError(f"cannot load the root certificate {root}") from None


class CaClient:
    """One CA at `ca_url`, trusted through the root file `root` (None: unverified, bootstrap)."""

    def __init__(self, ca_url: str, root: Path | None,
                 client_cert: tuple[Path, Path] | None = None) -> None:
        self.ca_url = ca_url.rstrip("/")
        self._ssl: ssl.SSLContext | bool = trust_context(root) if root else False
        if client_cert is not None and isinstance(self._ssl, ssl.SSLContext):
            try:
                self._ssl.load_cert_chain(str(client_cert[0]), str(client_cert[1]))
            except (ssl.SSLError, ValueError):
                raise ClientError(f"{client_cert[0]} and {client_cert[1]} are not a matching "
                                  "certificate and key") from None

    async def request(self, method: str, path: str, body: Any = None,
                      headers: dict[str, str] | None = None, raw: bool = False) -> Any:
        url = f"{self.ca_url}{path}"
        try:
            async with aiohttp.ClientSession(timeout=TIMEOUT) as session, session.request(
                    method, url, json=body, ssl=self._ssl, headers=headers) as resp:
                if raw and resp.status < 400:
                    return await resp.read()
                text = await resp.text()
                if resp.status >= 400:
                    message = text.strip()[:300]
                    try:
                        message = str(json.loads(text).get("message", message))
                    except (ValueError, AttributeError):
                        pass
                    raise ClientError(f"the CA refused: {message}", resp.status)
                try:
                    return json.loads(text)
                except ValueError:
                    raise ClientError(f"the CA sent a response that is not JSON from {url}"
                                      ) from None
        except aiohttp.ClientConnectorCertificateError:
            raise ClientError(f"TLS verification of {self.ca_url} failed: it does not present "
                              "a certificate from the trusted root") from None
        except aiohttp.ClientConnectorError as e:
            raise ClientError(f"cannot reach the CA at {self.ca_url}: {e.os_error}") from None
        except (TimeoutError, aiohttp.ClientError) as e:
            raise ClientError(f"request to {url} failed: {type(e).__name__}") from None

    async def health(self) -> str:
        return str((await self.request("GET", "/health")).get("status"))

    async def root(self, sha: str) -> x509.Certificate:
        data = await self.request("GET", f"/root/{sha}")
        cert = x509.load_pem_x509_certificate(str(data["ca"]).encode())
        if fingerprint(cert) != sha.lower().replace(":", ""):
            raise ClientError("the CA sent a root whose fingerprint does not match")
        return cert

    async def provisioners(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        cursor = ""
        while True:
            page = await self.request("GET", f"/provisioners?limit=100&cursor={cursor}")
            out += page["provisioners"]
            cursor = page.get("nextCursor") or ""
            if not cursor:
                return out

    async def token_signer(self, provisioner: str | None, password: bytes) -> TokenSigner:
        """Fetch and decrypt a JWK provisioner's key (the first JWK one when none is named)."""
        jwks = [p for p in await self.provisioners() if p.get("type") == "JWK"]
        chosen = next((p for p in jwks if provisioner in (None, p["name"])), None)
        if chosen is None:
            raise NotFound(f"no JWK provisioner named {provisioner!r}" if provisioner
                           else "the CA has no JWK provisioner")
        kid = chosen["key"]["kid"]
        encrypted = (await self.request("GET", f"/provisioners/{kid}/encrypted-key"))["key"]
        key, _ = await asyncio.get_running_loop().run_in_executor(
            None, decrypt_private_key, encrypted, password)
        return TokenSigner.for_key(key, chosen["name"])

    async def sign(self, csr: x509.CertificateSigningRequest, ott: str,
                   not_before: str | None = None, not_after: str | None = None
                   ) -> list[x509.Certificate]:
        body: dict[str, Any] = {
            "csr": csr.public_bytes(serialization.Encoding.PEM).decode(), "ott": ott}
        if not_before:
            body["notBefore"] = not_before
        if not_after:
            body["notAfter"] = not_after
        data = await self.request("POST", "/1.0/sign", body)
        return [x509.load_pem_x509_certificate(p.encode()) for p in data["certChain"]]


    async def renew(self, bearer: str | None = None) -> list[x509.Certificate]:
        headers = {"Authorization": f"Bearer {bearer}"} if bearer else None
        data = await self.request("POST", "/1.0/renew", {}, headers=headers)
        return [x509.load_pem_x509_certificate(p.encode()) for p in data["certChain"]]

    async def rekey(self, csr: x509.CertificateSigningRequest, bearer: str | None = None
                    ) -> list[x509.Certificate]:
        headers = {"Authorization": f"Bearer {bearer}"} if bearer else None
        data = await self.request(
            "POST", "/1.0/rekey", {"csr": csr.public_bytes(serialization.Encoding.PEM).decode()},
            headers=headers)
        return [x509.load_pem_x509_certificate(p.encode()) for p in data["certChain"]]

    async def revoke(self, serial: int, ott: str | None, reason_code: int, reason: str) -> None:
        body: dict[str, Any] = {"serial": str(serial), "reasonCode": reason_code,
                                "reason": reason, "passive": True}
        if ott:
            body["ott"] = ott
        await self.request("POST", "/1.0/revoke", body)

    async def crl(self) -> x509.CertificateRevocationList:
        der = await self.request("GET", "/1.0/crl", raw=True)
        return x509.load_der_x509_crl(der)


def make_csr(key: PrivateKeyTypes, subject: str, sans: list[str]) -> x509.CertificateSigningRequest:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
    if sans:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([parse_san(s) for s in sans]), critical=False)
    algorithm = None if not hasattr(key, "curve") and not hasattr(key, "key_size") else (
        hashes.SHA256())
    return builder.sign(key, algorithm)  # type: ignore[arg-type]


def token_claims_unverified(token: str) -> dict[str, Any]:
    """Subject and SANs from a token the CLI was handed, to build the matching CSR."""
    import jwt

    try:
        claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    except jwt.InvalidTokenError:
        raise BadRequest("the token is not a JWT") from None
    if not isinstance(claims.get("sub"), str):
        raise Unauthorized("the token has no subject")
    return claims
