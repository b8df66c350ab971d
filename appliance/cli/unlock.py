"""applianctl unlock, seal, rekey-shares: the custodians' commands (quorum mode)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from appliance.cli.app import ca_config_path, record_cli_event, with_options
from appliance.errors import ApplianceError, BadRequest


def _socket(ca_config: Path | None, socket_path: Path | None) -> Path:
    from appliance.config import home_of, load_config, resolve_path

    if socket_path is not None:
        return socket_path
    path = ca_config_path(ca_config)
    config = load_config(path)
    return resolve_path(home_of(path), config.unlock.admin_socket)


def _share_texts(files: tuple[Path, ...], prompts: int) -> list[str]:
    import getpass

    from appliance.server.hardening import forbid_core_dumps
    from appliance.unlock.quorum import read_share_text

    forbid_core_dumps()
    if files:
        return [read_share_text(f.read_text()) for f in files]
    if not sys.stdin.isatty():
        raise BadRequest("no --share-file given and no terminal to type a share on")
    return [read_share_text(getpass.getpass(f"Share {i + 1} (words, not echoed): "))
            for i in range(prompts)]


with_socket = with_options(
    click.option("--ca-config", type=click.Path(path_type=Path),
                 help="ca.json (default: $APPLIANCE_HOME/config/ca.json)."),
    click.option("--socket", "socket_path", type=click.Path(path_type=Path),
                 help="The CA's admin socket (default: from ca.json)."),
)


@click.command()
@click.option("--share-file", "share_files", multiple=True, type=click.Path(path_type=Path,
              exists=True), help="A share file (repeatable); else the share is typed, unechoed.")
@click.option("--reset", is_flag=True, help="Discard the shares handed in so far.")
@click.option("--status", "status_only", is_flag=True,
              help="Only show the state: sealed, unsealing, unsealed (serving) or sealing.")
@with_socket
def unlock(share_files: tuple[Path, ...], reset: bool, status_only: bool,
           ca_config: Path | None, socket_path: Path | None) -> None:
    """Hand unseal share(s) to the running CA over its admin socket."""
    from appliance.unlock.admin import admin_request

    sock = _socket(ca_config, socket_path)
    if reset or status_only:
        answer = admin_request(sock, {"op": "reset" if reset else "status"})
        # `state` tells "unsealing" (logging in, starting workers) from "unsealed" (serving).
        state = answer.get("state") or ("sealed" if answer["sealed"] else "unsealed")
        click.echo(f"{state}, progress {answer['progress']}")
        return
    failed = False
    for share in _share_texts(share_files, 1):
        answer = admin_request(sock, {"op": "unseal", "share": share})
        if not answer.get("ok"):
            click.echo(f"error: {answer.get('error')}", err=True)
            failed = True
            continue
        click.echo(f"{answer.get('message', 'ok')}; progress {answer['progress']}")
    if failed:
        sys.exit(1)


@click.command()
@with_socket
def seal(ca_config: Path | None, socket_path: Path | None) -> None:
    """Take the issuer key offline: drain the workers and log out of the token."""
    from appliance.unlock.admin import admin_request

    answer = admin_request(_socket(ca_config, socket_path), {"op": "seal"})
    if not answer.get("sealed"):
        raise ApplianceError(answer.get("error") or "the CA did not seal")
    click.echo("sealed")


@click.command("rekey-shares")
@click.option("--quorum", required=True, help="M/N of the new share set.")
@click.option("--share-dir", required=True, type=click.Path(path_type=Path),
              help="Where to write the new shares.")
@click.option("--share-file", "share_files", multiple=True,
              type=click.Path(path_type=Path, exists=True),
              help="A current share (repeatable; M are needed), else typed unechoed.")
@click.option("--ca-config", type=click.Path(path_type=Path))
def rekey_shares_cmd(quorum: str, share_dir: Path, share_files: tuple[Path, ...],
                     ca_config: Path | None) -> None:
    """New custodian shares for the same PIN; the old set stops working."""
    from appliance.ceremony.quorum import rekey_shares
    from appliance.config import home_of, load_config, resolve_path
    from appliance.unlock.quorum import SealedPin, parse_quorum

    path = ca_config_path(ca_config)
    config = load_config(path)
    sealed = SealedPin.load(resolve_path(home_of(path), config.unlock.sealed_pin))
    current = _share_texts(share_files, sealed.threshold)
    new_quorum = parse_quorum(quorum)
    record_cli_event(path, "unseal.share", {"action": "rekey-shares",
                                            "quorum": f"{new_quorum[0]}/{new_quorum[1]}"})
    paths = rekey_shares(path, current, new_quorum, share_dir)
    click.echo(f"{len(paths)} new shares in {share_dir}; the previous shares no longer work.")
