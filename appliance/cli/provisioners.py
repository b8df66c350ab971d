"""applianctl provisioner add|update|remove|list: edit ca.json atomically, validated first.

The running server picks changes up on SIGHUP (`systemctl reload appliance`) without dropping
connections; an invalid file is never written, so a reload cannot load one.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from appliance.cli.app import (
    ca_config_path,
    ca_url_option,
    client_from,
    read_secret,
    record_cli_event,
    root_option,
    with_options,
)
from appliance.errors import BadRequest, ConfigError


def _save(path: Path, data: dict[str, Any], action: str, name: str,
          policy_changed: bool = False) -> None:
    from appliance.authority.authority import load_template
    from appliance.authority.claims import Claims
    from appliance.config import home_of, parse_config, write_config

    config = parse_config(data, str(path))
    global_claims = Claims().merged(config.authority.claims)
    for p in config.authority.provisioners:
        try:
            global_claims.merged(p.claims)
        except ConfigError as e:
            raise ConfigError(f"provisioner {p.name!r}: {e.message}") from None
        load_template(p, home_of(path))  # compiles and sample-renders; ConfigError names it
    # Recorded first: a change the audit log cannot hold is not made.
    record_cli_event(path, "provisioner.change", {"action": action, "name": name})
    if policy_changed:
        record_cli_event(path, "policy.change", {"provisioner": name})
    write_config(path, config)
    click.echo(f"Success! {path} has been updated. Reload the CA to use it: "
               "`systemctl reload appliance` or `kill -HUP <pid>`.")


def _config_json(path: Path) -> dict[str, Any]:
    from appliance.config import load_config

    return load_config(path).to_json()


def _claims(existing: dict[str, Any] | None, min_dur: str | None, max_dur: str | None,
            default_dur: str | None, disable_renewal: bool | None,
            allow_after_expiry: bool | None) -> dict[str, Any] | None:
    from pydantic import ValidationError

    from appliance.config import ClaimsConfig

    claims = dict(existing or {})
    for key, value in (("minTLSCertDuration", min_dur), ("maxTLSCertDuration", max_dur),
                       ("defaultTLSCertDuration", default_dur),
                       ("disableRenewal", disable_renewal),
                       ("allowRenewalAfterExpiry", allow_after_expiry)):
        if value is not None:
            claims[key] = value
    try:
        ClaimsConfig.model_validate(claims)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(x) for x in err['loc'])}: "
                             f"{str(err['msg']).removeprefix('Value error, ')}"
                             for err in e.errors()[:3])
        raise BadRequest(f"invalid claims: {problems}") from None
    return claims or None


def _load_public(path: Path) -> dict[str, Any]:
    from appliance.authority.provisioners.jwk_keys import jwk_alg, thumbprint

    text = path.read_text()
    if text.lstrip().startswith("{"):
        jwk_data = json.loads(text)
        if "d" in jwk_data:
            raise BadRequest(f"{path} holds a private JWK; pass it with --private-key")
        jwk_data = {k: v for k, v in jwk_data.items() if k in ("kty", "crv", "x", "y", "n", "e")}
        jwk_data["kid"] = thumbprint(jwk_data)
        jwk_data["use"] = "sig"
        jwk_data["alg"] = jwk_alg(jwk_data)
        return jwk_data
    raise BadRequest(f"{path} must hold a public JWK (JSON); a PEM key goes with --private-key")


def _key_material(create: bool, public_key: Path | None, private_key: Path | None,
                  password_file: Path | None) -> dict[str, Any]:
    from cryptography.hazmat.primitives import serialization

    from appliance.authority.provisioners.jwk_keys import (
        encrypt_private_key,
        generate_key,
        public_jwk,
    )

    if sum(x is not None and x is not False for x in (create, public_key, private_key)) != 1:
        raise BadRequest("give exactly one of --create, --public-key or --private-key")
    if public_key is not None:
        return {"key": _load_public(public_key)}
    if private_key is not None:
        try:
            key = serialization.load_pem_private_key(private_key.read_bytes(), password=None)
        except (ValueError, TypeError):
            raise BadRequest(f"{private_key} is not an unencrypted PEM private key") from None
    else:
        key = generate_key("EC", "P-256")
    password = read_secret(password_file, "Provisioner password: ", "password")
    return {"key": public_jwk(key), "encryptedKey": encrypt_private_key(key, password.encode())}


POLICY_KINDS = ("cn", "dns", "ip", "email", "uri")
POLICY_NAMES = tuple(f"{side}_{kind}" for side in ("allow", "deny") for kind in POLICY_KINDS)


def _apply_policy(entry: dict[str, Any], allow_wildcards: bool | None,
                  values: dict[str, tuple[str, ...]]) -> None:
    if allow_wildcards is None and not any(values.values()):
        return
    x509_policy = entry.setdefault("policy", {}).setdefault("x509", {})
    for side in ("allow", "deny"):
        for kind in POLICY_KINDS:
            extra = list(values.get(f"{side}_{kind}", ()))
            if extra:
                rules = x509_policy.setdefault(side, {}).setdefault(kind, [])
                rules.extend(x for x in extra if x not in rules)
    if allow_wildcards is not None:
        x509_policy["allowWildcardNames"] = allow_wildcards


def _apply_template(entry: dict[str, Any], template: Path | None, data: Path | None) -> None:
    if template is None and data is None:
        return
    x509_options = entry.setdefault("options", {}).setdefault("x509", {})
    if template is not None:
        x509_options.pop("templateFile", None)
        x509_options["template"] = template.read_text(encoding="utf-8")
    if data is not None:
        try:
            loaded = json.loads(data.read_text(encoding="utf-8"))
        except ValueError:
            raise BadRequest(f"{data} is not valid JSON") from None
        if not isinstance(loaded, dict):
            raise BadRequest(f"{data} must hold a JSON object")
        x509_options["templateData"] = loaded


@dataclass(frozen=True)
class EntryEdits:
    """What add and update change besides the key: claims, the template and the name policy."""

    min_dur: str | None
    max_dur: str | None
    default_dur: str | None
    disable_renewal: bool | None
    allow_after_expiry: bool | None
    template: Path | None
    template_data: Path | None
    allow_wildcards: bool | None
    policy: dict[str, tuple[str, ...]]  # "allow_dns": patterns, ...

    @property
    def policy_changed(self) -> bool:
        return self.allow_wildcards is not None or any(self.policy.values())

    def apply(self, entry: dict[str, Any]) -> None:
        claims = _claims(entry.get("claims"), self.min_dur, self.max_dur, self.default_dur,
                         self.disable_renewal, self.allow_after_expiry)
        if claims:
            entry["claims"] = claims
        _apply_template(entry, self.template, self.template_data)
        _apply_policy(entry, self.allow_wildcards, self.policy)


edit_options = [
    click.option("--x509-min-dur", help="Minimum certificate duration, e.g. 5m."),
    click.option("--x509-max-dur", help="Maximum certificate duration, e.g. 24h."),
    click.option("--x509-default-dur", help="Default certificate duration."),
    click.option("--disable-renewal/--allow-renewal", "disable_renewal", default=None,
                 help="Refuse (or allow) renewals of this provisioner's certificates."),
    click.option("--allow-renewal-after-expiry/--disallow-renewal-after-expiry",
                 "allow_after_expiry", default=None,
                 help="Allow renewing an expired certificate with an x5c token."),
    click.option("--x509-template", type=click.Path(path_type=Path, exists=True),
                 help="Certificate template file (Jinja2, sandboxed); stored inline."),
    click.option("--x509-template-data", type=click.Path(path_type=Path, exists=True),
                 help="JSON object the template reads as Data."),
    click.option("--ca-config", type=click.Path(path_type=Path),
                 help="ca.json to edit (default: $APPLIANCE_HOME/config/ca.json)."),
    click.option("--x509-allow-wildcard-names/--x509-deny-wildcard-names",
                 "allow_wildcards", default=None,
                 help="Name policy: allow wildcard DNS names."),
    *(click.option(f"--x509-{name.replace('_', '-')}", name, multiple=True,
                   help=f"Name policy: {name.split('_')[0]} this {name.split('_')[1]} pattern "
                   "(repeatable).")
      for name in POLICY_NAMES),
]


def with_entry_edits(command: Callable[..., None]) -> Callable[..., None]:
    """The claims, template and policy options, handed to `command` as one EntryEdits."""
    @functools.wraps(command)
    def gather(**options: Any) -> None:
        edits = EntryEdits(
            options.pop("x509_min_dur"), options.pop("x509_max_dur"),
            options.pop("x509_default_dur"), options.pop("disable_renewal"),
            options.pop("allow_after_expiry"), options.pop("x509_template"),
            options.pop("x509_template_data"), options.pop("allow_wildcards"),
            {name: options.pop(name) for name in POLICY_NAMES})
        command(edits=edits, **options)
    return with_options(*edit_options)(gather)


@click.group()
def provisioner() -> None:
    """Manage provisioners (edits ca.json; reload the CA to apply)."""


@provisioner.command("add")
@click.argument("name")
@click.option("--type", "kind", type=click.Choice(["JWK", "ACME"], case_sensitive=False),
              default="JWK", show_default=True)
@click.option("--challenge", "challenges", multiple=True,
              type=click.Choice(["http-01", "dns-01", "tls-alpn-01"]),
              help="ACME: challenge types to offer (repeatable; default all three).")
@click.option("--require-eab", is_flag=True, help="ACME: require external account binding.")
@click.option("--force-cn", is_flag=True, help="ACME: set the CN from the first name if absent.")
@click.option("--create", is_flag=True, help="Generate a new key (encrypted with the password).")
@click.option("--public-key", type=click.Path(path_type=Path, exists=True),
              help="Public JWK file; tokens are then minted elsewhere.")
@click.option("--private-key", type=click.Path(path_type=Path, exists=True),
              help="PEM private key to store encrypted.")
@click.option("--password-file", type=click.Path(path_type=Path),
              help="Password that encrypts the provisioner key.")
@with_entry_edits
def provisioner_add(name: str, kind: str, challenges: tuple[str, ...], require_eab: bool,
                    force_cn: bool, create: bool, public_key: Path | None,
                    private_key: Path | None, password_file: Path | None,
                    ca_config: Path | None, edits: EntryEdits) -> None:
    """Add a provisioner."""
    path = ca_config_path(ca_config)
    data = _config_json(path)
    if any(p["name"] == name for p in data["authority"].get("provisioners", [])):
        raise BadRequest(f"a provisioner named {name!r} already exists")
    entry: dict[str, Any] = {"type": kind.upper(), "name": name}
    if kind.upper() == "ACME":
        if create or public_key or private_key:
            raise BadRequest("an ACME provisioner has no key: drop --create/--public-key")
        if challenges:
            entry["challenges"] = list(challenges)
        if require_eab:
            entry["requireEAB"] = True
        if force_cn:
            entry["forceCN"] = True
    else:
        if challenges or require_eab or force_cn:
            raise BadRequest("--challenge, --require-eab and --force-cn are for --type ACME")
        entry.update(_key_material(create, public_key, private_key, password_file))
    edits.apply(entry)
    data["authority"].setdefault("provisioners", []).append(entry)
    _save(path, data, "add", name, edits.policy_changed)


@provisioner.command("update")
@click.argument("name")
@click.option("--password-file", type=click.Path(path_type=Path))
@click.option("--create", is_flag=True, help="Replace the key with a new one.")
@click.option("--public-key", type=click.Path(path_type=Path, exists=True))
@click.option("--private-key", type=click.Path(path_type=Path, exists=True))
@with_entry_edits
def provisioner_update(name: str, password_file: Path | None, create: bool,
                       public_key: Path | None, private_key: Path | None,
                       ca_config: Path | None, edits: EntryEdits) -> None:
    """Change a provisioner's claims, key or template."""
    path = ca_config_path(ca_config)
    data = _config_json(path)
    entry = next((p for p in data["authority"].get("provisioners", []) if p["name"] == name),
                 None)
    if entry is None:
        raise BadRequest(f"no provisioner named {name!r}")
    if create or public_key or private_key:
        entry.pop("encryptedKey", None)
        entry.update(_key_material(create, public_key, private_key, password_file))
    edits.apply(entry)
    _save(path, data, "update", name, edits.policy_changed)


@provisioner.command("remove")
@click.argument("name")
@click.option("--ca-config", type=click.Path(path_type=Path))
def provisioner_remove(name: str, ca_config: Path | None) -> None:
    """Remove a provisioner; its tokens are refused after the next reload."""
    path = ca_config_path(ca_config)
    data = _config_json(path)
    before = data["authority"].get("provisioners", [])
    after = [p for p in before if p["name"] != name]
    if len(after) == len(before):
        raise BadRequest(f"no provisioner named {name!r}")
    data["authority"]["provisioners"] = after
    _save(path, data, "remove", name)


@provisioner.command("list")
@click.option("--ca-config", type=click.Path(path_type=Path),
              help="Read this ca.json instead of asking the CA.")
@ca_url_option
@root_option
def provisioner_list(ca_config: Path | None, ca_url: str | None, root: Path | None) -> None:
    """Print the provisioners as JSON (from the CA, or from --ca-config)."""
    if ca_config is not None:
        items = _config_json(ca_config)["authority"].get("provisioners", [])
    else:
        client, _ = client_from(ca_url, root)
        items = client.provisioners()
    click.echo(json.dumps(items, indent=3))
