"""Fixtures for tests against a real, throwaway SoftHSM2 token.

The whole test process uses one SoftHSM2 configuration: SoftHSM2 reads SOFTHSM2_CONF once, when
the module is first loaded, and PKCS#11 login belongs to the whole process. So `softhsm_env`
(which writes the conf, points SOFTHSM2_CONF at it and initialises the tokens) and `keystore`
(the one logged-in store of the process) are session-scoped and shared by every test. Nothing may
load the module before `softhsm_env` has run: tests that touch a token depend on it.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hsm.pkcs11_store import Pkcs11KeyStore
from hsm.softhsm import find_softhsm_module, init_token, write_softhsm_conf


@dataclass(frozen=True)
class SoftHsmEnv:
    """A SoftHSM2 configuration with two initialised tokens, and their PINs."""

    conf: Path
    module: str
    token_label: str
    so_pin: str
    user_pin: str
    # Never opened by `keystore`: for wrong-PIN tests and for a second store in the process.
    spare_token_label: str
    spare_user_pin: str


@pytest.fixture(scope="session")
def softhsm_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftHsmEnv]:
    """Write a SoftHSM2 conf in a temporary directory, set SOFTHSM2_CONF, initialise the tokens."""
    module = find_softhsm_module()
    if module is None:
        pytest.fail("SoftHSM2 is not installed: apt-get install softhsm2")
    conf = write_softhsm_conf(tmp_path_factory.mktemp("softhsm"))
    env = SoftHsmEnv(
        conf=conf,
        module=module,
        token_label="hsm-test",  # noqa: S106 - a label, not a secret
        so_pin=secrets.token_urlsafe(12),
        user_pin=secrets.token_urlsafe(12),
        spare_token_label="hsm-spare",  # noqa: S106 - a label, not a secret
        spare_user_pin=secrets.token_urlsafe(12),
    )
    patch = pytest.MonkeyPatch()
    patch.setenv("SOFTHSM2_CONF", str(conf))
    try:
        init_token(module, env.token_label, env.so_pin, env.user_pin, conf=conf)
        init_token(
            module, env.spare_token_label, secrets.token_urlsafe(12), env.spare_user_pin, conf=conf
        )
        yield env
    finally:
        patch.undo()


@pytest.fixture(scope="session")
def keystore(softhsm_env: SoftHsmEnv) -> Iterator[Pkcs11KeyStore]:
    """The process's one logged-in key store on the test token."""
    assert os.environ.get("SOFTHSM2_CONF") == str(softhsm_env.conf)
    store = Pkcs11KeyStore.open(softhsm_env.module, softhsm_env.token_label, softhsm_env.user_pin)
    try:
        yield store
    finally:
        store.close()
