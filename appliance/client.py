"""Client side of the API, as `step ca` uses it: bootstrap, fetch, mint tokens, sign.

It trusts exactly the root it was bootstrapped with (never the system bundle or the
SSL_CERT_FILE / REQUESTS_CA_BUNDLE variables), except in bootstrap, which fetches the root over
an unverified connection and then refuses it unless its SHA-256 matches the fingerprint given.

HTTPS goes through the standard library (http.client + ssl), not aiohttp: one request at a time
is all a command makes, and importing aiohttp alone took longer than the 0.3 s a client command
may take to start. Token signing and key decryption are imported when a command needs them.
"""

from __future__ import annotations

import http.client
import json
import ssl
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from appliance.errors import ApplianceError, BadRequest, NotFound, Unauthorized
from appliance.issuance.names import parse_san

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

    from appliance.authority.provisioners.jwk_tokens import TokenSigner

TIMEOUT_SECONDS = 30.0


class ClientError(ApplianceError):
    """The CA could not be reached, or answered with an error (its message is kept)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


def trust_context(root: Path) -> ssl.SSLContext:
    """Verifies the CA against `root` alone: a cafile means no default (environment) trust."""
    try:
        return ssl.create_default_context(cafile=str(root))
    except (FileNotFoundError, ssl.SSLError):
        raise ClientError(f"cannot load the root certificate {root}") from None


def unverified_context() -> ssl.SSLContext:
    """For bootstrap only: the root it fetches is checked against its fingerprint instead."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def chain_of(data: dict[str, Any]) -> list[x509.Certificate]:
    return [x509.load_pem_x509_certificate(p.encode()) for p in data["certChain"]]


def bearer(token: str | None) -> dict[str, str] | None:
    return {"Authorization": f"Bearer {token}"} if token else None


class CaClient:
    """One CA at `ca_url`, trusted through the root file `root` (None: unverified, bootstrap)."""

    def __init__(self, ca_url: str, root: Path | None,
                 client_cert: tuple[Path, Path] | None = None) -> None:
        self.ca_url = ca_url.rstrip("/")
        parts = urlsplit(self.ca_url)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise BadRequest(f"the CA URL {ca_url!r} is not an https:// URL")
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        try:
            self._port = parts.port
        except ValueError:
            raise BadRequest(f"the CA URL {ca_url!r} has an invalid port") from None
        self._base_path = parts.path
        self._ssl = trust_context(root) if root else unverified_context()
        if client_cert is not None and root:
            try:
                self._ssl.load_cert_chain(str(client_cert[0]), str(client_cert[1]))
            except (ssl.SSLError, ValueError):
                raise ClientError(f"{client_cert[0]} and {client_cert[1]} are not a matching "
                                  "certificate and key") from None

    def _connect(self) -> http.client.HTTPConnection:
        connection: http.client.HTTPConnection
        if self._https:
            connection = http.client.HTTPSConnection(self._host, self._port, context=self._ssl,
                                                     timeout=TIMEOUT_SECONDS)
        else:
            connection = http.client.HTTPConnection(self._host, self._port,
                                                    timeout=TIMEOUT_SECONDS)
        try:
            connection.connect()
        except ssl.SSLCertVerificationError:
            connection.close()
            raise ClientError(f"TLS verification of {self.ca_url} failed: it does not present "
                              "a certificate from the trusted root") from None
        except TimeoutError:
            connection.close()
            raise ClientError(f"request to {self.ca_url} failed: TimeoutError") from None
        except OSError as e:  # refused, unreachable, unknown name, TLS handshake refused
            connection.close()
            raise ClientError(f"cannot reach the CA at {self.ca_url}: {e}") from None
        return connection

    def request(self, method: str, path: str, body: Any = None,
                headers: dict[str, str] | None = None, raw: bool = False) -> Any:
        url = f"{self.ca_url}{path}"
        sent = dict(headers or {})
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            sent["Content-Type"] = "application/json"
        connection = self._connect()
        try:
            connection.request(method, self._base_path + path, body=payload, headers=sent)
            response = connection.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException) as e:
            raise ClientError(f"request to {url} failed: {type(e).__name__}") from None
        finally:
            connection.close()
        if raw and response.status < 400:
            return data
        text = data.decode("utf-8", errors="replace")
        if response.status >= 400:
            message = text.strip()[:300]
            try:
                message = str(json.loads(text).get("message", message))
            except (ValueError, AttributeError):
                pass
            raise ClientError(f"the CA refused: {message}", response.status)
        try:
            return json.loads(text)
        except ValueError:
            raise ClientError(f"the CA sent a response that is not JSON from {url}") from None

    def health(self) -> str:
        return str(self.request("GET", "/health").get("status"))

    def root(self, sha: str) -> x509.Certificate:
        from appliance.issuance.ca_certs import fingerprint

        data = self.request("GET", f"/root/{sha}")
        cert = x509.load_pem_x509_certificate(str(data["ca"]).encode())
        if fingerprint(cert) != sha.lower().replace(":", ""):
            raise ClientError("the CA sent a root whose fingerprint does not match")
        return cert

    def provisioners(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        cursor = ""
        while True:
            page = self.request("GET", f"/provisioners?limit=100&cursor={cursor}")
            out += page["provisioners"]
            cursor = page.get("nextCursor") or ""
            if not cursor:
                return out

    def token_signer(self, provisioner: str | None, password: bytes) -> TokenSigner:
        """Fetch and decrypt a JWK provisioner's key (the first JWK one when none is named)."""
        from appliance.authority.provisioners.jwk_keys import decrypt_private_key
        from appliance.authority.provisioners.jwk_tokens import TokenSigner

        jwks = [p for p in self.provisioners() if p.get("type") == "JWK"]
        chosen = next((p for p in jwks if provisioner in (None, p["name"])), None)
        if chosen is None:
            raise NotFound(f"no JWK provisioner named {provisioner!r}" if provisioner
                           else "the CA has no JWK provisioner")
        kid = chosen["key"]["kid"]
        encrypted = self.request("GET", f"/provisioners/{kid}/encrypted-key")["key"]
        key, _ = decrypt_private_key(encrypted, password)
        return TokenSigner.for_key(key, chosen["name"])

    def sign(self, csr: x509.CertificateSigningRequest, ott: str,
             not_before: str | None = None, not_after: str | None = None
             ) -> list[x509.Certificate]:
        body: dict[str, Any] = {
            "csr": csr.public_bytes(serialization.Encoding.PEM).decode(), "ott": ott}
        if not_before:
            body["notBefore"] = not_before
        if not_after:
            body["notAfter"] = not_after
        return chain_of(self.request("POST", "/1.0/sign", body))

    def renew(self, token: str | None = None) -> list[x509.Certificate]:
        """Over mTLS (the client certificate), or with an x5c `token` when there is none."""
        return chain_of(self.request("POST", "/1.0/renew", {}, headers=bearer(token)))

    def rekey(self, csr: x509.CertificateSigningRequest, token: str | None = None
              ) -> list[x509.Certificate]:
        body = {"csr": csr.public_bytes(serialization.Encoding.PEM).decode()}
        return chain_of(self.request("POST", "/1.0/rekey", body, headers=bearer(token)))

    def revoke(self, serial: int, ott: str | None, reason_code: int, reason: str) -> None:
        body: dict[str, Any] = {"serial": str(serial), "reasonCode": reason_code,
                                "reason": reason, "passive": True}
        if ott:
            body["ott"] = ott
        self.request("POST", "/1.0/revoke", body)

    def crl(self) -> x509.CertificateRevocationList:
        return x509.load_der_x509_crl(self.request("GET", "/1.0/crl", raw=True))


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
    from appliance.jose.errors import InvalidToken
    from appliance.jose.jws import parse_compact

    try:
        claims = parse_compact(token).claims()
    except InvalidToken:
        raise BadRequest("the token is not a JWT") from None
    if not isinstance(claims.get("sub"), str):
        raise Unauthorized("the token has no subject")
    return claims
