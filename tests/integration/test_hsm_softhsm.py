"""Token initialisation through the ctypes child (hsm.softhsm) against real SoftHSM2.

These tests use their own configuration, passed to the child only: they never load the module in
this process, so they do not disturb the process-wide SOFTHSM2_CONF of the other tests.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from hsm.errors import ModuleLoadError, TokenExists
from hsm.softhsm import find_softhsm_module, init_token, token_exists, write_softhsm_conf

# The SoftHsmEnv of tests/integration/conftest.py.
SoftHsmEnv = Any


@pytest.fixture
def module() -> str:
    found = find_softhsm_module()
    assert found is not None, "SoftHSM2 is not installed: apt-get install softhsm2"
    return found


def test_init_token_then_token_exists(module: str, tmp_path: Path) -> None:
    conf = write_softhsm_conf(tmp_path / "hsm")
    assert not token_exists(module, "Root", conf)
    init_token(module, "Root", secrets.token_urlsafe(12), secrets.token_urlsafe(12), conf=conf)
    init_token(module, "Issuer", secrets.token_urlsafe(12), secrets.token_urlsafe(12), conf=conf)
    assert token_exists(module, "Root", conf)
    assert token_exists(module, "Issuer", conf)
    assert not token_exists(module, "Other", conf)
    # The token lives in the directory the conf names, nowhere else.
    assert len(list((tmp_path / "hsm" / "tokens").iterdir())) == 2


def test_init_token_refuses_an_existing_label(module: str, tmp_path: Path) -> None:
    conf = write_softhsm_conf(tmp_path / "hsm")
    init_token(module, "Root", "so-pin-1", "user-pin-1", conf=conf)
    with pytest.raises(TokenExists, match="a token labelled Root already exists"):
        init_token(module, "Root", "so-pin-2", "user-pin-2", conf=conf)


def test_initialised_token_accepts_its_user_pin_only(module: str, tmp_path: Path) -> None:
    """Open the new token from a fresh process (this one already uses another conf)."""
    conf = write_softhsm_conf(tmp_path / "hsm")
    user_pin = secrets.token_urlsafe(12)
    init_token(module, "Fresh", secrets.token_urlsafe(12), user_pin, conf=conf)
    script = (
        "import sys\n"
        "from cryptography.hazmat.primitives import hashes\n"
        "from cryptography.hazmat.primitives.asymmetric import ec\n"
        "from hsm.keystore import KeySpec, PinIncorrect\n"
        "from hsm.pkcs11_store import Pkcs11KeyStore\n"
        "module, pin = sys.argv[1], sys.stdin.read()\n"
        "try:\n"
        "    Pkcs11KeyStore.open(module, 'Fresh', pin + 'x')\n"
        "except PinIncorrect:\n"
        "    print('refused')\n"
        "with Pkcs11KeyStore.open(module, 'Fresh', pin) as store:\n"
        "    key = store.private_key(store.generate(KeySpec('EC'), 'k'))\n"
        "    signature = key.sign(b'data', ec.ECDSA(hashes.SHA256()))\n"
        "    key.public_key().verify(signature, b'data', ec.ECDSA(hashes.SHA256()))\n"
        "    print('signed')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, module],
        input=user_pin,
        capture_output=True,
        text=True,
        env={**os.environ, "SOFTHSM2_CONF": str(conf)},
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["refused", "signed"], done.stdout


def test_init_token_reports_a_missing_module(tmp_path: Path) -> None:
    conf = write_softhsm_conf(tmp_path / "hsm")
    with pytest.raises(ModuleLoadError, match="could not load the PKCS#11 module"):
        init_token("/nonexistent/libsofthsm2.so", "Root", "so-pin-1", "user-pin-1", conf=conf)


def test_pins_never_appear_in_the_child_arguments(module: str, tmp_path: Path) -> None:
    """The child reads PINs from stdin: its argv holds the module and the label only."""
    conf = write_softhsm_conf(tmp_path / "hsm")
    done = subprocess.run(
        [sys.executable, "-m", "hsm.softhsm", "init-token", "--module", module, "--label", "T"],
        input=b"so-secret-pin\nuser-secret-pin\n",
        capture_output=True,
        env={**os.environ, "SOFTHSM2_CONF": str(conf)},
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert token_exists(module, "T", conf)
    # A child given only one line refuses rather than inventing a user PIN.
    done = subprocess.run(
        [sys.executable, "-m", "hsm.softhsm", "init-token", "--module", module, "--label", "U"],
        input=b"so-secret-pin\n",
        capture_output=True,
        env={**os.environ, "SOFTHSM2_CONF": str(conf)},
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    assert b"two lines on stdin" in done.stderr
    assert b"so-secret-pin" not in done.stderr
    assert not token_exists(module, "U", conf)


def test_process_wide_conf_is_the_fixture_one(softhsm_env: SoftHsmEnv) -> None:
    assert os.environ["SOFTHSM2_CONF"] == str(softhsm_env.conf)
    assert token_exists(softhsm_env.module, softhsm_env.token_label, None)
