"""An Authority built in-process: real Issuer, real SQLite store, a fake clock, software CA keys.

The token itself is covered by the integration and e2e suites; here the key is a software key so
that the authority's decisions can be driven quickly with a clock the test moves. The issuer is
the real one, wrapped only to keep every IssuanceRequest it was handed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from appliance.authority.authority import Authority
from appliance.authority.provisioners.jwk_keys import generate_key, public_jwk
from appliance.authority.provisioners.jwk_tokens import TokenSigner
from appliance.config import CaConfig, parse_config
from appliance.issuance.ca_certs import build_intermediate, build_root
from appliance.issuance.issuer import IssuanceRequest, IssuedCertificate, Issuer
from appliance.storage.sqlite import SqliteStore

CA_PORT = 9443
SIGN_AUDIENCE = f"https://ca.test:{CA_PORT}/1.0/sign"
REVOKE_AUDIENCE = f"https://ca.test:{CA_PORT}/1.0/revoke"


class FakeClock:
    """Seconds since the epoch that only move when the test says so."""

    def __init__(self, start: float | None = None) -> None:
        self.now = float(int(start if start is not None else datetime.now(UTC).timestamp()))

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def datetime(self) -> datetime:
        return datetime.fromtimestamp(self.now, UTC)


class RecordingIssuer(Issuer):
    """The real issuer; it also keeps what it was asked to issue."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.requests: list[IssuanceRequest] = []

    async def issue(self, request: IssuanceRequest) -> IssuedCertificate:
        self.requests.append(request)
        return await super().issue(request)


async def _run_inline(fn: Callable[[], Any]) -> Any:
    return fn()


@dataclass
class InProcessCa:
    authority: Authority
    issuer: RecordingIssuer
    store: SqliteStore
    clock: FakeClock
    root: x509.Certificate
    token_signer: TokenSigner
    config_doc: dict[str, Any] = field(default_factory=dict)

    def token(self, subject: str, sans: list[str] | None = None,
              audience: str = SIGN_AUDIENCE, lifetime: int = 300) -> str:
        from appliance.issuance.ca_certs import fingerprint

        return self.token_signer.mint(subject, audience, sans=sans,
                                      root_fingerprint=fingerprint(self.root),
                                      lifetime=lifetime, now=self.clock())

    def reconfigure(self, **provisioner_fields: Any) -> None:
        """Change the JWK provisioner's ca.json fields and reload the authority."""
        self.config_doc["authority"]["provisioners"][0].update(provisioner_fields)
        self.authority.reload(parse_config(self.config_doc))


def csr_for(common_name: str | None, sans: list[x509.GeneralName],
            key: ec.EllipticCurvePrivateKey | None = None
            ) -> tuple[x509.CertificateSigningRequest, str]:
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, common_name)] if common_name else []))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    csr = builder.sign(key, hashes.SHA256())
    return csr, csr.public_bytes(serialization.Encoding.PEM).decode()


async def build_ca(tmp_path: Path, *, jwk_fields: dict[str, Any] | None = None,
                   acme_fields: dict[str, Any] | None = None,
                   authority_fields: dict[str, Any] | None = None) -> InProcessCa:
    clock = FakeClock()
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = build_root("Test", root_key)
    issuer_key = ec.generate_private_key(ec.SECP256R1())
    intermediate = build_intermediate("Test", issuer_key.public_key(), root, root_key)
    provisioner_key = generate_key()
    signer = TokenSigner.for_key(provisioner_key, "admin")
    doc: dict[str, Any] = {
        "root": "certs/root_ca.crt", "crt": "certs/intermediate_ca.crt",
        "key": "pkcs11:token=i;object=intermediate-ca",
        "kms": {"type": "pkcs11", "uri": "pkcs11:token=i?module-path=/m.so"},
        "address": f"127.0.0.1:{CA_PORT}", "dnsNames": ["ca.test", "127.0.0.1"],
        "db": {"type": "sqlite", "dataSource": "db/a.db"},
        "crl": {"enabled": True, "idpURL": "http://ca.test/crl"},
        "authority": {"provisioners": [
            {"type": "JWK", "name": "admin", "key": public_jwk(provisioner_key),
             **(jwk_fields or {})},
            {"type": "ACME", "name": "acme", **(acme_fields or {})},
        ], **(authority_fields or {})},
    }
    config: CaConfig = parse_config(doc)
    store = SqliteStore.open(tmp_path / "db" / "a.db")
    issuer = RecordingIssuer(intermediate, (intermediate,), issuer_key, _run_inline, store)
    authority = Authority(config, issuer, root, store, tmp_path, clock=clock)
    return InProcessCa(authority, issuer, store, clock, root, signer, doc)
