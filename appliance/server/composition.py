"""Assemble a running authority from ca.json: token session, key checks, store, issuer."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from appliance.audit import AuditError, AuditEvent, AuditLog
from appliance.authority.authority import Authority
from appliance.config import CaConfig, home_of, load_config, resolve_path
from appliance.errors import ConfigError
from appliance.issuance.issuer import Issuer
from appliance.storage.sqlite import SqliteStore
from hsm.pkcs11_store import Pkcs11KeyStore
from hsm.uri import Pkcs11Uri


@dataclass
class Runtime:
    config_path: Path
    home: Path
    config: CaConfig
    keystore: Pkcs11KeyStore
    store: SqliteStore
    issuer: Issuer
    authority: Authority
    root: x509.Certificate
    intermediate: x509.Certificate
    audit: AuditLog
    _logout_recorded: bool = False

    async def record_logout(self) -> None:
        if not self._logout_recorded:
            self._logout_recorded = True
            with contextlib.suppress(AuditError):
                await self.audit.append(AuditEvent("token.logout", "success", process_actor(),
                                                   {"label": self.keystore.token_label}))

    async def close(self) -> None:
        await self.record_logout()
        await self.audit.close()
        await self.store.close()
        self.keystore.close()


def process_actor() -> str:
    return f"process:{os.getpid()}"


def audit_log(config: CaConfig, home: Path) -> AuditLog:
    return AuditLog(resolve_path(home, config.audit.path))


def load_certificate(path: Path, what: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    except ValueError:
        raise ConfigError(f"{what} {path} is not a PEM certificate") from None


def prepare_token_environment(config: CaConfig, home: Path) -> None:
    """Point SoftHSM2 at the CA's own token directory (must precede loading the module)."""
    if config.kms.softhsm_conf:
        os.environ["SOFTHSM2_CONF"] = str(resolve_path(home, config.kms.softhsm_conf))


def module_and_token(config: CaConfig) -> tuple[str, str]:
    uri = Pkcs11Uri.parse(config.kms.uri)
    if not uri.module_path:
        raise ConfigError("kms.uri must name the module (?module-path=...)")
    if not uri.token:
        raise ConfigError("kms.uri must name the issuer token (token=...)")
    return uri.module_path, uri.token


async def open_runtime(config_path: Path, issuer_pin: str) -> Runtime:
    """Log into the issuer token, check the key is protected and matches the certificate."""
    config = load_config(config_path)
    home = home_of(config_path)
    prepare_token_environment(config, home)
    module, token = module_and_token(config)
    root = load_certificate(resolve_path(home, config.root), "root certificate")
    intermediate = load_certificate(resolve_path(home, config.crt), "intermediate certificate")
    keystore = Pkcs11KeyStore.open(module, token, issuer_pin)
    try:
        ref = keystore.find_uri(config.key)
        keystore.check_protected(ref)  # refuse to serve with an extractable CA key
        key = keystore.private_key(ref)
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        der = serialization.Encoding.DER
        if key.public_key().public_bytes(der, spki) != intermediate.public_key().public_bytes(
                der, spki):
            raise ConfigError(f"the key {config.key} in the token does not match {config.crt}")
        store = SqliteStore.open(resolve_path(home, config.db.data_source))
    except BaseException:
        keystore.close()
        raise
    audit = audit_log(config, home)
    issuer = Issuer(intermediate, (intermediate,), key, keystore.run_async, store, audit)
    authority = Authority(config, issuer, root, store, home)
    try:
        await audit.append(AuditEvent("token.login", "success", process_actor(),
                                      {"label": keystore.token_label}))
    except AuditError:
        await audit.close()
        await store.close()
        keystore.close()
        raise ConfigError("the audit log cannot be written; the CA will not start without it"
                          ) from None
    return Runtime(config_path, home, config, keystore, store, issuer, authority, root,
                   intermediate, audit)
