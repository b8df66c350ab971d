"""applianctl kms check: show, from the token itself, that the CA keys are in it and stay there."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from appliance.cli.app import ca_config_path, read_secret, record_cli_event
from appliance.errors import ConfigError

if TYPE_CHECKING:
    from appliance.config import CaConfig


@dataclass
class KeyReport:
    role: str  # "issuer" or "root"
    uri: str
    certificate: Path
    key_type: str = ""
    lines: list[tuple[str, str, str]] = field(default_factory=list)  # name, value, meaning
    problems: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {"role": self.role, "uri": self.uri, "certificate": str(self.certificate),
                "type": self.key_type, "ok": not self.problems,
                "checks": [{"name": n, "value": v, "meaning": m} for n, v, m in self.lines],
                "problems": self.problems}


@click.group()
def kms() -> None:
    """The CA keys in their PKCS#11 tokens."""


@kms.command("check")
@click.argument("config", required=False, type=click.Path(path_type=Path))
@click.option("--issuer-password-file", "--password-file", "issuer_password_file",
              type=click.Path(path_type=Path), help="Issuer token PIN.")
@click.option("--root-password-file", type=click.Path(path_type=Path),
              help="Root token PIN: check the root key too (alone without an issuer PIN).")
@click.option("--json", "as_json", is_flag=True, help="One JSON document instead of text.")
def check(config: Path | None, issuer_password_file: Path | None,
          root_password_file: Path | None, as_json: bool) -> None:
    """Ask the token about each CA key: attributes, the secret's refusal, a test signature.

    Exits 1 when any key is not as it must be (each problem is printed).
    """
    from appliance.config import home_of, load_config, resolve_path
    from appliance.server.composition import prepare_token_environment
    from appliance.server.hardening import check_secret_file

    config_path = ca_config_path(config)
    for pin_file, what in ((issuer_password_file, "issuer password"),
                           (root_password_file, "root password")):
        if pin_file is not None:
            check_secret_file(pin_file, what)
    cfg = load_config(config_path)
    home = home_of(config_path)
    prepare_token_environment(cfg, home)
    targets = []
    # With only the root PIN, only the root key (in quorum mode nobody holds the issuer PIN).
    if issuer_password_file is not None or root_password_file is None:
        targets.append(("issuer", cfg.key, resolve_path(home, cfg.crt), read_secret(
            issuer_password_file, "Issuer token PIN: ", "issuer password")))
    if root_password_file is not None:
        if not cfg.root_key:
            raise ConfigError(f"{config_path} has no rootKey: the root key's URI is unknown")
        targets.append(("root", cfg.root_key, resolve_path(home, cfg.root),
                        read_secret(root_password_file, "Root token PIN: ", "root password")))
    reports = [_check_key(cfg, role, uri, cert, pin) for role, uri, cert, pin in targets]
    problems = [f"{r.role} key: {p}" for r in reports for p in r.problems]
    record_cli_event(config_path, "kms.check", {
        "keys": [r.uri for r in reports], **({"problems": problems} if problems else {})},
        outcome="failure" if problems else "success")
    if as_json:
        click.echo(json.dumps({"ok": not problems, "keys": [r.as_json() for r in reports]},
                              indent=2))
    else:
        for report in reports:
            _print(report)
    if problems:
        if not as_json:
            for problem in problems:
                click.echo(f"error: {problem}", err=True)
        raise SystemExit(1)


def _check_key(cfg: CaConfig, role: str, uri: str, cert_path: Path, pin: str) -> KeyReport:
    import secrets

    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization

    from appliance.audit import sign_message, verify_message
    from appliance.server.composition import load_certificate, module_and_token
    from hsm.key_attributes import REQUIRED_KEY_ATTRIBUTES
    from hsm.pkcs11_store import Pkcs11KeyStore
    from hsm.uri import Pkcs11Uri

    report = KeyReport(role, uri, cert_path)
    certificate = load_certificate(cert_path, f"{role} certificate")
    module, _ = module_and_token(cfg)
    token = Pkcs11Uri.parse(uri).token
    if not token:
        raise ConfigError(f"the {role} key URI {uri} does not name its token")
    store = Pkcs11KeyStore.open(module, token, pin)
    del pin
    try:
        ref = store.find_uri(uri)
        key = store.private_key(ref)
        public = key.public_key()
        report.key_type = _describe(public)
        inspection = store.inspect(ref)
        spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        if public.public_bytes(*spki) == certificate.public_key().public_bytes(*spki):
            report.lines.append(("certificate", "matches", f"the public key of {cert_path}"))
        else:
            report.lines.append(("certificate", "DIFFERS", f"{cert_path}"))
            report.problems.append(f"its public key is not the one in {cert_path}")
        for required in REQUIRED_KEY_ATTRIBUTES:  # what a CA key's attributes must be
            name, wanted, meaning = required.name, required.value, required.meaning
            value = inspection.attributes.get(name)
            shown = "not reported" if value is None else str(value).lower()
            report.lines.append((name, shown, meaning if value is wanted else ""))
            if value is not wanted:
                report.problems.append(f"{name} is {shown}, must be {str(wanted).lower()}")
        if inspection.secret_refusal:
            report.lines.append((f"read {inspection.secret_attribute}", "refused",
                                 f"{inspection.secret_refusal}: asked for the key's value"))
        else:
            report.lines.append((f"read {inspection.secret_attribute}", "HANDED OUT", ""))
            report.problems.append(f"the token gave out {inspection.secret_attribute}")
        challenge = secrets.token_bytes(32)
        try:  # the audit checkpoints' scheme, for this key type
            verify_message(certificate.public_key(), sign_message(key, challenge), challenge)
        except InvalidSignature:
            report.lines.append(("test signature", "DOES NOT VERIFY", ""))
            report.problems.append("a signature made in the token does not verify with "
                                   f"{cert_path}")
        else:
            report.lines.append(("test signature", "verifies", "made in the token over a random "
                                 "challenge, checked with the certificate's public key"))
    finally:
        store.close()
    return report


def _describe(public: Any) -> str:
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    if isinstance(public, ec.EllipticCurvePublicKey):
        return f"EC {public.curve.name}"
    if isinstance(public, rsa.RSAPublicKey):
        return f"RSA {public.key_size}"
    return "Ed25519"


def _print(report: KeyReport) -> None:
    click.echo(f"{report.role} key {report.uri}")
    click.echo(f"  {'type':<22} {report.key_type}")
    for name, value, meaning in report.lines:
        click.echo(f"  {name:<22} {value:<8} {meaning}".rstrip())
    verdict = ("in the token, and it cannot leave it" if not report.problems
               else f"{len(report.problems)} problem(s)")
    click.echo(f"  => {verdict}")
