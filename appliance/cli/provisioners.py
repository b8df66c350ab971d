"""applianctl provisioner add|update|remove|list: edit ca.json atomically, validated first.

The running server picks changes up on SIGHUP (`systemctl reload appliance`) without dropping
connections; an invalid file is never written, so a reload cannot load one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from cryptography.hazmat.primitives import serialization
from pydantic import ValidationError

from appliance.authority.authority import load_template
from appliance.authority.claims import Claims
from appliance.authority.provisioners.jwk_keys import (
    encrypt_private_key,
    generate_key,
    public_jwk,
    thumbprint,
)
from appliance.cli.main import ca_url_option, cli, client_from, read_secret, root_option, run
from appliance.config import (
    ClaimsConfig,
    default_home,
    home_of,
    load_config,
    parse_config,
    write_config,
)
from appliance.errors import BadRequest, ConfigError


def _config_path(ca_config: Path | None) -> Path:
    return (ca_config or default_home() / "config" / "ca.json").absolute()


def _save(path: Path, data: dict[str, Any], action: str, name: str,
          policy_changed: bool = False) -> None:
    config = parse_config(data, str(path))
    global_claims = Claims().merged(config.authority.claims)
    for p in config.authority.provisioners:
        try:
            global_claims.merged(p.claims)
        except ConfigError as e:
            raise ConfigError(f"provisioner {p.name!r}: {e.message}") from None
        load_template(p, home_of(path))  # compiles and sample-renders; ConfigError names it
    from appliance.cli.audit_cmd import record_cli_event

    # Recorded first: a change the audit log cannot hold is not made.
    record_cli_event(path, "provisioner.change", {"action": action, "name": name})
    if policy_changed:
        record_cli_event(path, "policy.change", {"provisioner": name})
    write_config(path, config)
    click.echo(f"Success! {path} has been updated. Reload the CA to use it: "
               "`systemctl reload appliance` or `kill -HUP <pid>`.")


def _claims(existing: dict[str, Any] | None, min_dur: str | None, max_dur: str | None,
            default_dur: str | None, disable_renewal: bool | None,
            allow_after_expiry: bool | None) -> dict[str, Any] | None:
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
    text = path.read_text()
    if text.lstrip().startswith("{"):
        jwk_data = json.loads(text)
        if "d" in jwk_data:
            raise BadRequest(f"{path} holds a private JWK; pass it with --private-key")
        jwk_data = {k: v for k, v in jwk_data.items() if k in ("kty", "crv", "x", "y", "n", "e")}
        from appliance.authority.provisioners.jwk_keys import jwk_alg

        jwk_data["kid"] = thumbprint(jwk_data)
        jwk_data["use"] = "sig"
        jwk_data["alg"] = jwk_alg(jwk_data)
        return jwk_data
    raise BadRequest(f"{path} must hold a public JWK (JSON); a PEM key goes with --private-key")


def _key_material(create: bool, public_key: Path | None, private_key: Path | None,
                  password_file: Path | None) -> dict[str, Any]:
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


claims_options = [
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
]


POLICY_KINDS = ("cn", "dns", "ip", "email", "uri")


def policy_options(f: Any) -> Any:
    for side in ("deny", "allow"):
        for kind in reversed(POLICY_KINDS):
            f = click.option(f"--x509-{side}-{kind}", f"{side}_{kind}", multiple=True,
                             help=f"Name policy: {side} this {kind} pattern (repeatable).")(f)
    return click.option("--x509-allow-wildcard-names/--x509-deny-wildcard-names",
                        "allow_wildcards", default=None,
                        help="Name policy: allow wildcard DNS names.")(f)


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


def with_claims_options(f: Any) -> Any:
    for option in reversed(claims_options):
        f = option(f)
    return f


@cli.group()
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
@with_claims_options
@policy_options
def provisioner_add(name: str, kind: str, challenges: tuple[str, ...], require_eab: bool,
                    force_cn: bool, create: bool, public_key: Path | None,
                    private_key: Path | None, password_file: Path | None,
                    x509_min_dur: str | None, x509_max_dur: str | None,
                    x509_default_dur: str | None, disable_renewal: bool | None,
                    allow_after_expiry: bool | None, x509_template: Path | None,
                    x509_template_data: Path | None, ca_config: Path | None,
                    allow_wildcards: bool | None, **policy: tuple[str, ...]) -> None:
    """Add a provisioner."""
    path = _config_path(ca_config)
    data = load_config(path).to_json()
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
    claims = _claims(None, x509_min_dur, x509_max_dur, x509_default_dur, disable_renewal,
                     allow_after_expiry)
    if claims:
        entry["claims"] = claims
    _apply_template(entry, x509_template, x509_template_data)
    _apply_policy(entry, allow_wildcards, policy)
    data["authority"].setdefault("provisioners", []).append(entry)
    _save(path, data, "add", name, allow_wildcards is not None or any(policy.values()))


@provisioner.command("update")
@click.argument("name")
@click.option("--password-file", type=click.Path(path_type=Path))
@click.option("--create", is_flag=True, help="Replace the key with a new one.")
@click.option("--public-key", type=click.Path(path_type=Path, exists=True))
@click.option("--private-key", type=click.Path(path_type=Path, exists=True))
@with_claims_options
@policy_options
def provisioner_update(name: str, password_file: Path | None, create: bool,
                       public_key: Path | None, private_key: Path | None,
                       x509_min_dur: str | None, x509_max_dur: str | None,
                       x509_default_dur: str | None, disable_renewal: bool | None,
                       allow_after_expiry: bool | None, x509_template: Path | None,
                       x509_template_data: Path | None, ca_config: Path | None,
                       allow_wildcards: bool | None, **policy: tuple[str, ...]) -> None:
    """Change a provisioner's claims, key or template."""
    path = _config_path(ca_config)
    data = load_config(path).to_json()
    entry = next((p for p in data["authority"].get("provisioners", []) if p["name"] == name),
                 None)
    if entry is None:
        raise BadRequest(f"no provisioner named {name!r}")
    if create or public_key or private_key:
        entry.pop("encryptedKey", None)
        entry.update(_key_material(create, public_key, private_key, password_file))
    claims = _claims(entry.get("claims"), x509_min_dur, x509_max_dur, x509_default_dur,
                     disable_renewal, allow_after_expiry)
    if claims:
        entry["claims"] = claims
    _apply_template(entry, x509_template, x509_template_data)
    _apply_policy(entry, allow_wildcards, policy)
    _save(path, data, "update", name, allow_wildcards is not None or any(policy.values()))


@provisioner.command("remove")
@click.argument("name")
@click.option("--ca-config", type=click.Path(path_type=Path))
def provisioner_remove(name: str, ca_config: Path | None) -> None:
    """Remove a provisioner; its tokens are refused after the next reload."""
    path = _config_path(ca_config)
    data = load_config(path).to_json()
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
        items = load_config(ca_config).to_json()["authority"].get("provisioners", [])
    else:
        client, _ = client_from(ca_url, root)
        items = run(client.provisioners())
    click.echo(json.dumps(items, indent=3))
