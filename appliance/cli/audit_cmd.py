"""applianctl audit verify|tail, and the records CLI commands write themselves."""

from __future__ import annotations

import getpass
import json
import os
import sys
from pathlib import Path
from typing import Any

import click
from cryptography import x509

from appliance.audit import AuditError, AuditEvent, tail, verify
from appliance.cli.main import cli
from appliance.config import CaConfig, default_home, home_of, load_config, resolve_path
from appliance.errors import ApplianceError, BadRequest


def cli_actor() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.geteuid())
    return f"cli:{user}"


def record_cli_event(config_path: Path, event: str, details: dict[str, Any],
                     outcome: str = "success") -> None:
    """Audit a CLI change to the CA (init, provisioner and policy edits); fail closed."""
    from appliance.server.composition import audit_log

    config = load_config(config_path)
    log = audit_log(config, home_of(config_path))
    try:
        log.append_sync(AuditEvent(event, outcome, cli_actor(), details))
    except AuditError as e:
        raise ApplianceError(f"the audit log cannot be written: {e}") from None


def _paths(ca_config: Path | None) -> tuple[CaConfig, Path]:
    path = (ca_config or default_home() / "config" / "ca.json").absolute()
    return load_config(path), home_of(path)


def issuer_certificates(home: Path) -> list[x509.Certificate]:
    """Every certificate under certs/ (old intermediates included) may have signed checkpoints."""
    certs: list[x509.Certificate] = []
    for f in sorted((home / "certs").glob("*.crt")):
        try:
            certs += x509.load_pem_x509_certificates(f.read_bytes())
        except ValueError:
            continue
    return certs


@cli.group()
def audit() -> None:
    """The hash-chained audit log."""


@audit.command("verify")
@click.argument("file", required=False, type=click.Path(path_type=Path))
@click.option("--ca-config", type=click.Path(path_type=Path))
def audit_verify(file: Path | None, ca_config: Path | None) -> None:
    """Check the chain and the checkpoint signatures; name the first bad record."""
    config, home = _paths(ca_config)
    path = file or resolve_path(home, config.audit.path)
    if not path.exists():
        raise BadRequest(f"{path} does not exist")
    result = verify(path, issuer_certificates(home))
    if not result.ok:
        click.echo(f"error: audit log {path} is broken: {result.reason}", err=True)
        sys.exit(1)
    click.echo(f"ok: {result.records} records, {result.checkpoints} checkpoints; last "
               f"checkpoint at record {result.last_checkpoint_seq}")
    if result.reason:
        click.echo(f"note: {result.reason}")


@audit.command("tail")
@click.option("-n", "count", type=click.IntRange(1, 10000), default=20, show_default=True)
@click.option("--ca-config", type=click.Path(path_type=Path))
def audit_tail(count: int, ca_config: Path | None) -> None:
    """Print the most recent records, one JSON object per line."""
    config, home = _paths(ca_config)
    path = resolve_path(home, config.audit.path)
    if not path.exists():
        raise BadRequest(f"{path} does not exist")
    for record in tail(path, count):
        click.echo(json.dumps(record))
