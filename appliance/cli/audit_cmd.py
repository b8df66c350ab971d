"""applianctl audit verify|tail: check and read the hash-chained audit log."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from appliance.cli.app import ca_config_path
from appliance.errors import BadRequest

if TYPE_CHECKING:
    from cryptography import x509

    from appliance.audit import TailRepair
    from appliance.config import CaConfig


def _paths(ca_config: Path | None) -> tuple[CaConfig, Path]:
    from appliance.config import home_of, load_config

    path = ca_config_path(ca_config)
    return load_config(path), home_of(path)


def issuer_certificates(home: Path) -> list[x509.Certificate]:
    """Every certificate under certs/ (old intermediates included) may have signed checkpoints."""
    from cryptography import x509

    certs: list[x509.Certificate] = []
    for f in sorted((home / "certs").glob("*.crt")):
        try:
            certs += x509.load_pem_x509_certificates(f.read_bytes())
        except ValueError:
            continue
    return certs


@click.group()
def audit() -> None:
    """The hash-chained audit log."""


@audit.command("verify")
@click.argument("file", required=False, type=click.Path(path_type=Path))
@click.option("--ca-config", type=click.Path(path_type=Path))
def audit_verify(file: Path | None, ca_config: Path | None) -> None:
    """Check the chain and the checkpoint signatures; name the first bad record."""
    from appliance.audit import verify
    from appliance.config import resolve_path

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
    for repair in result.repairs:
        click.echo(f"repaired: record {repair.seq} (line {repair.line}) cut off a torn record "
                   f"of {repair.torn_bytes} bytes (sha256 {repair.torn_sha256}) at byte "
                   f"{repair.offset}, kept in {repair.kept_in} {_kept_state(path, repair)}")
    if result.reason:
        click.echo(f"note: {result.reason}")


def _kept_state(log: Path, repair: TailRepair) -> str:
    """Whether the fragment a repair kept aside is still next to the log, unchanged."""
    import hashlib

    try:
        data = (log.parent / repair.kept_in).read_bytes()
    except FileNotFoundError:
        return "(that file is gone)"
    except OSError as e:
        return f"(that file cannot be read: {e.strerror})"
    if len(data) == repair.torn_bytes and hashlib.sha256(data).hexdigest() == repair.torn_sha256:
        return "(present, its bytes match)"
    return "(present, but its bytes do NOT match the record)"


@audit.command("tail")
@click.option("-n", "count", type=click.IntRange(1, 10000), default=20, show_default=True)
@click.option("--ca-config", type=click.Path(path_type=Path))
def audit_tail(count: int, ca_config: Path | None) -> None:
    """Print the most recent records, one JSON object per line."""
    from appliance.audit import tail
    from appliance.config import resolve_path

    config, home = _paths(ca_config)
    path = resolve_path(home, config.audit.path)
    if not path.exists():
        raise BadRequest(f"{path} does not exist")
    for record in tail(path, count):
        click.echo(json.dumps(record))
