"""Pkcs11KeyStore after its token went away: the loss is noticed once, signing then fails fast,
re-establishing fails while the token is away and works once it is back, and a token whose key
under the same label and id is another key is refused.

Each scenario runs in a child process with its own SoftHSM2 token directory: re-establishing
finalizes the module, which would end the sessions the other tests of this process share.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hsm.softhsm import find_softhsm_module, init_token, write_softhsm_conf

CHILD = textwrap.dedent("""
    import asyncio, json, os, sys
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from hsm.errors import HsmError, TokenUnavailable
    from hsm.keystore import KeySpec
    from hsm.pkcs11_store import Pkcs11KeyStore

    module, label, pin, tokens, scenario = sys.argv[1:6]
    away = tokens + ".away"
    out = {}
    store = Pkcs11KeyStore.open(module, label, pin)
    ref = store.generate(KeySpec.parse("EC", "P-256"), "ca-key")
    key = store.private_key(ref)
    heard = []
    store.on_loss(lambda reason, detail: heard.append(reason))

    def sign():
        signature = key.sign(b"data", ec.ECDSA(hashes.SHA256()))
        store.public_key(ref).verify(signature, b"data", ec.ECDSA(hashes.SHA256()))
        return "signed"

    def attempt(fn):
        try:
            return fn()
        except HsmError as e:
            return type(e).__name__

    def reestablish():
        asyncio.run(store.reestablish(pin))
        return "reestablished"

    out["before"] = attempt(sign)
    os.rename(tokens, away)
    out["away"] = attempt(sign)
    out["again"] = attempt(sign)
    out["heard"] = heard
    out["lost_reason"] = store.lost_reason
    out["retry_away"] = attempt(reestablish)
    os.rename(away, tokens)
    if scenario == "replaced":
        import pkcs11  # another key under the CA key's label and id, as a swapped token has
        session = pkcs11.lib(module).get_token(token_label=label).open(rw=True, user_pin=pin)
        for obj in session.get_objects({pkcs11.Attribute.LABEL: "ca-key"}):
            obj.destroy()
        session.generate_keypair(pkcs11.KeyType.EC, store=True, label="ca-key", id=ref.id,
            public_template={pkcs11.Attribute.EC_PARAMS: bytes.fromhex("06082a8648ce3d030107")})
        session.close()
    out["retry_back"] = attempt(reestablish)
    out["after"] = attempt(sign)
    out["lost_after"] = store.lost_reason
    store.close()
    print(json.dumps(out))
""")


def run_child(tmp_path: Path, scenario: str) -> dict[str, object]:
    module = find_softhsm_module()
    if module is None:
        pytest.fail("SoftHSM2 is not installed: apt-get install softhsm2")
    conf = write_softhsm_conf(tmp_path)
    tokens = next(line.split("=", 1)[1].strip() for line in conf.read_text().splitlines()
                  if line.startswith("directories.tokendir"))
    pin = secrets.token_urlsafe(12)
    init_token(module, "reestablish", secrets.token_urlsafe(12), pin, conf=conf)
    env = dict(os.environ, SOFTHSM2_CONF=str(conf))
    result = subprocess.run(
        [sys.executable, "-c", CHILD, module, "reestablish", pin, tokens, scenario],
        env=env, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


def test_lost_token_is_reestablished_when_back(tmp_path: Path) -> None:
    out = run_child(tmp_path, "back")
    assert out["before"] == "signed"
    assert out["away"] in ("KeyNotFound", "DeviceError", "TokenNotFound"), out
    assert out["again"] == "TokenUnavailable", f"a lost token was asked again: {out}"
    assert out["heard"] == [out["lost_reason"]] and out["lost_reason"], out
    assert out["retry_away"] != "reestablished", f"re-established while away: {out}"
    assert out["retry_back"] == "reestablished", out
    assert out["after"] == "signed" and out["lost_after"] is None, out


def test_token_with_another_key_under_the_same_name_is_refused(tmp_path: Path) -> None:
    out = run_child(tmp_path, "replaced")
    assert out["retry_back"] == "KeyNotFound", f"a replaced CA key was accepted: {out}"
    assert out["after"] == "TokenUnavailable" and out["lost_after"], out
