"""applianctl renew, rekey, revoke, crl: the life of an issued certificate."""

from __future__ import annotations

import contextlib
import os
import random
import shlex
import signal
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from appliance.cli.app import (
    ca_url_option,
    chain_pem,
    client_from,
    key_type_options,
    mint_token,
    root_option,
    run,
    write_files,
    write_key_and_chain,
)
from appliance.errors import ApplianceError, BadRequest
from appliance.home import Defaults

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

    from appliance.client import CaClient

RETRY_SECONDS = 60.0


def load_pair(crt_file: Path, key_file: Path) -> tuple[x509.Certificate, PrivateKeyTypes]:
    """The certificate and its unencrypted key, refused unless the key is the certificate's."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        cert = x509.load_pem_x509_certificates(crt_file.read_bytes())[0]
    except (ValueError, IndexError):
        raise BadRequest(f"{crt_file} does not hold a PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    except (ValueError, TypeError):
        raise BadRequest(f"{key_file} does not hold an unencrypted PEM private key") from None
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if cert.public_key().public_bytes(der, spki) != key.public_key().public_bytes(der, spki):
        raise BadRequest(f"{key_file} is not the key of {crt_file}")
    return cert, key


def replace_file(path: Path, data: bytes, mode: int) -> None:
    """Atomically replace `path` (readers see the old or the new file), keeping `mode`."""
    write_files([(path, data, mode)])


def confirm_overwrite(path: Path, force: bool) -> None:
    if force:
        return
    if sys.stdin.isatty() and click.confirm(f"Would you like to overwrite {path}?"):
        return
    raise BadRequest(f"{path} would be overwritten; use --force")


def can_be_tls_client(cert: x509.Certificate) -> bool:
    """TLS refuses a client certificate whose extendedKeyUsage lacks clientAuth."""
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return True
    return ExtendedKeyUsageOID.CLIENT_AUTH in eku


def renew_once(client_args: tuple[str, Path], crt_file: Path, key_file: Path
               ) -> list[x509.Certificate]:
    """mTLS while the certificate is valid and may be a TLS client certificate; otherwise an
    x5c token signed by its key (expired certificates, serverAuth-only certificates)."""
    from appliance.authority.lifecycle import mint_renew_token
    from appliance.client import CaClient

    cert, key = load_pair(crt_file, key_file)
    ca_url, root = client_args
    if datetime.now(UTC) < cert.not_valid_after_utc and can_be_tls_client(cert):
        return CaClient(ca_url, root, (crt_file, key_file)).renew()
    client = CaClient(ca_url, root)
    return client.renew(token=mint_renew_token(cert, key, f"{client.ca_url}/1.0/renew"))


def after_renewal(exec_cmd: str | None, pid: int | None, pid_file: Path | None,
                  sig: str) -> None:
    if exec_cmd:
        result = subprocess.run(shlex.split(exec_cmd), check=False)
        if result.returncode != 0:
            click.echo(f"warning: --exec command exited with {result.returncode}", err=True)
    target = pid
    if pid_file is not None:
        try:
            target = int(pid_file.read_text().strip())
        except (OSError, ValueError):
            click.echo(f"warning: cannot read a pid from {pid_file}", err=True)
            target = None
    if target:
        signum = getattr(signal, sig if sig.startswith("SIG") else f"SIG{sig}", None)
        if not isinstance(signum, signal.Signals):
            raise BadRequest(f"unknown signal {sig}")
        try:
            os.kill(target, signum)
        except ProcessLookupError:
            click.echo(f"warning: no process {target} to signal", err=True)


def next_renewal(cert: x509.Certificate, renew_period: timedelta | None,
                 received_at: datetime) -> float:
    """Seconds until the next renewal: 2/3 of the lifetime, less up to 1/20 of it at random.

    The lifetime is counted from when the certificate was received, not from its notBefore,
    which the CA backdates by a minute: for short-lived certificates that minute matters.
    """
    now = datetime.now(UTC)
    if renew_period is not None:
        return max(renew_period.total_seconds(), 1.0)
    start = max(cert.not_valid_before_utc, min(received_at, cert.not_valid_after_utc))
    lifetime = cert.not_valid_after_utc - start
    jitter = lifetime.total_seconds() / 20 * random.random()  # noqa: S311 - spreading load
    due = start + lifetime * 2 / 3
    return max((due - now).total_seconds() - jitter, 1.0)


async def renew_daemon(client_args: tuple[str, Path], crt_file: Path, key_file: Path,
                       renew_period: timedelta | None, hooks: tuple[Any, ...]) -> None:
    import asyncio

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    now_please = asyncio.Event()
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGHUP, now_please.set)
    received = datetime.fromtimestamp(crt_file.stat().st_mtime, UTC)
    delay = next_renewal(load_pair(crt_file, key_file)[0], renew_period, received)
    click.echo(f"renewal daemon: next renewal in {int(delay)} s", err=True)
    while not stop.is_set():
        waiters = [asyncio.create_task(stop.wait()), asyncio.create_task(now_please.wait())]
        await asyncio.wait(waiters, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
        for w in waiters:
            w.cancel()
        if stop.is_set():
            break
        now_please.clear()
        try:
            # In a thread: the loop keeps taking SIGTERM and SIGHUP while the CA answers.
            chain = await asyncio.to_thread(renew_once, client_args, crt_file, key_file)
        except ApplianceError as e:
            click.echo(f"error: renewal failed: {e.message}; retrying in "
                       f"{int(RETRY_SECONDS)} s", err=True)
            delay = RETRY_SECONDS
            continue
        replace_file(crt_file, chain_pem(chain), 0o644)
        click.echo(f"Your certificate has been saved in {crt_file}.", err=True)
        after_renewal(*hooks)
        delay = next_renewal(chain[0], renew_period, datetime.now(UTC))
        click.echo(f"renewal daemon: next renewal in {int(delay)} s", err=True)


@click.command()
@click.argument("crt_file", type=click.Path(path_type=Path, exists=True))
@click.argument("key_file", type=click.Path(path_type=Path, exists=True))
@click.option("--force", is_flag=True, help="Overwrite CRT_FILE without asking.")
@click.option("--expires-in", help="Renew only if the certificate expires within this, e.g. 8h.")
@click.option("--daemon", is_flag=True, help="Keep renewing at 2/3 of each lifetime.")
@click.option("--renew-period", help="With --daemon: renew at this fixed interval instead.")
@click.option("--exec", "exec_cmd", help="Command to run after each renewal (no shell).")
@click.option("--pid", type=int, help="Process to signal after each renewal.")
@click.option("--pid-file", type=click.Path(path_type=Path), help="File holding that pid.")
@click.option("--signal", "sig", default="HUP", show_default=True, help="Signal to send.")
@ca_url_option
@root_option
def renew(crt_file: Path, key_file: Path, force: bool, expires_in: str | None, daemon: bool,
          renew_period: str | None, exec_cmd: str | None, pid: int | None,
          pid_file: Path | None, sig: str, ca_url: str | None, root: Path | None) -> None:
    """Renew a certificate: same names, same key, a fresh validity period."""
    from appliance.durations import parse_duration

    client, _ = client_from(ca_url, root)
    args = (client.ca_url, root or client_root(client))
    hooks = (exec_cmd, pid, pid_file, sig)
    try:
        period = parse_duration(renew_period) if renew_period else None
        threshold = parse_duration(expires_in) if expires_in else None
    except ValueError as e:
        raise BadRequest(str(e)) from None
    if daemon:
        load_pair(crt_file, key_file)
        run(renew_daemon(args, crt_file, key_file, period, hooks))
        return
    cert, _ = load_pair(crt_file, key_file)
    if threshold is not None and cert.not_valid_after_utc - datetime.now(UTC) > threshold:
        click.echo(f"certificate not renewed: it expires at "
                   f"{cert.not_valid_after_utc.isoformat()}, later than --expires-in {expires_in}")
        return
    confirm_overwrite(crt_file, force)
    chain = renew_once(args, crt_file, key_file)
    replace_file(crt_file, chain_pem(chain), 0o644)
    click.echo(f"Your certificate has been saved in {crt_file}.")
    after_renewal(*hooks)


def client_root(client: CaClient) -> Path:
    defaults = Defaults.load()
    if defaults is None:
        raise BadRequest("no root certificate: pass --root or run bootstrap")
    return defaults.root


@click.command()
@click.argument("crt_file", type=click.Path(path_type=Path, exists=True))
@click.argument("key_file", type=click.Path(path_type=Path, exists=True))
@key_type_options
@click.option("--force", is_flag=True, help="Overwrite CRT_FILE and KEY_FILE without asking.")
@ca_url_option
@root_option
def rekey(crt_file: Path, key_file: Path, kty: str, curve: str, size: int, force: bool,
          ca_url: str | None, root: Path | None) -> None:
    """A new key pair and certificate for the same identity (over mTLS)."""
    from cryptography import x509

    from appliance.authority.lifecycle import mint_renew_token
    from appliance.authority.provisioners.jwk_keys import generate_key
    from appliance.client import CaClient, make_csr
    from appliance.issuance.names import san_to_text

    client, _ = client_from(ca_url, root)
    cert, old_key = load_pair(crt_file, key_file)
    confirm_overwrite(crt_file, force)
    new_key = generate_key(kty, curve, size)
    cn = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    try:
        sans = [san_to_text(n) for n in cert.extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value]
    except x509.ExtensionNotFound:
        sans = []
    csr = make_csr(new_key, str(cn[0].value) if cn else "", sans)
    if can_be_tls_client(cert):
        mtls = CaClient(client.ca_url, root or client_root(client), (crt_file, key_file))
        chain = mtls.rekey(csr)
    else:
        plain = CaClient(client.ca_url, root or client_root(client))
        chain = plain.rekey(csr, token=mint_renew_token(
            cert, old_key, f"{plain.ca_url}/1.0/rekey"))
    write_key_and_chain(key_file, new_key, crt_file, chain)


def reason_code_of(reason_code: str | None) -> int:
    if reason_code is None:
        return 0
    if reason_code.isdigit():
        return int(reason_code)
    from appliance.issuance.crl import REASON_NAMES  # the CRL service: only for a name

    code = REASON_NAMES.get(reason_code.lower().replace("_", "").replace("-", ""))
    if code is None:
        raise BadRequest(f"unknown reason code {reason_code!r}; use a number or one of "
                         f"{sorted(REASON_NAMES)}")
    return code


@click.command()
@click.argument("serial", required=False)
@click.option("--cert", "crt_file", type=click.Path(path_type=Path, exists=True),
              help="Revoke this certificate over mTLS (with --key).")
@click.option("--key", "key_file", type=click.Path(path_type=Path, exists=True))
@click.option("--reason", default="", help="Free-text reason.")
@click.option("--reasonCode", "--reason-code", "reason_code",
              help="RFC 5280 reason: a number or a name such as keyCompromise.")
@click.option("--token", "ott", help="A revoke token (else one is minted).")
@click.option("--provisioner", help="JWK provisioner name.")
@click.option("--password-file", type=click.Path(path_type=Path))
@ca_url_option
@root_option
def revoke(serial: str | None, crt_file: Path | None, key_file: Path | None, reason: str,
           reason_code: str | None, ott: str | None, provisioner: str | None,
           password_file: Path | None, ca_url: str | None, root: Path | None) -> None:
    """Revoke a certificate by SERIAL (decimal or 0x hex) or with --cert/--key."""
    from appliance.authority.lifecycle import parse_serial
    from appliance.client import CaClient

    client, defaults = client_from(ca_url, root)
    code = reason_code_of(reason_code)
    if crt_file is not None:
        if key_file is None:
            raise BadRequest("--cert needs --key")
        cert, _ = load_pair(crt_file, key_file)
        number = cert.serial_number
        mtls = CaClient(client.ca_url, root or client_root(client), (crt_file, key_file))
        mtls.revoke(number, None, code, reason)
    else:
        if not serial:
            raise BadRequest("give a SERIAL, or --cert and --key")
        number = parse_serial(serial)
        token_ = ott or mint_token(client, defaults, str(number), [], provisioner,
                                   password_file, endpoint="/1.0/revoke")
        client.revoke(number, token_, code, reason)
    click.echo(f"Certificate with Serial Number {number} has been revoked.")


@click.command()
@click.argument("file", required=False, type=click.Path(path_type=Path))
@click.option("--der", is_flag=True, help="Write DER instead of PEM.")
@ca_url_option
@root_option
def crl(file: Path | None, der: bool, ca_url: str | None, root: Path | None) -> None:
    """Download the CA's current CRL (PEM to stdout, or to FILE)."""
    from cryptography.hazmat.primitives import serialization

    client, _ = client_from(ca_url, root)
    lst = client.crl()
    data = lst.public_bytes(serialization.Encoding.DER if der else serialization.Encoding.PEM)
    if file:
        replace_file(file, data, 0o644)
        click.echo(f"The CRL has been saved in {file}.")
    else:
        with contextlib.suppress(BrokenPipeError):
            sys.stdout.buffer.write(data)
