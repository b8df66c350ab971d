"""applianctl bootstrap, root, health, token, certificate, sign: a client of a CA, as `step ca` is.

These only talk to a CA over HTTPS and read or write local files; what they need beyond click is
imported inside each command, so that they start fast.
"""

from __future__ import annotations

from pathlib import Path

import click

from appliance.cli.app import (
    ca_url_option,
    chain_pem,
    check_writable,
    client_from,
    key_type_options,
    mint_token,
    root_option,
    write_key_and_chain,
    write_public,
)
from appliance.errors import ApplianceError, BadRequest
from appliance.home import Defaults, default_home


@click.command()
@click.option("--ca-url", required=True, help="URL of the CA.")
@click.option("--fingerprint", "sha", required=True, help="SHA-256 fingerprint of the root.")
@click.option("--force", is_flag=True, help="Overwrite existing defaults.")
def bootstrap(ca_url: str, sha: str, force: bool) -> None:
    """Fetch and pin the root by its fingerprint; write defaults.json."""
    from cryptography.hazmat.primitives import serialization

    from appliance.client import CaClient

    home = default_home()
    root_path = home / "certs" / "root_ca.crt"
    existing = Defaults.load(home)
    if existing and not force and (existing.ca_url, existing.fingerprint) != (
            ca_url.rstrip("/"), sha.lower().replace(":", "")):
        raise BadRequest(f"{home}/config/defaults.json already exists; use --force to replace it")
    cert = CaClient(ca_url, None).root(sha)
    root_pem = cert.public_bytes(serialization.Encoding.PEM)
    root_path.parent.mkdir(parents=True, exist_ok=True)
    if not (root_path.exists() and root_path.read_bytes() == root_pem):
        write_public(root_path, root_pem, True)
    # Now that the root is pinned, the CA must present a certificate that chains to it.
    CaClient(ca_url, root_path).health()
    Defaults(ca_url.rstrip("/"), sha.lower().replace(":", ""), root_path).write(home)
    click.echo(f"The root certificate has been saved in {root_path}.")
    click.echo(f"The authority configuration has been saved in {home}/config/defaults.json.")


@click.command()
@click.argument("file", required=False, type=click.Path(path_type=Path))
@ca_url_option
@click.option("--fingerprint", "sha", help="Root fingerprint (default: from defaults.json).")
@root_option
@click.option("--force", is_flag=True)
def root(file: Path | None, ca_url: str | None, sha: str | None, root: Path | None,
         force: bool) -> None:
    """Download the root certificate, checked against its fingerprint."""
    from cryptography.hazmat.primitives import serialization

    client, defaults = client_from(ca_url, root)
    fp = sha or (defaults.fingerprint if defaults else None)
    if not fp:
        raise BadRequest("no root fingerprint: pass --fingerprint")
    data = client.root(fp).public_bytes(serialization.Encoding.PEM)
    if file:
        write_public(file, data, force)
        click.echo(f"The root certificate has been saved in {file}.")
    else:
        click.echo(data.decode(), nl=False)


@click.command()
@ca_url_option
@root_option
def health(ca_url: str | None, root: Path | None) -> None:
    """Check that the CA is up."""
    from appliance.client import ClientError

    client, _ = client_from(ca_url, root)
    try:
        click.echo(client.health())
    except ClientError as e:
        if e.status == 503 and "sealed" in e.message:
            raise ApplianceError("the CA is sealed: custodians must run 'applianctl unlock'"
                                 ) from None
        raise


def token_lifetime(not_after: str | None) -> int:
    """Seconds a minted token lives: --not-after, at most an hour; five minutes by default."""
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


@click.command()
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
    click.echo(mint_token(client, defaults, subject, list(sans) or [subject], provisioner,
                          password_file, lifetime=token_lifetime(not_after)))


@click.command()
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
@key_type_options
@click.option("--force", is_flag=True, help="Overwrite CRT_FILE and KEY_FILE.")
@ca_url_option
@root_option
def certificate(subject: str, crt_file: Path, key_file: Path, ott: str | None,
                provisioner: str | None, password_file: Path | None, sans: tuple[str, ...],
                not_before: str | None, not_after: str | None, kty: str, curve: str, size: int,
                force: bool, ca_url: str | None, root: Path | None) -> None:
    """Generate a key locally and get a certificate for SUBJECT (CRT holds leaf + intermediate)."""
    from appliance.authority.provisioners.jwk_keys import generate_key
    from appliance.client import make_csr, token_claims_unverified

    client, defaults = client_from(ca_url, root)
    check_writable(crt_file, key_file, force=force)
    names = list(sans) or [subject]
    if ott:
        claims = token_claims_unverified(ott)
        subject, names = claims["sub"], list(claims.get("sans") or [claims["sub"]])
    key = generate_key(kty, curve, size)
    csr = make_csr(key, subject, names)
    token_ = ott or mint_token(client, defaults, subject, names, provisioner, password_file)
    chain = client.sign(csr, token_, not_before, not_after)
    write_key_and_chain(key_file, key, crt_file, chain)


@click.command()
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
    token_ = ott or mint_token(client, defaults, subject, names, provisioner, password_file)
    write_public(crt_file, chain_pem(client.sign(csr, token_, not_before, not_after)), force)
    click.echo(f"Your certificate has been saved in {crt_file}.")
