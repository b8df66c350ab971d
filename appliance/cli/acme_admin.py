"""applianctl acme eab add|list|remove: external account binding keys for ACME provisioners.

Run on the CA host: the keys go straight into the CA's database (the server reads them from
there, so no reload is needed).
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import click

from appliance.cli.app import ca_config_path, record_cli_event, run
from appliance.errors import BadRequest
from appliance.jose.base64url import b64url_encode

if TYPE_CHECKING:
    from appliance.storage.acme_protocol import AcmeStore

T = TypeVar("T")


def _acme_database(ca_config: Path | None, provisioner: str) -> Path:
    from appliance.config import home_of, load_config, resolve_path

    path = ca_config_path(ca_config)
    config = load_config(path)
    if not any(p.name == provisioner and p.type == "ACME"
               for p in config.authority.provisioners):
        raise BadRequest(f"no ACME provisioner named {provisioner!r} in {path}")
    return resolve_path(home_of(path), config.db.data_source)


def _with_acme_store(db: Path, action: Callable[[AcmeStore], Awaitable[T]]) -> T:
    """Run `action` on the CA database's ACME store, opened for this command alone."""
    from appliance.storage.sqlite import SqliteStore
    from appliance.storage.sqlite_acme import SqliteAcmeStore

    async def go() -> T:
        store = SqliteStore.open(db)
        acme_store = SqliteAcmeStore(store)
        try:
            return await action(acme_store)
        finally:
            await acme_store.close()
            await store.close()

    return run(go())


def _record(ca_config: Path | None, action: str, provisioner: str, ref: str | None) -> None:
    record_cli_event(ca_config_path(ca_config), "provisioner.change",
                     {"action": f"eab-{action}", "name": provisioner, "eab": ref})


@click.group()
def acme() -> None:
    """ACME administration."""


@acme.group()
def eab() -> None:
    """External account binding keys."""


ca_config_option = click.option("--ca-config", type=click.Path(path_type=Path),
                                help="ca.json (default: $APPLIANCE_HOME/config/ca.json).")


@eab.command("add")
@click.argument("provisioner")
@click.option("--reference", help="Your name for the key (unique per provisioner).")
@ca_config_option
def eab_add(provisioner: str, reference: str | None, ca_config: Path | None) -> None:
    """Create an EAB key; prints the key id and the HMAC key (shown once)."""
    db = _acme_database(ca_config, provisioner)
    _record(ca_config, "add", provisioner, reference)
    key = _with_acme_store(db, lambda acme_store: acme_store.add_eab_key(
        provisioner, reference, created_at=int(time.time())))
    hmac_b64 = b64url_encode(key.hmac_key)
    click.echo(json.dumps({"kid": key.kid, "hmacKey": hmac_b64, "reference": reference,
                           "provisioner": provisioner}, indent=2))


@eab.command("list")
@click.argument("provisioner")
@ca_config_option
def eab_list(provisioner: str, ca_config: Path | None) -> None:
    """List EAB keys (never their HMAC keys) and what they are bound to."""
    db = _acme_database(ca_config, provisioner)
    keys = _with_acme_store(db, lambda acme_store: acme_store.list_eab_keys(provisioner))
    click.echo(json.dumps([
        {"kid": k.kid, "reference": k.reference,
         "createdAt": datetime.fromtimestamp(k.created_at, UTC).isoformat(),
         "boundAccount": k.account_id,
         "boundAt": datetime.fromtimestamp(k.bound_at, UTC).isoformat() if k.bound_at else None}
        for k in keys], indent=2))


@eab.command("remove")
@click.argument("provisioner")
@click.argument("kid")
@ca_config_option
def eab_remove(provisioner: str, kid: str, ca_config: Path | None) -> None:
    """Remove an EAB key (an account already bound with it keeps working)."""
    db = _acme_database(ca_config, provisioner)
    _record(ca_config, "remove", provisioner, kid)
    if not _with_acme_store(db, lambda acme_store: acme_store.remove_eab_key(provisioner, kid)):
        raise BadRequest(f"no EAB key {kid!r} for provisioner {provisioner!r}")
    click.echo(f"Removed EAB key {kid}.")
