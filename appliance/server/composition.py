"""The composition root: a CA's services (token, store, audit log, issuer, authority) from ca.json.

`compose_services` is the one place they are wired together; each may be handed in instead (a
test passes its own token session, store, audit log or clock). `open_services` is what a server
process does: log into the issuer token named in ca.json and compose around it.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from appliance.audit import AuditError, AuditEvent, AuditLog, AuditSink
from appliance.authority.authority import Authority
from appliance.config import CaConfig, home_of, load_config, resolve_path
from appliance.errors import ConfigError
from appliance.issuance.issuer import Issuer
from appliance.storage.sqlite import SqliteStore
from hsm.pkcs11_store import Pkcs11KeyStore
from hsm.uri import Pkcs11Uri


@dataclass
class Services:
    """What one process of the CA runs on; `close` releases what it opened."""

    config_path: Path
    home: Path
    config: CaConfig  # replaced on reload
    keystore: Pkcs11KeyStore
    store: SqliteStore
    issuer: Issuer
    authority: Authority
    root: x509.Certificate
    intermediate: x509.Certificate
    audit: AuditSink
    # False when the token session was handed in: it belongs to whoever logged in.
    owns_keystore: bool = True
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
        if self.owns_keystore:
            self.keystore.close()


AUDIT_REFUSES_START = "the audit log cannot be written; the CA will not start without it"


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


def compose_services(config_path: Path, keystore: Pkcs11KeyStore, *,
                     config: CaConfig | None = None, store: SqliteStore | None = None,
                     audit: AuditSink | None = None, clock: Callable[[], float] | None = None,
                     owns_keystore: bool = False) -> Services:
    """Wire a CA's services around a logged-in issuer token; what is not given is opened.

    Refuses a CA key that is extractable or not the intermediate certificate's key. The store and
    audit log, given or opened, belong to the result (`Services.close` closes them); the token
    session only when `owns_keystore`.
    """
    config = config or load_config(config_path)
    home = home_of(config_path)
    root = load_certificate(resolve_path(home, config.root), "root certificate")
    intermediate = load_certificate(resolve_path(home, config.crt), "intermediate certificate")
    ref = keystore.find_uri(config.key)
    keystore.check_protected(ref)  # refuse to serve with an extractable CA key
    key = keystore.private_key(ref)
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if key.public_key().public_bytes(der, spki) != intermediate.public_key().public_bytes(
            der, spki):
        raise ConfigError(f"the key {config.key} in the token does not match {config.crt}")
    store = store or SqliteStore.open(resolve_path(home, config.db.data_source))
    audit = audit or audit_log(config, home)
    issuer = Issuer(intermediate, (intermediate,), key, keystore.run_async, store, audit,
                    token_lost=lambda: keystore.lost_reason)
    authority = Authority(config, issuer, root, store, home, clock=clock or time.time)
    return Services(config_path, home, config, keystore, store, issuer, authority, root,
                    intermediate, audit, owns_keystore=owns_keystore)


async def open_services(config_path: Path, issuer_pin: str) -> Services:
    """Log into the issuer token of ca.json, compose the services, record the login."""
    config = load_config(config_path)
    prepare_token_environment(config, home_of(config_path))
    module, token = module_and_token(config)
    keystore = Pkcs11KeyStore.open(module, token, issuer_pin)
    try:
        services = compose_services(config_path, keystore, config=config, owns_keystore=True)
    except BaseException:
        keystore.close()
        raise
    try:
        await services.audit.append(AuditEvent("token.login", "success", process_actor(),
                                               {"label": keystore.token_label}))
    except AuditError as e:
        await services.audit.close()
        await services.store.close()
        keystore.close()
        raise ConfigError(f"{AUDIT_REFUSES_START}: {e}") from None
    return services


def check_audit_log(audit: AuditLog) -> None:
    """Before serving: check the chain, cut off a torn last record; ConfigError with the reason."""
    try:
        audit.check_chain_sync()
    except AuditError as e:
        raise ConfigError(f"{AUDIT_REFUSES_START}: {e}") from None
