"""Quorum set-up at init and share rotation: seal the PIN, write shares, keep a TLS certificate."""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
from pathlib import Path

from appliance.ceremony.init import InitOptions, InitResult, initialise
from appliance.config import home_of, load_config, resolve_path
from appliance.server.composition import open_services
from appliance.server.tls import issue_server_certificate, save_server_tls
from appliance.unlock.quorum import SealedPin, recover_pin, seal_pin, write_shares

# The issuer PIN of a quorum CA: random, never shown whole, only ever sealed into shares.
QUORUM_PIN_BYTES = 32


def initialise_sealed(opts: InitOptions, share_dir: Path) -> tuple[InitResult, list[Path]]:
    """The init ceremony of a quorum CA: a random issuer PIN nobody sees, the CA created with
    it, then the PIN sealed M-of-N; returns the CA's files and the N share files."""
    assert opts.quorum is not None
    issuer_pin = secrets.token_urlsafe(QUORUM_PIN_BYTES)
    result = initialise(dataclasses.replace(opts, issuer_pin=issuer_pin))
    paths = asyncio.run(seal_new_ca(result.config_path, issuer_pin, opts.quorum, share_dir))
    del issuer_pin
    return result, paths


async def seal_new_ca(config_path: Path, issuer_pin: str, quorum: tuple[int, int],
                      share_dir: Path) -> list[Path]:
    """Seal the new CA's issuer PIN M-of-N and give the sealed server a TLS certificate."""
    config = load_config(config_path)
    home = home_of(config_path)
    # The sealed server answers /health over HTTPS before anyone has the PIN: it needs a
    # certificate now, from the intermediate (renewed while unsealed).
    services = await open_services(config_path, issuer_pin)
    try:
        chain, key, _ = await issue_server_certificate(services.authority, config.dns_names)
    finally:
        await services.close()
    save_server_tls(resolve_path(home, config.unlock.tls_dir), chain, key)
    sealed, mnemonics = seal_pin(issuer_pin, *quorum)
    sealed.save(resolve_path(home, config.unlock.sealed_pin))
    return write_shares(share_dir, mnemonics, quorum[0])


def rekey_shares(config_path: Path, current: list[str], quorum: tuple[int, int],
                 share_dir: Path) -> list[Path]:
    """New shares for the same PIN; the old set stops working (its sealed file is replaced)."""
    config = load_config(config_path)
    path = resolve_path(home_of(config_path), config.unlock.sealed_pin)
    pin = recover_pin(SealedPin.load(path), current)
    sealed, mnemonics = seal_pin(pin, *quorum)
    del pin
    paths = write_shares(share_dir, mnemonics, quorum[0])
    sealed.save(path)
    return paths
