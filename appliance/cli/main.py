"""applianctl: `step ca`-style commands. Errors are one line on stderr and a non-zero exit."""

from __future__ import annotations

import asyncio
import getpass
import os
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import click
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from appliance import __version__
from appliance.authority.provisioners.jwk_keys import generate_key
from appliance.client import CaClient, ClientError, make_csr, token_claims_unverified
from appliance.config import Defaults, default_home
from appliance.errors import ApplianceError, BadRequest
from appliance.fileio import replace_durably, write_temporary
from hsm.errors import HsmError

T = TypeVar("T")


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


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def read_secret(path: Path | None, prompt: str, what: str) -> str:
    """A PIN or password from a file (first line), or from the terminal without echo."""
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
        secret = getpass.getpass(prompt)
        if secret:
            return secret
    raise BadRequest(f"no {what} given: use the --{what.replace(' ', '-')}-file option")


def client_from(ca_url: str | None, root: Path | None) -> tuple[CaClient, Defaults | None]:
    defaults = Defaults.load()
    url = ca_url or (defaults.ca_url if defaults else None)
    root_path = root or (defaults.root if defaults else None)
    if not url or not root_path:
        raise BadRequest("no CA configured: run 'applianctl bootstrap --ca-url URL "
                         "--fingerprint SHA' or pass --ca-url and --root")
    return CaClient(url, root_path), defaults


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
    staged: list[tuple[Path, Path]] = []
    try:
        for path, data, mode in files:
            try:
                staged.append((write_temporary(path, data, mode), path))
            except OSError as e:
                raise BadRequest(f"cannot write {path}: {e.strerror}") from None
        for tmp, path in staged:
            replace_durably(tmp, path)
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)


def write_public(path: Path, data: bytes, force: bool) -> None:
    check_writable(path, force=force)
    write_files([(path, data, 0o644)])


ca_url_option = click.option("--ca-url", help="URL of the CA (default: from defaults.json).")
root_option = click.option("--root", type=click.Path(path_type=Path),
                           help="Root certificate to trust (default: from defaults.json).")


@click.group(cls=ApplianceGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="applianctl")
def cli() -> None:
    """Administer and use an HSM-backed certificate authority."""


# -- CA administration ------------------------------------------------------------------------
@cli.command()
@click.option("--name", default="Appliance", show_default=True, help="Name of the PKI.")
@click.option("--dns", "dns_names", multiple=True,
              help="DNS name or IP of the CA (repeatable; default localhost and 127.0.0.1).")
@click.option("--address", default="127.0.0.1:9000", show_default=True,
              help="Address the CA listens on.")
@click.option("--provisioner", default="admin", show_default=True,
              help="Name of the first JWK provisioner.")
@click.option("--password-file", type=click.Path(path_type=Path), help="Root token PIN.")
@click.option("--issuer-password-file", type=click.Path(path_type=Path),
              help="Issuer token PIN (default: --password-file).")
@click.option("--provisioner-password-file", type=click.Path(path_type=Path),
              help="Encrypts the provisioner key (default: --password-file).")
@click.option("--kty", type=click.Choice(["EC", "RSA", "OKP"]), default="EC", show_default=True)
@click.option("--curve", help="EC curve: P-256 (default) or P-384; OKP: Ed25519.")
@click.option("--size", type=int, help="RSA size: 2048 (default), 3072 or 4096.")
@click.option("--hsm-module", help="PKCS#11 module (default: SoftHSM2's).")
@click.option("--root-token", default="appliance-root", show_default=True)
@click.option("--issuer-token", default="appliance-issuer", show_default=True)
@click.option("--home", type=click.Path(path_type=Path),
              help="CA home (default: $APPLIANCE_HOME, else ~/.appliance).")
@click.option("--acme", "with_acme", is_flag=True, help="Also add an ACME provisioner 'acme'.")
@click.option("--quorum", help="M/N: a random issuer PIN, sealed; M of N custodian shares "
              "unseal it (needs --share-dir).")
@click.option("--share-dir", type=click.Path(path_type=Path),
              help="Where to write the N share files (hand each to its custodian).")
@click.option("--force", is_flag=True, help="Replace an existing CA.")
def init(name: str, dns_names: tuple[str, ...], address: str, provisioner: str,
         password_file: Path | None, issuer_password_file: Path | None,
         provisioner_password_file: Path | None, kty: str, curve: str | None, size: int | None,
         hsm_module: str | None, root_token: str, issuer_token: str, home: Path | None,
         with_acme: bool, quorum: str | None, share_dir: Path | None, force: bool) -> None:
    """Create a CA: keys in the token, certificates, ca.json. Prints the root fingerprint last."""
    from appliance.ceremony.init import InitOptions, initialise
    from appliance.issuance.names import parse_san
    from hsm.keystore import KeySpec
    from hsm.softhsm import find_softhsm_module

    module = hsm_module or find_softhsm_module()
    if not module:
        raise BadRequest("SoftHSM2 is not installed (apt-get install softhsm2) and no "
                         "--hsm-module was given")
    for n in dns_names:
        parse_san(n)  # refuses a malformed name now rather than in the TLS certificate
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise BadRequest(f"--address {address!r} must be host:port, e.g. 127.0.0.1:9000")
    import secrets as _secrets

    from appliance.unlock.quorum import parse_quorum

    root_pin = read_secret(password_file, "Root token PIN: ", "password")
    quorum_mn = parse_quorum(quorum) if quorum else None
    if quorum_mn is not None:
        if share_dir is None:
            raise BadRequest("--quorum needs --share-dir")
        if issuer_password_file is not None:
            raise BadRequest("with --quorum the issuer PIN is random and never shown; drop "
                             "--issuer-password-file")
        issuer_pin = _secrets.token_urlsafe(32)
    elif share_dir is not None:
        raise BadRequest("--share-dir goes with --quorum")
    else:
        issuer_pin = (read_secret(issuer_password_file, "Issuer token PIN: ", "issuer password")
                      if issuer_password_file else root_pin)
    prov_password = (read_secret(provisioner_password_file, "Provisioner password: ",
                                 "provisioner password")
                     if provisioner_password_file else root_pin)
    result = initialise(InitOptions(
        home=(home or default_home()).absolute(), name=name,
        dns_names=dns_names or ("localhost", "127.0.0.1"), address=address,
        provisioner=provisioner, root_pin=root_pin, issuer_pin=issuer_pin,
        provisioner_password=prov_password.encode(), key_spec=KeySpec.parse(kty, curve, size),
        module_path=module, root_token=root_token, issuer_token=issuer_token, force=force,
        acme=with_acme, quorum=quorum_mn))
    if quorum_mn is not None:
        assert share_dir is not None
        from appliance.ceremony.quorum import seal_new_ca

        paths = asyncio.run(seal_new_ca(result.config_path, issuer_pin, quorum_mn, share_dir))
        del issuer_pin
        click.echo(f"Issuer PIN sealed; {len(paths)} shares in {share_dir} (any "
                   f"{quorum_mn[0]} unseal the CA). Hand each to its custodian, then delete "
                   "them here.")
    from appliance.cli.audit_cmd import record_cli_event

    record_cli_event(result.config_path, "ca.init", {
        "name": name, "root_sha256": result.root_fingerprint, "key_type": kty,
        "module": module, "root_label": root_token, "issuer_label": issuer_token,
        "quorum": quorum or None})
    click.echo(f"Root certificate: {result.root_path}")
    click.echo(f"Intermediate certificate: {result.intermediate_path}")
    click.echo(f"Configuration: {result.config_path}")
    click.echo(f"Defaults: {result.defaults_path}")
    click.echo("Root fingerprint:")
    click.echo(result.root_fingerprint)


@cli.command()
@click.argument("config", required=False, type=click.Path(path_type=Path))
@click.option("--password-file", type=click.Path(path_type=Path),
              help="Same as --issuer-password-file (step-ca's name for it).")
@click.option("--issuer-password-file", type=click.Path(path_type=Path),
              help="Issuer token PIN (not needed for a CA set up with --quorum).")
@click.option("--resolver", help="DNS server IP:port the CA resolves ACME names through.")
@click.option("--pidfile", type=click.Path(path_type=Path), help="Write the process id here.")
@click.option("--workers", type=click.IntRange(1, 64),
              help="Worker processes (default: ca.json 'workers', else one per core).")
def serve(config: Path | None, password_file: Path | None, issuer_password_file: Path | None,
          resolver: str | None, pidfile: Path | None, workers: int | None) -> None:
    """Run the CA over HTTPS (SIGTERM drains and exits 0; SIGHUP reloads ca.json)."""
    from appliance.config import home_of, load_config
    from appliance.server.hardening import check_home_not_writable_by_others, check_secret_file
    from appliance.server.supervisor import ServeOptions, run_server

    config_path = (config or default_home() / "config" / "ca.json").absolute()
    check_home_not_writable_by_others(home_of(config_path), [config_path])
    pin_file = issuer_password_file or password_file
    pin: str | None = None
    if pin_file is not None:
        check_secret_file(pin_file, "issuer password")
        pin = read_secret(pin_file, "Issuer token PIN: ", "issuer password")
    elif load_config(config_path).unlock.mode != "quorum":
        pin = read_secret(None, "Issuer token PIN: ", "issuer password")
    code = run_server(ServeOptions(config_path, pidfile, resolver, workers), pin)
    sys.exit(code)


# -- client commands --------------------------------------------------------------------------
@cli.command()
@click.option("--ca-url", required=True, help="URL of the CA.")
@click.option("--fingerprint", "sha", required=True, help="SHA-256 fingerprint of the root.")
@click.option("--force", is_flag=True, help="Overwrite existing defaults.")
def bootstrap(ca_url: str, sha: str, force: bool) -> None:
    """Fetch and pin the root by its fingerprint; write defaults.json."""
    home = default_home()
    root_path = home / "certs" / "root_ca.crt"
    existing = Defaults.load(home)
    if existing and not force and (existing.ca_url, existing.fingerprint) != (
            ca_url.rstrip("/"), sha.lower().replace(":", "")):
        raise BadRequest(f"{home}/config/defaults.json already exists; use --force to replace it")
    cert = run(CaClient(ca_url, None).root(sha))
    root_pem = cert.public_bytes(serialization.Encoding.PEM)
    root_path.parent.mkdir(parents=True, exist_ok=True)
    if not (root_path.exists() and root_path.read_bytes() == root_pem):
        write_public(root_path, root_pem, True)
    # Now that the root is pinned, the CA must present a certificate that chains to it.
    run(CaClient(ca_url, root_path).health())
    Defaults(ca_url.rstrip("/"), sha.lower().replace(":", ""), root_path).write(home)
    click.echo(f"The root certificate has been saved in {root_path}.")
    click.echo(f"The authority configuration has been saved in {home}/config/defaults.json.")


@cli.command()
@click.argument("file", required=False, type=click.Path(path_type=Path))
@ca_url_option
@click.option("--fingerprint", "sha", help="Root fingerprint (default: from defaults.json).")
@root_option
@click.option("--force", is_flag=True)
def root(file: Path | None, ca_url: str | None, sha: str | None, root: Path | None,
         force: bool) -> None:
    """Download the root certificate, checked against its fingerprint."""
    client, defaults = client_from(ca_url, root)
    fp = sha or (defaults.fingerprint if defaults else None)
    if not fp:
        raise BadRequest("no root fingerprint: pass --fingerprint")
    data = run(client.root(fp)).public_bytes(serialization.Encoding.PEM)
    if file:
        write_public(file, data, force)
        click.echo(f"The root certificate has been saved in {file}.")
    else:
        click.echo(data.decode(), nl=False)


@cli.command()
@ca_url_option
@root_option
def health(ca_url: str | None, root: Path | None) -> None:
    """Check that the CA is up."""
    client, _ = client_from(ca_url, root)
    try:
        click.echo(run(client.health()))
    except ClientError as e:
        if e.status == 503 and "sealed" in e.message:
            raise ApplianceError("the CA is sealed: custodians must run 'applianctl unlock'"
                                 ) from None
        raise


async def _mint(client: CaClient, defaults: Defaults | None, subject: str, sans: list[str],
                provisioner: str | None, password_file: Path | None, lifetime: int) -> str:
    password = read_secret(password_file, "Provisioner password: ", "password")
    signer = await client.token_signer(provisioner, password.encode())
    return signer.mint(subject, f"{client.ca_url}/1.0/sign", sans=sans or [subject],
                       root_fingerprint=defaults.fingerprint if defaults else None,
                       lifetime=lifetime)


def _lifetime(not_after: str | None) -> int:
    from appliance.durations import parse_duration

    if not not_after:
        return 300
    try:
        seconds = int(parse_duration(not_after).total_seconds())
    except ValueError as e:
        raise BadRequest(str(e)) from None
    if not 0 < seconds <= 3600:
        raise BadRequest("a token may live at most 1h")
    return seconds


@cli.command()
@click.argument("subject")
@click.option("--provisioner", help="JWK provisioner name (default: the first one).")
@click.option("--password-file", type=click.Path(path_type=Path),
              help="Password that decrypts the provisioner key.")
@click.option("--san", "sans", multiple=True, help="Subject alternative name (repeatable).")
@click.option("--not-after", help="Token lifetime, e.g. 5m (at most 1h).")
@ca_url_option
@root_option
def token(subject: str, provisioner: str | None, password_file: Path | None,
          sans: tuple[str, ...], not_after: str | None, ca_url: str | None,
          root: Path | None) -> None:
    """Mint a one-time token for SUBJECT."""
    client, defaults = client_from(ca_url, root)
    click.echo(run(_mint(client, defaults, subject, list(sans), provisioner, password_file,
                         _lifetime(not_after))))


def _chain_pem(chain: list[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)


@cli.command()
@click.argument("subject")
@click.argument("crt_file", type=click.Path(path_type=Path))
@click.argument("key_file", type=click.Path(path_type=Path))
@click.option("--token", "ott", help="A one-time token (else one is minted).")
@click.option("--provisioner", help="JWK provisioner name.")
@click.option("--password-file", type=click.Path(path_type=Path),
              help="Password that decrypts the provisioner key.")
@click.option("--san", "sans", multiple=True, help="Subject alternative name (repeatable).")
@click.option("--not-before", help="RFC 3339 time or duration, e.g. 5m.")
@click.option("--not-after", help="RFC 3339 time or duration, e.g. 8h.")
@click.option("--kty", type=click.Choice(["EC", "RSA", "OKP"]), default="EC", show_default=True)
@click.option("--curve", default="P-256", show_default=True)
@click.option("--size", type=int, default=2048, show_default=True)
@click.option("--force", is_flag=True, help="Overwrite CRT_FILE and KEY_FILE.")
@ca_url_option
@root_option
def certificate(subject: str, crt_file: Path, key_file: Path, ott: str | None,
                provisioner: str | None, password_file: Path | None, sans: tuple[str, ...],
                not_before: str | None, not_after: str | None, kty: str, curve: str, size: int,
                force: bool, ca_url: str | None, root: Path | None) -> None:
    """Generate a key locally and get a certificate for SUBJECT (CRT holds leaf + intermediate)."""
    client, defaults = client_from(ca_url, root)
    check_writable(crt_file, key_file, force=force)
    names = list(sans) or [subject]
    if ott:
        claims = token_claims_unverified(ott)
        subject, names = claims["sub"], list(claims.get("sans") or [claims["sub"]])
    key = generate_key(kty, curve, size)
    csr = make_csr(key, subject, names)

    async def go() -> list[x509.Certificate]:
        token_ = ott or await _mint(client, defaults, subject, names, provisioner,
                                    password_file, 300)
        return await client.sign(csr, token_, not_before, not_after)

    chain = run(go())
    write_files([
        (key_file, key.private_bytes(serialization.Encoding.PEM,
                                     serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()), 0o600),
        (crt_file, _chain_pem(chain), 0o644),
    ])
    click.echo(f"Your certificate has been saved in {crt_file}.")
    click.echo(f"Your private key has been saved in {key_file}.")


@cli.command()
@click.argument("csr_file", type=click.Path(path_type=Path))
@click.argument("crt_file", type=click.Path(path_type=Path))
@click.option("--token", "ott", help="A one-time token (else one is minted).")
@click.option("--provisioner", help="JWK provisioner name.")
@click.option("--password-file", type=click.Path(path_type=Path))
@click.option("--not-before")
@click.option("--not-after")
@click.option("--force", is_flag=True)
@ca_url_option
@root_option
def sign(csr_file: Path, crt_file: Path, ott: str | None, provisioner: str | None,
         password_file: Path | None, not_before: str | None, not_after: str | None,
         force: bool, ca_url: str | None, root: Path | None) -> None:
    """Get a certificate for an existing CSR."""
    from cryptography.x509.oid import NameOID

    from appliance.authority.csr import parse_csr_pem
    from appliance.issuance.names import san_to_text, sans_of

    client, defaults = client_from(ca_url, root)
    check_writable(crt_file, force=force)
    try:
        csr = parse_csr_pem(csr_file.read_text())
    except UnicodeDecodeError:
        raise BadRequest(f"{csr_file} is not a PEM certificate request") from None
    cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not cns:
        raise BadRequest(f"{csr_file} has no common name")
    subject = str(cns[0].value)
    names = [san_to_text(n) for n in sans_of(csr)] or [subject]

    async def go() -> list[x509.Certificate]:
        token_ = ott or await _mint(client, defaults, subject, names, provisioner,
                                    password_file, 300)
        return await client.sign(csr, token_, not_before, not_after)

    write_public(crt_file, _chain_pem(run(go())), force)
    click.echo(f"Your certificate has been saved in {crt_file}.")


def main() -> None:
    try:
        cli(prog_name="applianctl")
    except ClientError as e:  # pragma: no cover - raised inside invoke normally
        click.echo(f"error: {e.message}", err=True)
        sys.exit(1)


# Commands defined in their own modules register themselves on `cli`.
from appliance.cli import (  # noqa: E402,F401
    acme_admin,
    audit_cmd,
    kms,
    lifecycle,
    provisioners,
    unlock,
)
