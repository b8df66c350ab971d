"""ca.json: schema, load, validation (fail fast with the field that is wrong), atomic write.

The keys follow step-ca's ca.json where step-ca has them (root, crt, key, kms, address, dnsNames,
db, authority.provisioners, authority.claims, tls); `rootKey`, `workers` and `pinWorkers` are ours.
"""

from __future__ import annotations

import ipaddress
import json
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    ValidationError,
    field_validator,
    model_validator,
)

from appliance.config_policy import PolicyConfig
from appliance.durations import Duration
from appliance.errors import ConfigError
from appliance.fileio import write_atomic
from appliance.home import DEFAULT_HOME_ENV, Defaults, default_home  # noqa: F401 - re-exported

# step-ca's default cipher suites (Go names) and their OpenSSL spellings. TLS 1.3 suites are fixed.
CIPHER_SUITES = {
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
}
DEFAULT_CIPHER_SUITES = list(CIPHER_SUITES)


class _Model(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="forbid", frozen=True)


def _duration(*, positive: bool) -> Any:
    def parse(untrusted: object) -> Duration:
        if isinstance(untrusted, Duration):
            return untrusted
        if not isinstance(untrusted, str):
            raise ValueError("a duration must be a string such as 5m, 24h or 1h30m")
        value = Duration(untrusted)  # ValueError names the text
        if positive and value.value <= timedelta(0):
            raise ValueError(f"duration {untrusted!r} must be positive")
        if value.value < timedelta(0):
            raise ValueError(f"duration {untrusted!r} must not be negative")
        return value
    return parse


# ca.json durations: parsed and checked once, at load; written back as the operator spelt them.
PositiveDuration = Annotated[Duration, PlainValidator(_duration(positive=True)),
                             PlainSerializer(str, return_type=str)]
NonNegativeDuration = Annotated[Duration, PlainValidator(_duration(positive=False)),
                                PlainSerializer(str, return_type=str)]


class ClaimsConfig(_Model):
    min_tls_cert_duration: PositiveDuration | None = Field(None, alias="minTLSCertDuration")
    max_tls_cert_duration: PositiveDuration | None = Field(None, alias="maxTLSCertDuration")
    default_tls_cert_duration: PositiveDuration | None = Field(
        None, alias="defaultTLSCertDuration")
    disable_renewal: bool | None = Field(None, alias="disableRenewal")
    allow_renewal_after_expiry: bool | None = Field(None, alias="allowRenewalAfterExpiry")


class X509Options(_Model):
    """step-ca's provisioner `options.x509`: a certificate template and its data."""

    template: str | None = None
    template_file: str | None = Field(None, alias="templateFile")
    template_data: dict[str, Any] | None = Field(None, alias="templateData")

    @model_validator(mode="after")
    def _one_source(self) -> X509Options:
        if self.template is not None and self.template_file is not None:
            raise ValueError("set options.x509.template or templateFile, not both")
        return self


class ProvisionerOptions(_Model):
    x509: X509Options | None = None
    ssh: dict[str, Any] | None = None  # accepted for step-ca compatibility; not used


class JwkProvisionerConfig(_Model):
    type: Literal["JWK"]
    name: str = Field(min_length=1, max_length=128)
    key: dict[str, Any]
    encrypted_key: str | None = Field(None, alias="encryptedKey")
    claims: ClaimsConfig | None = None
    options: ProvisionerOptions | None = None
    policy: PolicyConfig | None = None

    @field_validator("key")
    @classmethod
    def _public_only(cls, key: dict[str, Any]) -> dict[str, Any]:
        if "d" in key or "p" in key:
            raise ValueError("the provisioner key in ca.json must be a public JWK "
                             "(no private part)")
        if key.get("kty") not in ("EC", "RSA", "OKP"):
            raise ValueError("the provisioner key must be an EC, RSA or OKP JWK")
        if not key.get("kid"):
            raise ValueError("the provisioner key needs a kid (its RFC 7638 thumbprint)")
        return key


ChallengeType = Literal["http-01", "dns-01", "tls-alpn-01"]


def _all_challenges() -> list[ChallengeType]:
    return ["http-01", "dns-01", "tls-alpn-01"]


class AcmeProvisionerConfig(_Model):
    type: Literal["ACME"]
    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._-]+$")
    challenges: list[ChallengeType] = Field(default_factory=_all_challenges)
    require_eab: bool = Field(False, alias="requireEAB")
    force_cn: bool = Field(False, alias="forceCN")
    terms_of_service: str | None = Field(None, alias="termsOfService")
    claims: ClaimsConfig | None = None
    options: ProvisionerOptions | None = None
    policy: PolicyConfig | None = None

    @field_validator("challenges")
    @classmethod
    def _some_challenge(cls, value: list[ChallengeType]) -> list[ChallengeType]:
        if not value:
            raise ValueError("an ACME provisioner needs at least one challenge type")
        return value


ProvisionerConfig = Annotated[JwkProvisionerConfig | AcmeProvisionerConfig,
                              Field(discriminator="type")]


class AcmeServerConfig(_Model):
    """Where the CA validates challenges (Pebble-like ports for tests) and how much at once."""

    http_port: int = Field(80, alias="httpPort", ge=1, le=65535)
    tls_port: int = Field(443, alias="tlsPort", ge=1, le=65535)
    validation_timeout: PositiveDuration = Field(Duration("10s"), alias="validationTimeout")
    max_concurrent_validations: int = Field(16, alias="maxConcurrentValidations", ge=1, le=1024)
    order_lifetime: PositiveDuration = Field(Duration("24h"), alias="orderLifetime")
    # Address ranges (CIDR) http-01 and tls-alpn-01 may not / may connect to. Denied are the
    # built-in internal ranges, this host's addresses and these; allowed ranges are exceptions
    # to all of those (docs/acme.md).
    validation_deny_ranges: list[str] = Field(default_factory=list, alias="validationDenyRanges")
    validation_allow_ranges: list[str] = Field(default_factory=list,
                                               alias="validationAllowRanges")

    @field_validator("validation_deny_ranges", "validation_allow_ranges")
    @classmethod
    def _ranges(cls, value: list[str]) -> list[str]:
        for text in value:
            ipaddress.ip_network(text, strict=True)  # its ValueError names the entry
        return value


class AuthorityConfig(_Model):
    provisioners: list[ProvisionerConfig] = Field(default_factory=list)
    claims: ClaimsConfig | None = None
    policy: PolicyConfig | None = None
    backdate: NonNegativeDuration = Duration("1m")

    @field_validator("provisioners", mode="before")
    @classmethod
    def _known_types(cls, value: Any) -> Any:
        if isinstance(value, list):
            for i, p in enumerate(value):
                if isinstance(p, dict) and p.get("type") not in ("JWK", "ACME"):
                    raise ValueError(f"provisioner {i}: unsupported type {p.get('type')!r}")
        return value

    @model_validator(mode="after")
    def _unique(self) -> AuthorityConfig:
        names = [p.name for p in self.provisioners]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"provisioner names must be unique: {sorted(dup)}")
        kids = [p.key["kid"] for p in self.provisioners if isinstance(p, JwkProvisionerConfig)]
        if len(set(kids)) != len(kids):
            raise ValueError("two provisioners share one key id")
        return self


class KmsConfig(_Model):
    type: Literal["pkcs11"] = "pkcs11"
    uri: str
    softhsm_conf: str | None = Field(None, alias="softhsmConf")

    @field_validator("uri")
    @classmethod
    def _uri(cls, value: str) -> str:
        if not value.startswith("pkcs11:"):
            raise ValueError("kms.uri must be a pkcs11: URI")
        if "pin-value" in value:
            raise ValueError("a PIN does not belong in ca.json; use --issuer-password-file")
        return value


class DbConfig(_Model):
    type: Literal["sqlite"] = "sqlite"
    data_source: str = Field(alias="dataSource")


class LoggerConfig(_Model):
    format: Literal["json", "text"] = "json"


class TlsConfig(_Model):
    min_version: float = Field(1.2, alias="minVersion")
    max_version: float = Field(1.3, alias="maxVersion")
    cipher_suites: list[str] = Field(default_factory=lambda: list(DEFAULT_CIPHER_SUITES),
                                     alias="cipherSuites")
    renegotiation: bool = False

    @field_validator("min_version", "max_version")
    @classmethod
    def _version(cls, value: float) -> float:
        if value not in (1.2, 1.3):
            raise ValueError("TLS versions 1.2 and 1.3 are supported")
        return value

    @field_validator("cipher_suites")
    @classmethod
    def _suites(cls, value: list[str]) -> list[str]:
        unknown = [s for s in value if s not in CIPHER_SUITES]
        if unknown:
            raise ValueError(f"unsupported cipher suites {unknown}; known: {sorted(CIPHER_SUITES)}")
        return value

    @model_validator(mode="after")
    def _order(self) -> TlsConfig:
        if self.min_version > self.max_version:
            raise ValueError("tls.minVersion is above tls.maxVersion")
        return self


class CrlConfig(_Model):
    """step-ca's `crl` block: a CRL signed by the issuer key, regenerated on revocation."""

    enabled: bool = False
    generate_on_revoke: bool = Field(True, alias="generateOnRevoke")
    cache_duration: PositiveDuration = Field(Duration("24h"), alias="cacheDuration")
    renew_period: PositiveDuration | None = Field(None, alias="renewPeriod")
    idp_url: str | None = Field(None, alias="idpURL")

    @model_validator(mode="after")
    def _renew_before_expiry(self) -> CrlConfig:
        if self.renew_period and self.renew_period.value >= self.cache_duration.value:
            raise ValueError("crl.renewPeriod must be shorter than crl.cacheDuration")
        if self.idp_url and not self.idp_url.startswith(("http://", "https://")):
            raise ValueError("crl.idpURL must be an http(s) URL")
        return self

    def lifetime(self) -> timedelta:
        return self.cache_duration.value

    def regenerate_before_expiry(self) -> timedelta:
        """How long before nextUpdate a fresh CRL is made (default: a third of its life)."""
        life = self.lifetime()
        return life - self.renew_period.value if self.renew_period else life / 3


class RateConfig(_Model):
    per_second: float = Field(0, alias="perSecond", ge=0)
    burst: float = Field(0, ge=0)


def _failed_auth_default() -> RateConfig:
    return RateConfig(per_second=5, burst=50)


class RateLimitsConfig(_Model):
    """Per client address and worker process; perSecond 0 turns a limit off."""

    issuance: RateConfig = Field(default_factory=RateConfig)
    failed_auth: RateConfig = Field(default_factory=_failed_auth_default, alias="failedAuth")


class UnlockConfig(_Model):
    """How the issuer token's PIN reaches the server: a password file, or a custodian quorum."""

    mode: Literal["password", "quorum"] = "password"
    sealed_pin: str = Field("config/sealed-pin.json", alias="sealedPin")
    admin_socket: str = Field("run/admin.sock", alias="adminSocket")
    tls_dir: str = Field("tls", alias="tlsDir")
    # Quorum mode: seal again (drop the PIN) when no worker could sign for this long; unset:
    # keep trying to re-establish the token for as long as it takes (docs/configuration.md).
    token_loss_seal_after: PositiveDuration | None = Field(None, alias="tokenLossSealAfter")


class AuditConfig(_Model):
    path: str = "audit/audit.jsonl"
    checkpoint_interval: PositiveDuration = Field(Duration("10m"), alias="checkpointInterval")



class CaConfig(_Model):
    root: str
    crt: str
    key: str
    root_key: str | None = Field(None, alias="rootKey")
    kms: KmsConfig
    address: str = "127.0.0.1:9000"
    insecure_address: str | None = Field(None, alias="insecureAddress")
    dns_names: list[str] = Field(alias="dnsNames", min_length=1)
    db: DbConfig
    logger: LoggerConfig = Field(default_factory=LoggerConfig)
    authority: AuthorityConfig = Field(default_factory=AuthorityConfig)
    tls: TlsConfig = Field(default_factory=TlsConfig)
    crl: CrlConfig = Field(default_factory=CrlConfig)
    acme: AcmeServerConfig = Field(default_factory=AcmeServerConfig)
    rate_limits: RateLimitsConfig = Field(default_factory=RateLimitsConfig, alias="rateLimits")
    unlock: UnlockConfig = Field(default_factory=UnlockConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    request_timeout: PositiveDuration = Field(Duration("30s"), alias="requestTimeout")
    # Connection limits (appliance/server/connections.py); maxConnections 0: from RLIMIT_NOFILE.
    header_timeout: PositiveDuration = Field(Duration("10s"), alias="headerTimeout")
    keepalive_timeout: PositiveDuration = Field(Duration("30s"), alias="keepaliveTimeout")
    max_connections_per_address: int = Field(64, alias="maxConnectionsPerAddress", ge=1,
                                             le=1_000_000)
    max_connections: int = Field(0, alias="maxConnections", ge=0, le=1_000_000)
    workers: int = Field(0, ge=0, le=64)
    pin_workers: bool = Field(True, alias="pinWorkers")
    max_body_bytes: int = Field(65536, alias="maxBodyBytes", ge=1024, le=16 * 1024 * 1024)


    @field_validator("address", "insecure_address")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value is None:
            return value
        host, sep, port = value.rpartition(":")
        if not sep or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"address {value!r} must be host:port")
        return value

    @field_validator("key", "root_key")
    @classmethod
    def _key_uri(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("pkcs11:"):
            raise ValueError("CA keys live in the token: give a pkcs11: URI")
        return value

    # Derived helpers; paths in ca.json may be relative to the CA home.
    def host_port(self, address: str | None = None) -> tuple[str, int]:
        host, _, port = (address or self.address).rpartition(":")
        return host.strip("[]") or "0.0.0.0", int(port)  # noqa: S104 - operator's choice

    def crl_url(self) -> str:
        """Where issued certificates say their CRL is (crlDistributionPoints)."""
        if self.crl.idp_url:
            return self.crl.idp_url
        if self.insecure_address:
            host, port = self.host_port(self.insecure_address)
            if host in ("0.0.0.0", "::"):  # noqa: S104 - a listen address, not a bind
                host = self.dns_names[0]
            return f"http://{host}:{port}/crl"
        _, port = self.host_port()
        return f"https://{self.dns_names[0]}:{port}/1.0/crl"

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True)


def resolve_path(home: Path, value: str) -> Path:
    """Paths in ca.json are absolute or relative to the CA home."""
    p = Path(value)
    return p if p.is_absolute() else home / p


def home_of(config_path: Path) -> Path:
    """The CA home of a ca.json at <home>/config/ca.json."""
    config_path = config_path.resolve()
    if config_path.parent.name == "config":
        return config_path.parent.parent
    return config_path.parent


def _describe(err: ValidationError) -> str:
    parts = []
    for e in err.errors()[:5]:
        loc = ".".join(str(x) for x in e["loc"]) or "(top level)"
        msg = str(e["msg"]).removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


def parse_config(data: Any, source: str = "ca.json") -> CaConfig:
    """Validate a decoded ca.json document."""
    try:
        return CaConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{source} is invalid: {_describe(e)}") from None


def load_config(path: Path) -> CaConfig:
    """Load and validate ca.json; raise ConfigError naming the problem."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist (run 'applianctl init' first)") from None
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e.msg} at line {e.lineno}") from None
    return parse_config(data, str(path))


def write_json_atomic(path: Path, data: Any, mode: int = 0o600) -> None:
    """Write JSON so that a reader sees the old or the new file, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # root editing a service's file (provisioner add, rekey-shares) keeps its owner
    write_atomic(path, (json.dumps(data, indent=2) + "\n").encode(), mode, keep_owner=True)


def write_config(path: Path, config: CaConfig) -> None:
    write_json_atomic(path, config.to_json())
