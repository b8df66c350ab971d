"""Fixtures for end-to-end tests: a real CA made by `applianctl init`, served by `applianctl serve`.

`ca` is module-scoped: each test module gets its own CA home, SoftHSM2 tokens, database and
server process (init costs about a second, start about three), so a module that restarts the
server or reloads its configuration cannot disturb another. Every process is started here, in
its own session, and stopped here with SIGTERM; teardown asserts the server exits 0.

Nothing in this process loads the PKCS#11 module: token checks run in subprocesses that point
SOFTHSM2_CONF at the CA's own configuration. The helpers live in e2e_support.py (a unique module
name: test modules import it, and several conftest.py files share the name "conftest").
"""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from e2e_support import (
    SOFTHSM_MODULE,
    Api,
    CaServer,
    Tokens,
    free_port,
    open_api,
    write_secret,
)

from appliance.authority.provisioners.jwk_keys import decrypt_private_key
from appliance.authority.provisioners.jwk_tokens import TokenSigner


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CaServer]:
    """A CA made by `applianctl init` in a fresh home and served by `applianctl serve`."""
    if not Path(SOFTHSM_MODULE).exists():
        pytest.fail("SoftHSM2 is not installed: apt-get install softhsm2", pytrace=False)
    base = tmp_path_factory.mktemp("e2e-ca")
    (base / "work").mkdir()
    root_pin, issuer_pin, password = (secrets.token_urlsafe(12) for _ in range(3))
    server = CaServer(
        base=base, port=free_port(),
        root_pin_file=write_secret(base / "root.pin", root_pin),
        issuer_pin_file=write_secret(base / "issuer.pin", issuer_pin),
        provisioner_password_file=write_secret(base / "provisioner.pass", password),
        root_pin=root_pin, issuer_pin=issuer_pin, provisioner_password=password)
    server.init_stdout = server.init().stdout
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def tokens(ca: CaServer) -> Tokens:
    """Token minting with the key from ca.json, decrypted with the provisioner password."""
    config = json.loads(ca.config_path.read_text())
    (provisioner,) = config["authority"]["provisioners"]
    key, kid = decrypt_private_key(provisioner["encryptedKey"], ca.provisioner_password.encode())
    signer = TokenSigner.for_key(key, provisioner["name"])
    assert signer.kid == kid == provisioner["key"]["kid"]
    return Tokens(signer, ca.sign_audience, ca.fingerprint)


@pytest.fixture
async def api(ca: CaServer) -> AsyncIterator[Api]:
    async with open_api(ca) as client:
        yield client
