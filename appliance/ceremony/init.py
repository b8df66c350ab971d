"""`applianctl init`: create the tokens (embedded SoftHSM2), the CA keys in them, the CA
certificates, the first JWK provisioner and the CA home's files.

Three steps, usable alone (a test makes a CA in its own throwaway token): `_prepare_softhsm`,
`create_ca_keys` (keys and certificates, in the tokens), `write_ca_home` (ca.json and the rest).
"""

from __future__ import annotations

import os
import secrets
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509

from appliance.authority.provisioners.jwk_keys import (
    encrypt_private_key,
    generate_key,
    public_jwk,
)
from appliance.config import (
    AcmeProvisionerConfig,
    AuthorityConfig,
    CaConfig,
    CrlConfig,
    DbConfig,
    JwkProvisionerConfig,
    KmsConfig,
    UnlockConfig,
    resolve_path,
    write_config,
)
from appliance.errors import ConfigError
from appliance.home import Defaults
from appliance.issuance.ca_certs import build_intermediate, build_root, fingerprint, pem
from appliance.storage.sqlite import SqliteStore
from hsm.keystore import KeyRef, KeySpec
from hsm.pkcs11_store import Pkcs11KeyStore
from hsm.softhsm import find_softhsm_module, init_token, token_exists, write_softhsm_conf
from hsm.uri import Pkcs11Uri

ROOT_KEY_LABEL = "root-ca"
INTERMEDIATE_KEY_LABEL = "intermediate-ca"


@dataclass(frozen=True)
class InitOptions:
    home: Path
    name: str
    dns_names: tuple[str, ...]
    address: str
    provisioner: str
    root_pin: str
    issuer_pin: str
    provisioner_password: bytes
    key_spec: KeySpec
    module_path: str
    root_token: str
    issuer_token: str
    force: bool = False
    acme: bool = False
    quorum: tuple[int, int] | None = None


@dataclass(frozen=True)
class CaKeys:
    """The CA keys made in the tokens, and the certificates the root key signed."""

    root_key: KeyRef
    intermediate_key: KeyRef
    root: x509.Certificate
    intermediate: x509.Certificate


@dataclass(frozen=True)
class InitResult:
    config_path: Path
    root_fingerprint: str
    root_path: Path
    intermediate_path: Path
    defaults_path: Path


def is_softhsm(module_path: str) -> bool:
    return "softhsm" in os.path.basename(module_path).lower()


def _prepare_softhsm(opts: InitOptions) -> Path:
    """Embedded default: a token directory under the home, tokens created when missing."""
    hsm_dir = opts.home / "hsm"
    if opts.force and (hsm_dir / "tokens").exists():
        shutil.rmtree(hsm_dir / "tokens")
    conf = write_softhsm_conf(hsm_dir)
    for label, pin in ((opts.root_token, opts.root_pin), (opts.issuer_token, opts.issuer_pin)):
        if not token_exists(opts.module_path, label, conf):
            # The SO PIN only re-initialises a user PIN; SoftHSM2 never locks the user PIN, so a
            # random SO PIN that nobody keeps removes a second way into the token.
            init_token(opts.module_path, label, secrets.token_urlsafe(24), pin, conf=conf)
    return conf


def _replace_key(store: Pkcs11KeyStore, label: str, force: bool) -> None:
    from hsm.errors import KeyNotFound

    while True:
        try:
            ref = store.find(label=label)
        except KeyNotFound:
            return
        if not force:
            raise ConfigError(f"token {store.token_label} already holds a key labelled {label}; "
                              "use --force to replace it")
        store.destroy(ref)


def _make_home(home: Path) -> Path:
    """The CA home and its directories, 0700; returns the certificates' directory."""
    certs = home / "certs"
    for d in (home, home / "config", home / "db", certs):
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(home, 0o700)
    return certs


def initialise(opts: InitOptions) -> InitResult:
    """The whole ceremony: tokens (embedded SoftHSM2), keys and certificates, the CA home."""
    config_path = opts.home / "config" / "ca.json"
    if config_path.exists() and not opts.force:
        raise ConfigError(f"a CA already exists at {opts.home}; use --force to replace it")
    _make_home(opts.home)  # 0700 before the token directory is made in it
    if opts.module_path == find_softhsm_module() or is_softhsm(opts.module_path):
        conf: Path | None = _prepare_softhsm(opts)
        os.environ["SOFTHSM2_CONF"] = str(conf)
    else:
        conf = None
    with Pkcs11KeyStore.open(opts.module_path, opts.root_token, opts.root_pin) as root_store, \
            Pkcs11KeyStore.open(opts.module_path, opts.issuer_token, opts.issuer_pin) as issuer:
        keys = create_ca_keys(root_store, issuer, opts.name, opts.key_spec, force=opts.force)
    return write_ca_home(opts, keys, conf)


def create_ca_keys(root_store: Pkcs11KeyStore, issuer_store: Pkcs11KeyStore, name: str,
                   key_spec: KeySpec, *, force: bool = False, root_label: str = ROOT_KEY_LABEL,
                   intermediate_label: str = INTERMEDIATE_KEY_LABEL) -> CaKeys:
    """Generate the root and intermediate keys in their tokens; the root signs both certificates.

    The two stores may be one (a single token holding both keys, as in tests).
    """
    _replace_key(root_store, root_label, force)
    _replace_key(issuer_store, intermediate_label, force)
    root_ref = root_store.generate(key_spec, root_label)
    inter_ref = issuer_store.generate(key_spec, intermediate_label)
    root_store.check_protected(root_ref)
    issuer_store.check_protected(inter_ref)
    root_key = root_store.private_key(root_ref)
    root_cert = root_store.run(build_root, name, root_key)
    inter_cert = root_store.run(build_intermediate, name, issuer_store.public_key(inter_ref),
                                root_cert, root_key)
    del root_key
    return CaKeys(root_ref, inter_ref, root_cert, inter_cert)


def write_ca_home(opts: InitOptions, keys: CaKeys, softhsm_conf: Path | None) -> InitResult:
    """The CA home's files: certificates, the first JWK provisioner, ca.json, database, defaults."""
    config_path = opts.home / "config" / "ca.json"
    certs = _make_home(opts.home)
    root_path = certs / "root_ca.crt"
    inter_path = certs / "intermediate_ca.crt"
    for path, cert in ((root_path, keys.root), (inter_path, keys.intermediate)):
        path.write_text(pem(cert))
        os.chmod(path, 0o644)

    prov_key = generate_key("EC", "P-256")
    provisioner = JwkProvisionerConfig(
        type="JWK", name=opts.provisioner, key=public_jwk(prov_key),
        encrypted_key=encrypt_private_key(prov_key, opts.provisioner_password))
    del prov_key

    module_uri = Pkcs11Uri(token=opts.issuer_token, module_path=opts.module_path).format()
    config = CaConfig(
        root=str(root_path), crt=str(inter_path),
        key=keys.intermediate_key.to_uri(), root_key=keys.root_key.to_uri(),
        kms=KmsConfig(type="pkcs11", uri=module_uri,
                      softhsm_conf=str(softhsm_conf) if softhsm_conf else None),
        address=opts.address, dns_names=list(opts.dns_names),
        db=DbConfig(type="sqlite", data_source=str(opts.home / "db" / "appliance.db")),
        authority=AuthorityConfig(provisioners=[provisioner] + (
            [AcmeProvisionerConfig(type="ACME", name="acme")] if opts.acme else [])),
        crl=CrlConfig(enabled=True),
        unlock=UnlockConfig(mode="quorum" if opts.quorum else "password"),
    )
    db_path = resolve_path(opts.home, config.db.data_source)
    if opts.force and db_path.exists():
        # The replaced CA's records are kept, beside the new database, never deleted.
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        for suffix in ("", "-wal", "-shm"):
            old = db_path.with_name(db_path.name + suffix)
            if old.exists():
                old.rename(db_path.with_name(f"{db_path.name}.replaced-{stamp}{suffix}"))
    SqliteStore.create(db_path)
    write_config(config_path, config)

    _, port = config.host_port()
    host = opts.dns_names[0]
    host = f"[{host}]" if ":" in host else host
    defaults = Defaults(ca_url=f"https://{host}:{port}", fingerprint=fingerprint(keys.root),
                        root=root_path)
    defaults.write(opts.home)
    return InitResult(config_path, fingerprint(keys.root), root_path, inter_path,
                      opts.home / "config" / "defaults.json")
