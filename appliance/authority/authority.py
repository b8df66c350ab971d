"""The authority: authenticate a request through its provisioner, apply claims and name checks,
and hand a typed IssuanceRequest to the issuer. Every path to a certificate passes here."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import structlog
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtensionOID, NameOID

from appliance.audit import AuditEvent
from appliance.authority import compact_jws
from appliance.authority.claims import Claims
from appliance.authority.compact_jws import CompactJws
from appliance.authority.csr import parse_csr_pem
from appliance.authority.lifecycle import RevokeRequest, parse_serial
from appliance.authority.policy import X509NamePolicy
from appliance.authority.provisioners.acme import AcmeProvisioner
from appliance.authority.provisioners.base import Provisioner
from appliance.authority.provisioners.jwk import MAX_TOKEN_BYTES, JwkProvisioner
from appliance.config import CaConfig, JwkProvisionerConfig, ProvisionerConfig, resolve_path
from appliance.durations import parse_duration
from appliance.errors import BadRequest, ConfigError, Forbidden, NotFound, Unauthorized
from appliance.issuance.ca_certs import fingerprint
from appliance.issuance.crl import CrlService
from appliance.issuance.issuer import IssuanceRequest, IssuedCertificate, Issuer
from appliance.issuance.names import canonical_san, parse_san, san_to_text, sans_of
from appliance.issuance.provisioner_ext import PROVISIONER_OID, provisioner_extension
from appliance.issuance.templates import TemplateData, X509Template
from appliance.storage import (
    AlreadyRevoked,
    CertificateRecord,
    CertificateUnknown,
    Revocation,
    Store,
    TokenReused,
    TokenUse,
)

log = structlog.get_logger("appliance.authority")

REFUSED_ALGS = {"none", "HS256", "HS384", "HS512"}
# Set anew on every renewal (by the issuer, the authority or the renewal itself); any other
# extension of the old certificate, e.g. one its template added, carries over, as in step-ca.
REISSUED_EXTENSIONS = frozenset({
    ExtensionOID.SUBJECT_KEY_IDENTIFIER, ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
    ExtensionOID.KEY_USAGE, ExtensionOID.EXTENDED_KEY_USAGE,
    ExtensionOID.SUBJECT_ALTERNATIVE_NAME, ExtensionOID.BASIC_CONSTRAINTS,
    ExtensionOID.CRL_DISTRIBUTION_POINTS, PROVISIONER_OID,
})
# Certificate times are bounded long before datetime arithmetic could overflow.
MAX_TIME_OFFSET = timedelta(days=365 * 100)
MAX_CN_LENGTH = 64


@dataclass(frozen=True)
class SignRequest:
    """The body of POST /sign, type-checked but not yet trusted."""

    untrusted_csr: str
    untrusted_ott: str
    untrusted_not_before: str | None = None
    untrusted_not_after: str | None = None
    untrusted_template_data: dict[str, Any] | None = None

    @classmethod
    def from_json(cls, body: Any) -> SignRequest:
        if not isinstance(body, dict):
            raise BadRequest("request body must be a JSON object")
        csr, ott = body.get("csr"), body.get("ott")
        if not isinstance(csr, str) or not csr:
            raise BadRequest("missing csr: a PEM certificate request is required")
        if not isinstance(ott, str) or not ott:
            raise BadRequest("missing ott: a one-time token is required")
        nb, na = body.get("notBefore"), body.get("notAfter")
        for field, v in (("notBefore", nb), ("notAfter", na)):
            if v is not None and not isinstance(v, str):
                raise BadRequest(f"{field} must be an RFC 3339 time or a duration string")
        template_data = body.get("templateData")
        if template_data is not None and not isinstance(template_data, dict):
            raise BadRequest("templateData must be a JSON object")
        return cls(csr, ott, nb or None, na or None, template_data)


def parse_time_or_duration(untrusted: str, field: str, now: datetime) -> datetime:
    """step's TimeDuration: an RFC 3339 time, or a duration from now such as "1h" or "+90m"."""
    value = untrusted.strip()
    try:
        delta = parse_duration(value)
    except ValueError:
        delta = None
    if delta is not None:
        if abs(delta) > MAX_TIME_OFFSET:
            raise BadRequest(f"{field} {untrusted[:40]!r} is too far from now")
        return now + delta
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise BadRequest(f"{field} {untrusted!r} is neither an RFC 3339 time nor a duration"
                         ) from None
    if parsed.tzinfo is None:
        raise BadRequest(f"{field} must carry a time zone (e.g. Z)")
    parsed = parsed.astimezone(UTC)
    if abs(parsed - now) > MAX_TIME_OFFSET:
        raise BadRequest(f"{field} {untrusted[:40]!r} is too far from now")
    return parsed


def audiences_for(config: CaConfig, path: str) -> list[str]:
    """Every URL a token for `path` may name: each DNS name with the port, and without on 443."""
    _, port = config.host_port()
    out: list[str] = []
    for name in config.dns_names:
        host = f"[{name}]" if ":" in name else name
        bases = [f"https://{host}:{port}"] + ([f"https://{host}"] if port == 443 else [])
        for base in bases:
            out += [f"{base}/1.0{path}", f"{base}{path}"]
    return out


def load_template(provisioner: ProvisionerConfig, home: Path) -> X509Template | None:
    """Compile and sample-render a provisioner's template; ConfigError names what is wrong."""
    options = provisioner.options.x509 if provisioner.options else None
    if options is None or (options.template is None and options.template_file is None):
        return None
    name = f"provisioner {provisioner.name!r} template"
    if options.template_file is not None:
        path = resolve_path(home, options.template_file)
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{name}: cannot read {path}: {e}") from None
    else:
        assert options.template is not None
        source = options.template
    template = X509Template.compile(source, name=name)
    template.check(options.template_data or {})
    return template


def build_provisioner(config: ProvisionerConfig, claims: Claims,
                      template: X509Template | None) -> Provisioner:
    if isinstance(config, JwkProvisionerConfig):
        return JwkProvisioner(config, claims, template)
    return AcmeProvisioner(config, claims, template)


class Authority:
    def __init__(
        self, config: CaConfig, issuer: Issuer, root: x509.Certificate, store: Store,
        home: Path, clock: Callable[[], float] = time.time,
    ) -> None:
        self.home = home
        self.issuer = issuer
        self.store = store
        self.root = root
        self.root_fingerprint = fingerprint(root)
        self._clock = clock
        self.reload(config)

    def reload(self, config: CaConfig) -> None:
        """Swap in a new validated configuration (provisioners, claims, audiences)."""
        global_claims = Claims().merged(config.authority.claims)
        provisioners = [build_provisioner(p, global_claims.merged(p.claims),
                                          load_template(p, self.home))
                        for p in config.authority.provisioners]
        self.config = config
        self.policy = X509NamePolicy.of(config.authority.policy)
        self.claims = global_claims
        self.backdate = parse_duration(config.authority.backdate)
        self.provisioners = provisioners
        self._by_kid = {p.kid: p for p in provisioners if isinstance(p, JwkProvisioner)}
        self.sign_audiences = audiences_for(config, "/sign")
        self.revoke_audiences = audiences_for(config, "/revoke")
        self.renew_audiences = audiences_for(config, "/renew")
        self.rekey_audiences = audiences_for(config, "/rekey")
        self.crl = CrlService(self.issuer, self.store, config.crl, self._clock)
        self._crl_dp = (x509.CRLDistributionPoints([x509.DistributionPoint(
            full_name=[x509.UniformResourceIdentifier(config.crl_url())], relative_name=None,
            reasons=None, crl_issuer=None)]) if config.crl.enabled else None)

    def check_policy(self, provisioner: Provisioner, subject: x509.Name,
                     sans: tuple[x509.GeneralName, ...]) -> None:
        """The names must pass the authority's policy and the provisioner's; deny wins."""
        cns = subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        cn = str(cns[0].value) if cns else None
        self.policy.check(cn, sans)
        provisioner.policy.check(cn, sans)

    def provisioner_named(self, name: str) -> Provisioner | None:
        return next((p for p in self.provisioners if p.name == name), None)

    def common_extensions(self, provisioner: Provisioner
                          ) -> tuple[x509.Extension[x509.ExtensionType], ...]:
        """What every certificate carries: who authorised it, and where its CRL is."""
        exts: list[x509.Extension[x509.ExtensionType]] = [
            provisioner_extension(provisioner.type, provisioner.name,
                                  provisioner.credential_id)]
        if self._crl_dp is not None:
            exts.append(x509.Extension(self._crl_dp.oid, False, self._crl_dp))
        return tuple(exts)

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock(), UTC).replace(microsecond=0)

    def provisioner_for_token(self, untrusted_ott: str) -> tuple[JwkProvisioner, CompactJws]:
        """The provisioner a one-time token names, and the token parsed (once) for it."""
        if len(untrusted_ott) > MAX_TOKEN_BYTES:
            raise BadRequest(f"token is larger than {MAX_TOKEN_BYTES} bytes")
        # The header only routes the token; the provisioner's verification checks iss, the
        # signature and everything else.
        token = compact_jws.parse(untrusted_ott)
        alg = token.alg
        if alg in REFUSED_ALGS or alg.lower() == "none":
            raise Unauthorized(f"token algorithm {alg!r} is not allowed")
        provisioner = self._by_kid.get(token.kid)
        if provisioner is None:
            raise Unauthorized("token is not from a known provisioner (check iss and kid)")
        if alg != provisioner.alg:
            raise Unauthorized(f"token algorithm {alg!r} does not match the provisioner key "
                               f"({provisioner.alg})")
        return provisioner, token

    async def sign(self, request: SignRequest) -> tuple[IssuedCertificate, str]:
        """Authorise and issue; return the certificate and the provisioner's name."""
        provisioner, parsed = self.provisioner_for_token(request.untrusted_ott)
        token = provisioner.verify_token(parsed, self.sign_audiences,
                                         self.root_fingerprint, now=self._clock())
        csr = parse_csr_pem(request.untrusted_csr)

        if len(token.subject) > MAX_CN_LENGTH:
            raise BadRequest(f"subject is longer than {MAX_CN_LENGTH} characters")
        cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if cns and cns[0].value != token.subject:
            raise Forbidden(f"certificate request common name {cns[0].value!r} does not match "
                            f"the token subject {token.subject!r}")
        token_sans = [parse_san(s) for s in token.sans]
        allowed = {canonical_san(n) for n in token_sans}
        for name in sans_of(csr):
            if canonical_san(name) not in allowed:
                raise Forbidden(f"certificate request name {san_to_text(name)!r} is not among "
                                f"the token's names {list(token.sans)}")

        not_before, not_after = self.validity(provisioner, request.untrusted_not_before,
                                              request.untrusted_not_after)
        issued = await self.describe_and_issue(
            provisioner, csr,
            subject_cn=token.subject, sans=tuple(token_sans), san_texts=token.sans,
            token_claims=token.raw, user_data=request.untrusted_template_data or {},
            not_before=not_before, not_after=not_after,
            token_use=TokenUse(provisioner.name, token.jti, token.expires_at))
        return issued, provisioner.name

    def validity(self, provisioner: Provisioner, untrusted_not_before: str | None,
                 untrusted_not_after: str | None) -> tuple[datetime, datetime]:
        """Requested (or default) validity, checked against the provisioner's claims."""
        now = datetime.fromtimestamp(self._clock(), UTC).replace(microsecond=0)
        not_before = (parse_time_or_duration(untrusted_not_before, "notBefore", now)
                      if untrusted_not_before else now)
        not_after = (parse_time_or_duration(untrusted_not_after, "notAfter", not_before)
                     if untrusted_not_after
                     else not_before + provisioner.claims.default_duration)
        if not_after <= not_before:
            raise BadRequest("notAfter must be after notBefore")
        provisioner.claims.check_duration(not_after - not_before)
        if not untrusted_not_before:
            not_before -= self.backdate  # absorb clock skew of relying parties
        if not_after > self.issuer.certificate.not_valid_after_utc:
            raise BadRequest("requested notAfter is after the intermediate certificate expires")
        if not_before < now - timedelta(days=1) and untrusted_not_before:
            raise BadRequest("notBefore may not be more than a day in the past")
        return not_before, not_after

    async def describe_and_issue(
        self, provisioner: Provisioner, csr: x509.CertificateSigningRequest, *,
        subject_cn: str | None, sans: tuple[x509.GeneralName, ...], san_texts: tuple[str, ...],
        token_claims: dict[str, Any], user_data: dict[str, Any], not_before: datetime,
        not_after: datetime, token_use: TokenUse | None,
    ) -> IssuedCertificate:
        """Template (or the default leaf), then policy, then the issuer: every path ends here."""
        extensions = self.common_extensions(provisioner)
        if provisioner.template is None:
            subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)]
                                if subject_cn else [])
            key_usage: x509.KeyUsage | None = None
            eku = IssuanceRequest.ext_key_usage
        else:
            cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            desc = provisioner.template.render(TemplateData(
                subject=subject_cn or "", sans=san_texts, token=token_claims,
                csr_subject=str(cns[0].value) if cns else None,
                csr_sans=tuple(san_to_text(n) for n in sans_of(csr)),
                user=user_data, provisioner_data=provisioner.template_data))
            subject, sans, key_usage = desc.subject, desc.sans, desc.key_usage
            eku = desc.ext_key_usage or IssuanceRequest.ext_key_usage
            if desc.crl_distribution_points:  # the template's CRL location replaces ours
                dp = x509.CRLDistributionPoints([x509.DistributionPoint(
                    full_name=[x509.UniformResourceIdentifier(u)
                               for u in desc.crl_distribution_points],
                    relative_name=None, reasons=None, crl_issuer=None)])
                extensions = tuple(e for e in extensions if e.oid != dp.oid) + (
                    x509.Extension(dp.oid, False, dp),)
            extensions += desc.extensions

        try:
            subject.rfc4514_string().encode("utf-8")
            for name in sans:
                san_to_text(name).encode("utf-8")
        except UnicodeEncodeError:
            raise BadRequest("names must be valid Unicode text") from None
        self.check_policy(provisioner, subject, sans)
        return await self.issuer.issue(IssuanceRequest(
            subject=subject,
            sans=sans,
            public_key=csr.public_key(),
            not_before=not_before,
            not_after=not_after,
            provisioner=provisioner.name,
            token_use=token_use,
            key_usage=key_usage,
            ext_key_usage=eku,
            extra_extensions=extensions,
        ))

    # -- lifecycle of an issued certificate --------------------------------------------------
    async def recorded(self, cert: x509.Certificate) -> CertificateRecord:
        """The database record of a certificate presented as a credential, if it is ours."""
        record = await self.store.get_certificate(cert.serial_number)
        if record is None or record.der != cert.public_bytes(serialization.Encoding.DER):
            raise Unauthorized("the certificate was not issued by this CA")
        try:
            cert.verify_directly_issued_by(self.issuer.certificate)
        except (ValueError, TypeError, InvalidSignature):
            raise Unauthorized("the certificate was not issued by this CA's intermediate"
                               ) from None
        return record

    async def _renewable(self, cert: x509.Certificate, *, allow_expired: bool
                         ) -> tuple[CertificateRecord, Provisioner]:
        record = await self.recorded(cert)
        if await self.store.get_revocation(cert.serial_number) is not None:
            raise Unauthorized("the certificate has been revoked")
        provisioner = self.provisioner_named(record.provisioner)
        if provisioner is None:
            raise Unauthorized(f"the provisioner {record.provisioner!r} that authorised this "
                               "certificate no longer exists")
        if provisioner.claims.disable_renewal:
            raise Forbidden(f"renewal is disabled for provisioner {provisioner.name!r}")
        if self._now() > cert.not_valid_after_utc:
            if not allow_expired:
                raise Unauthorized("the certificate has expired; renew it with an x5c token "
                                   "where the provisioner allows renewal after expiry")
            if not provisioner.claims.allow_renewal_after_expiry:
                raise Unauthorized(
                    f"the certificate expired at {cert.not_valid_after_utc.isoformat()} and "
                    f"provisioner {provisioner.name!r} does not allow renewal after expiry")
        return record, provisioner

    async def renew(self, cert: x509.Certificate, *, token_use: TokenUse | None = None,
                    new_public_key: CertificatePublicKeyTypes | None = None
                    ) -> tuple[IssuedCertificate, str]:
        """Same subject, names and lifetime length, starting now (step-ca's arithmetic)."""
        _, provisioner = await self._renewable(cert, allow_expired=token_use is not None)
        duration = cert.not_valid_after_utc - cert.not_valid_before_utc
        now = self._now()
        not_after = now + duration - self.backdate
        if not_after > self.issuer.certificate.not_valid_after_utc:
            not_after = self.issuer.certificate.not_valid_after_utc
        try:
            sans = tuple(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
                         .value)
        except x509.ExtensionNotFound:
            sans = ()
        try:
            eku = tuple(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
        except x509.ExtensionNotFound:
            eku = ()
        try:
            ku: x509.KeyUsage | None = cert.extensions.get_extension_for_class(
                x509.KeyUsage).value
        except x509.ExtensionNotFound:
            ku = None
        self.check_policy(provisioner, cert.subject, sans)
        public_key = new_public_key or cert.public_key()
        if new_public_key is not None:
            ku = None  # keyEncipherment follows the new key's type
        issued = await self.issuer.issue(IssuanceRequest(
            audit_event="cert.rekey" if new_public_key is not None else "cert.renew",
            subject=cert.subject, sans=sans, public_key=public_key,
            not_before=now - self.backdate, not_after=not_after, provisioner=provisioner.name,
            token_use=token_use, key_usage=ku, ext_key_usage=eku or IssuanceRequest.ext_key_usage,
            extra_extensions=self.common_extensions(provisioner) + tuple(
                e for e in cert.extensions if e.oid not in REISSUED_EXTENSIONS)))
        return issued, provisioner.name

    async def rekey(self, cert: x509.Certificate, untrusted_csr: str,
                    token_use: TokenUse | None = None) -> tuple[IssuedCertificate, str]:
        """A new key for the same identity; never for an expired certificate."""
        csr = parse_csr_pem(untrusted_csr)
        if self._now() > cert.not_valid_after_utc:
            raise Unauthorized("an expired certificate cannot be rekeyed; renew it first")
        return await self.renew(cert, new_public_key=csr.public_key(), token_use=token_use)

    async def revoke(self, request: RevokeRequest, peer: x509.Certificate | None,
                     method: str = "mtls") -> str:
        """Revoke by a provisioner's revoke token, or by the certificate itself (mTLS, or an
        ACME revokeCert whose caller has proven the right to it: `method` says which)."""
        if request.untrusted_ott:
            provisioner, parsed = self.provisioner_for_token(request.untrusted_ott)
            token = provisioner.verify_token(parsed, self.revoke_audiences,
                                             self.root_fingerprint, now=self._clock())
            if parse_serial(token.subject) != request.serial:
                raise Unauthorized("the revoke token's subject is not the serial to revoke")
            who, method = provisioner.name, "token"
            token_use: TokenUse | None = TokenUse(provisioner.name, token.jti, token.expires_at)
        elif peer is not None:
            if peer.serial_number != request.serial:
                raise Unauthorized("over mTLS a certificate can revoke only itself")
            record = await self.recorded(peer)
            who, token_use = record.provisioner, None
        else:
            raise Unauthorized("revocation needs a revoke token (ott) or the certificate "
                               "itself over mTLS")
        try:
            await self.store.revoke(Revocation(
                serial=request.serial, reason_code=request.reason_code, reason=request.reason,
                revoked_at=self._now(), provisioner=who, method=method, token_use=token_use))
        except CertificateUnknown:
            raise NotFound(f"no certificate with serial {request.serial} was issued by this CA"
                           ) from None
        except AlreadyRevoked:
            raise BadRequest(f"certificate with serial {request.serial} is already revoked"
                             ) from None
        except TokenReused:
            raise Unauthorized("token already used: one-time tokens cannot be replayed"
                               ) from None
        await self.issuer.record(AuditEvent(
            "cert.revoke", "success", f"{method}:{who}",
            {"serial": format(request.serial, "x"), "reason_code": request.reason_code,
             "reason": request.reason}))
        if self.config.crl.enabled and self.config.crl.generate_on_revoke:
            await self.crl.regenerate()
        return who
