"""applianctl acme eab add|list|remove: external account binding keys for ACME provisioners.

Run on the CA host: the keys go straight into the CA's database (the server reads them from
there, so no reload is needed).
"""

from __future__ import annotations

import asyncio
import base64
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from appliance.cli.main import cli
from appliance.config import CaConfig, default_home, home_of, load_config, resolve_path
from appliance.errors import BadRequest
from appliance.storage import acme as st
from appliance.storage.sqlite import SqliteStore


def _acme_config(ca_config: Path | None, provisioner: str) -> tuple[CaConfig, Path]:
    path = (ca_config or default_home() / "config" / "ca.json").absolute()
    config = load_config(path)
    if not any(p.name == provisioner and p.type == "ACME"
               for p in config.authority.provisioners):
        raise BadRequest(f"no ACME provisioner named {provisioner!r} in {path}")
    return config, resolve_path(home_of(path), config.db.data_source)


def _run_op(db: Path, op: Any) -> Any:
    async def go() -> Any:
        store = SqliteStore.open(db)
        try:
            return await store.run_op(op)
        finally:
            await store.close()

    try:
        return asyncio.run(go())
    except st.AcmeConflict as e:
        raise BadRequest(str(e)) from None


def _record(ca_config: Path | None, action: str, provisioner: str, ref: str | None) -> None:
    from appliance.cli.audit_cmd import record_cli_event

    path = (ca_config or default_home() / "config" / "ca.json").absolute()
    record_cli_event(path, "provisioner.change", {"action": f"eab-{action}",
                                                  "name": provisioner, "eab": ref})


@cli.group()
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
    _, db = _acme_config(ca_config, provisioner)
    _record(ca_config, "add", provisioner, reference)
    key: st.EabKey = _run_op(db, st.op_add_eab(provisioner, reference))
    hmac_b64 = base64.urlsafe_b64encode(key.hmac_key).rstrip(b"=").decode()
    click.echo(json.dumps({"kid": key.kid, "hmacKey": hmac_b64, "reference": reference,
                           "provisioner": provisioner}, indent=2))


@eab.command("list")
@click.argument("provisioner")
@ca_config_option
def eab_list(provisioner: str, ca_config: Path | None) -> None:
    """List EAB keys (never their HMAC keys) and what they are bound to."""
    _, db = _acme_config(ca_config, provisioner)
    keys: list[st.EabKey] = _run_op(db, st.op_list_eab(provisioner))
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
    _, db = _acme_config(ca_config, provisioner)
    _record(ca_config, "remove", provisioner, kid)
    if not _run_op(db, st.op_remove_eab(provisioner, kid)):
        raise BadRequest(f"no EAB key {kid!r} for provisioner {provisioner!r}")
    click.echo(f"Removed EAB key {kid}.")
