"""The `applianctl` group and what its command modules share: options, secrets, files, errors.

Command modules import this and the domain, never each other or main.py (which assembles them).
Everything here and at the top of a command module is cheap to import: `applianctl --help` and
the client commands must start in well under 0.3 s, so SQLAlchemy, aiohttp, pkcs11, pydantic
(ca.json) and Jinja2 are imported inside the commands that use them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from appliance import __version__
from appliance.errors import ApplianceError, BadRequest
from appliance.home import Defaults, default_home
from hsm.errors import HsmError

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

    from appliance.client import CaClient

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


class ApplianceGroup(click.Group):
    """Turns every expected failure into `error: <message>` and exit code 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (ApplianceError, HsmError) as e:
            message = getattr(e, "message", None) or str(e)
            click.echo(f"error: {message}", err=True)
            sys.exit(1)
        except OSError as e:
            where = f" {e.filename}" if e.filename else ""
            click.echo(f"error:{where} {e.strerror or e}", err=True)
            sys.exit(1)


@click.group(cls=ApplianceGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="applianctl")
def cli() -> None:
    """Administer and use an HSM-backed certificate authority."""


# -- options ------------------------------------------------------------------------------------
ca_url_option = click.option("--ca-url", help="URL of the CA (default: from defaults.json).")
root_option = click.option("--root", type=click.Path(path_type=Path),
                           help="Root certificate to trust (default: from defaults.json).")


def with_options(*options: Callable[[F], F]) -> Callable[[F], F]:
    """Apply a list of click options in the order written (the first shows first in --help)."""
    def decorate(f: F) -> F:
        for option in reversed(options):
            f = option(f)
        return f
    return decorate


# The key pair a command generates locally (certificate, rekey).
key_type_options = with_options(
    click.option("--kty", type=click.Choice(["EC", "RSA", "OKP"]), default="EC",
                 show_default=True),
    click.option("--curve", default="P-256", show_default=True),
    click.option("--size", type=int, default=2048, show_default=True),
)


def ca_config_path(ca_config: Path | None) -> Path:
    """The ca.json a command works on: the one given, else the CA home's."""
    return (ca_config or default_home() / "config" / "ca.json").absolute()


def run(coro: Coroutine[Any, Any, T]) -> T:
    import asyncio

    return asyncio.run(coro)


# -- secrets ------------------------------------------------------------------------------------
def read_secret(path: Path | None, prompt: str, what: str) -> str:
    """A PIN or password from a file (first line), or from the terminal without echo.

    Every command that reads one first forbids core dumps of itself (and ptrace by its user).
    """
    from appliance.server.hardening import forbid_core_dumps

    forbid_core_dumps()
    if path is not None:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise BadRequest(f"{what} file {path} does not exist") from None
        except PermissionError:
            raise BadRequest(f"{what} file {path} is not readable") from None
        secret = text.splitlines()[0] if text.strip() else ""
        if not secret:
            raise BadRequest(f"{what} file {path} is empty")
        return secret
    if sys.stdin.isatty():
        import getpass

        secret = getpass.getpass(prompt)
        if secret:
            return secret
    raise BadRequest(f"no {what} given: use the --{what.replace(' ', '-')}-file option")


# -- the CA as a client sees it -----------------------------------------------------------------
def client_from(ca_url: str | None, root: Path | None) -> tuple[CaClient, Defaults | None]:
    from appliance.client import CaClient

    defaults = Defaults.load()
    url = ca_url or (defaults.ca_url if defaults else None)
    root_path = root or (defaults.root if defaults else None)
    if not url or not root_path:
        raise BadRequest("no CA configured: run 'applianctl bootstrap --ca-url URL "
                         "--fingerprint SHA' or pass --ca-url and --root")
    return CaClient(url, root_path), defaults


def mint_token(client: CaClient, defaults: Defaults | None, subject: str, sans: list[str],
               provisioner: str | None, password_file: Path | None, *,
               endpoint: str = "/1.0/sign", lifetime: int = 300) -> str:
    """A one-time token for `endpoint`, signed with the provisioner key the CA hands out."""
    password = read_secret(password_file, "Provisioner password: ", "password")
    signer = client.token_signer(provisioner, password.encode())
    return signer.mint(subject, f"{client.ca_url}{endpoint}", sans=sans,
                       root_fingerprint=defaults.fingerprint if defaults else None,
                       lifetime=lifetime)


# -- files --------------------------------------------------------------------------------------
def check_writable(*paths: Path, force: bool) -> None:
    """Before asking the CA for anything: refuse what could not be written afterwards."""
    for path in paths:
        if path.exists() and not force:
            raise BadRequest(f"{path} already exists; use --force to overwrite it")
        parent = path.parent if str(path.parent) else Path(".")
        if not parent.is_dir():
            raise BadRequest(f"cannot write {path}: directory {parent} does not exist")
        if not os.access(parent, os.W_OK):
            raise BadRequest(f"cannot write {path}: directory {parent} is not writable")


def write_files(files: list[tuple[Path, bytes, int]]) -> None:
    """Write each file to a temporary sibling first, then rename them all into place.

    A failure while writing leaves none of the new files behind; the renames that follow are
    atomic each.
    """
    from appliance.fileio import replace_durably, write_temporary

    staged: list[tuple[Path, Path]] = []
    try:
        for path, data, mode in files:
            try:
                staged.append((write_temporary(path, data, mode), path))
            except OSError as e:
                raise BadRequest(f"cannot write {path}: {e.strerror}") from None
        for temporary, path in staged:
            replace_durably(temporary, path)
    finally:
        for temporary, _ in staged:
            temporary.unlink(missing_ok=True)


def write_public(path: Path, data: bytes, force: bool) -> None:
    check_writable(path, force=force)
    write_files([(path, data, 0o644)])


def chain_pem(chain: list[x509.Certificate]) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)


def write_key_and_chain(key_file: Path, key: PrivateKeyTypes, crt_file: Path,
                        chain: list[x509.Certificate]) -> None:
    """The new private key (0600, unencrypted PKCS#8) and its chain, both or neither."""
    from cryptography.hazmat.primitives import serialization

    write_files([
        (key_file, key.private_bytes(serialization.Encoding.PEM,
                                     serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()), 0o600),
        (crt_file, chain_pem(chain), 0o644),
    ])
    click.echo(f"Your certificate has been saved in {crt_file}.")
    click.echo(f"Your private key has been saved in {key_file}.")


# -- the audit trail of CLI changes -------------------------------------------------------------
def cli_actor() -> str:
    import getpass

    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.geteuid())
    return f"cli:{user}"


def record_cli_event(config_path: Path, event: str, details: dict[str, Any],
                     outcome: str = "success") -> None:
    """Audit a CLI change to the CA (init, provisioner and policy edits); fail closed."""
    from appliance.audit import AuditError, AuditEvent
    from appliance.config import home_of, load_config
    from appliance.server.composition import audit_log

    config = load_config(config_path)
    log = audit_log(config, home_of(config_path))
    try:
        log.append_sync(AuditEvent(event, outcome, cli_actor(), details))
    except AuditError as e:
        raise ApplianceError(f"the audit log cannot be written: {e}") from None
