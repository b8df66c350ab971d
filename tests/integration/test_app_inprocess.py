"""The whole server app in one process: a CA made in the test token, a real SQLite store in
tmp_path, the services composed as a worker composes them, aiohttp's test server on 127.0.0.1.

No subprocess and no TLS: what this shows is that `compose_services` + `create_server_app` build
a working CA from injected parts (token session, store, clock), so the API and ACME can be
exercised without `applianctl serve`.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from appliance.authority.provisioners.jwk_keys import decrypt_private_key
from appliance.authority.provisioners.jwk_tokens import TokenSigner
from appliance.ceremony.init import CaKeys, InitOptions, create_ca_keys, write_ca_home
from appliance.issuance.ca_certs import fingerprint, pem
from appliance.server.app import create_server_app
from appliance.server.composition import compose_services
from appliance.storage.sqlite import SqliteStore
from hsm.keystore import KeySpec
from hsm.pkcs11_store import Pkcs11KeyStore

# aiohttp 3.14 warns on string keys in a request's storage (request["provisioner"] in api/app.py
# and acme/); under pytest's warnings-as-errors that warning would turn every issuance into a 500.
# The servers of the e2e suite run without that filter; the fix (web.RequestKey, shared by api/
# and acme/) belongs to those packages.


# The SoftHsmEnv of tests/integration/conftest.py (conftest modules are not imported by name).
SoftHsmEnv = Any
PORT = 9000  # only in ca.json (it is part of the token audience); nothing listens on it


@dataclass
class InProcessCa:
    client: TestClient
    keys: CaKeys
    signer: TokenSigner
    clock_now: float  # the authority's clock (frozen), two minutes behind the wall clock

    def token(self, subject: str) -> str:
        return self.signer.mint(subject, f"https://localhost:{PORT}/1.0/sign", sans=[subject],
                                root_fingerprint=fingerprint(self.keys.root),
                                now=self.clock_now)


@pytest.fixture
async def ca(tmp_path: Path, keystore: Pkcs11KeyStore, softhsm_env: SoftHsmEnv
             ) -> AsyncIterator[InProcessCa]:
    """A CA whose root and intermediate keys are in the shared test token (labels of its own)."""
    suffix = secrets.token_hex(4)
    password = secrets.token_urlsafe(12)
    opts = InitOptions(
        home=tmp_path / "ca", name=f"In-process {suffix}", dns_names=("localhost", "127.0.0.1"),
        address=f"127.0.0.1:{PORT}", provisioner="admin", root_pin=softhsm_env.user_pin,
        issuer_pin=softhsm_env.user_pin, provisioner_password=password.encode(),
        key_spec=KeySpec.parse("EC", None, None), module_path=softhsm_env.module,
        root_token=softhsm_env.token_label, issuer_token=softhsm_env.token_label)
    keys = create_ca_keys(keystore, keystore, opts.name, opts.key_spec,
                          root_label=f"root {suffix}", intermediate_label=f"intermediate {suffix}")
    try:
        result = write_ca_home(opts, keys, softhsm_conf=None)
        clock_now = datetime.now(UTC).timestamp() - 120
        services = compose_services(
            result.config_path, keystore,
            store=SqliteStore.open(opts.home / "db" / "appliance.db"),
            clock=lambda: clock_now)
        try:
            served = create_server_app(services)
            (provisioner,) = json.loads(result.config_path.read_text())["authority"][
                "provisioners"]
            key, _ = decrypt_private_key(provisioner["encryptedKey"], password.encode())
            async with TestClient(TestServer(served.app, host="127.0.0.1")) as client:
                yield InProcessCa(client, keys, TokenSigner.for_key(key, "admin"), clock_now)
        finally:
            await services.close()
    finally:
        keystore.destroy(keys.root_key)
        keystore.destroy(keys.intermediate_key)


def csr_for(name: str) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
           .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM).decode()


async def test_health_roots_and_provisioners_answer_in_process(ca: InProcessCa) -> None:
    health = await ca.client.get("/health")
    assert (health.status, await health.json()) == (200, {"status": "ok"})

    roots = await ca.client.get("/roots")
    assert roots.status == 200
    assert (await roots.json())["crts"] == [pem(ca.keys.root)], "GET /roots is not our root"

    provisioners = await ca.client.get("/1.0/provisioners")
    body = await provisioners.json()
    assert provisioners.status == 200, body
    assert [(p["type"], p["name"], p["key"]["kid"]) for p in body["provisioners"]] == [
        ("JWK", "admin", ca.signer.kid)], body
    assert body["nextCursor"] == ""


async def test_sign_issues_under_the_intermediate_once_per_token(ca: InProcessCa) -> None:
    token = ca.token("app.example")
    request = {"csr": csr_for("app.example"), "ott": token}
    response = await ca.client.post("/1.0/sign", json=request)
    body = await response.json()
    assert response.status == 201, body

    leaf = x509.load_pem_x509_certificate(body["crt"].encode())
    leaf.verify_directly_issued_by(ca.keys.intermediate)  # signed by the key in the token
    assert body["ca"] == pem(ca.keys.intermediate)
    assert leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value \
        .get_values_for_type(x509.DNSName) == ["app.example"]
    # The authority took the time from the clock it was given (two minutes behind the wall
    # clock), not from the machine: notBefore is at or before that time (backdated).
    assert leaf.not_valid_before_utc <= datetime.fromtimestamp(ca.clock_now, UTC), (
        f"notBefore {leaf.not_valid_before_utc} is after the injected clock's time")

    replay = await ca.client.post("/1.0/sign", json={**request, "csr": csr_for("app.example")})
    replay_body = await replay.json()
    assert replay.status == 401, replay_body
    assert replay_body["status"] == 401 and "token" in replay_body["message"], replay_body
