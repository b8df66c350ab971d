"""applianctl init and serve: create a CA in its tokens, and run it."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from appliance.cli.app import ca_config_path, read_secret, record_cli_event
from appliance.errors import BadRequest
from appliance.home import default_home


@click.command()
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
    from appliance.unlock.quorum import parse_quorum

    root_pin = read_secret(password_file, "Root token PIN: ", "password")
    quorum_mn = parse_quorum(quorum) if quorum else None
    if quorum_mn is not None:
        if share_dir is None:
            raise BadRequest("--quorum needs --share-dir")
        if issuer_password_file is not None:
            raise BadRequest("with --quorum the issuer PIN is random and never shown; drop "
                             "--issuer-password-file")
        issuer_pin = ""  # the ceremony makes it
    elif share_dir is not None:
        raise BadRequest("--share-dir goes with --quorum")
    else:
        issuer_pin = (read_secret(issuer_password_file, "Issuer token PIN: ", "issuer password")
                      if issuer_password_file else root_pin)
    prov_password = (read_secret(provisioner_password_file, "Provisioner password: ",
                                 "provisioner password")
                     if provisioner_password_file else root_pin)
    options = InitOptions(
        home=(home or default_home()).absolute(), name=name,
        dns_names=dns_names or ("localhost", "127.0.0.1"), address=address,
        provisioner=provisioner, root_pin=root_pin, issuer_pin=issuer_pin,
        provisioner_password=prov_password.encode(), key_spec=KeySpec.parse(kty, curve, size),
        module_path=module, root_token=root_token, issuer_token=issuer_token, force=force,
        acme=with_acme, quorum=quorum_mn)
    del issuer_pin
    if quorum_mn is None:
        result = initialise(options)
    else:
        assert share_dir is not None
        from appliance.ceremony.quorum import initialise_sealed

        result, paths = initialise_sealed(options, share_dir)
        click.echo(f"Issuer PIN sealed; {len(paths)} shares in {share_dir} (any "
                   f"{quorum_mn[0]} unseal the CA). Hand each to its custodian, then delete "
                   "them here.")
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


@click.command()
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

    config_path = ca_config_path(config)
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
