"""The authority: route a request to its provisioner, which authorizes it into a SignPlan, and
turn plans into certificates. `Authority.issue(plan)` is the only way to a certificate:

    validity -> claims -> template (the default leaf is a template too) -> name policy ->
    key policy -> pre-issuance checks -> Issuer (record, token signature, record)

Nothing else builds an IssuanceRequest (tests/unit/test_layers.py checks it).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import structlog
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from appliance.audit import AuditEvent
from appliance.authority.claims import Claims
from appliance.authority.csr import check_public_key, parse_csr_pem
from appliance.authority.lifecycle import RevokeRequest, verify_renew_token
from appliance.authority.plan import OrderGrant, RequestedValidity, SignPlan
from appliance.authority.policy import X509NamePolicy
from appliance.authority.provisioners.acme import AcmeProvisioner
from appliance.authority.provisioners.base import Audiences, AuthorizationContext, Provisioner
from appliance.authority.provisioners.jwk import MAX_TOKEN_BYTES, JwkProvisioner
from appliance.authority.provisioners.system import SystemProvisioner
from appliance.authority.requests import SignRequest, requested_validity
from appliance.config import CaConfig, JwkProvisionerConfig, ProvisionerConfig, resolve_path
from appliance.errors import (
    BadRequest,
    ConfigError,
    Unauthorized,
)
from appliance.issuance.ca_certs import fingerprint
from appliance.issuance.crl import CrlService
from appliance.issuance.issuer import (
    ISSUER_SET_EXTENSIONS,
    IssuanceRequest,
    IssuedCertificate,
    Issuer,
)
from appliance.issuance.names import check_san, san_to_text
from appliance.issuance.templates import CertificateDescription, X509Template
from appliance.jose import jws as jose_jws
from appliance.jose.jws import CompactJws
from appliance.storage import CertificateRecord, Revocation, Store, TokenUse

log = structlog.get_logger("appliance.authority")

REFUSED_ALGS = {"none", "HS256", "HS384", "HS512"}
DEFAULT_EXT_KEY_USAGE = (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH)
# A requested notBefore may lie this far in the past, no further.
MAX_BACKDATE_REQUEST = timedelta(days=1)


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
        self.system = SystemProvisioner()
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
        self.backdate = config.authority.backdate.value
        self.provisioners = provisioners
        self._by_kid = {p.kid: p for p in provisioners if isinstance(p, JwkProvisioner)}
        self.sign_audiences = audiences_for(config, "/sign")
        self.revoke_audiences = audiences_for(config, "/revoke")
        self.renew_audiences = audiences_for(config, "/renew")
        self.rekey_audiences = audiences_for(config, "/rekey")
        self.context = AuthorizationContext(
            root_fingerprint=self.root_fingerprint,
            audiences=Audiences(tuple(self.sign_audiences), tuple(self.revoke_audiences),
                                tuple(self.renew_audiences), tuple(self.rekey_audiences)),
            clock=self._clock, backdate=self.backdate)
        self.crl = CrlService(self.issuer, self.store, config.crl, self._clock)
        self._crl_dp = (x509.CRLDistributionPoints([x509.DistributionPoint(
            full_name=[x509.UniformResourceIdentifier(config.crl_url())], relative_name=None,
            reasons=None, crl_issuer=None)]) if config.crl.enabled else None)

    def provisioner_named(self, name: str) -> Provisioner | None:
        return next((p for p in self.provisioners if p.name == name), None)

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock(), UTC).replace(microsecond=0)

    # -- routing and authorization -------------------------------------------------------------
    def provisioner_for_token(self, untrusted_ott: str) -> tuple[JwkProvisioner, CompactJws]:
        """The provisioner a one-time token names, and the token parsed (once) for it."""
        if len(untrusted_ott) > MAX_TOKEN_BYTES:
            raise BadRequest(f"token is larger than {MAX_TOKEN_BYTES} bytes")
        # The header only routes the token; the provisioner's verification checks iss, the
        # signature and everything else.
        token = jose_jws.parse_compact(untrusted_ott)
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
        """POST /sign: authorise by the token's provisioner and issue; (certificate, name)."""
        provisioner, token = self.provisioner_for_token(request.untrusted_ott)
        plan = provisioner.authorize_sign(request, self.context, token)
        return await self.issue(plan), provisioner.name

    def authorize_order(self, provisioner: AcmeProvisioner, names: tuple[x509.GeneralName, ...],
                        untrusted_not_before: str | None, untrusted_not_after: str | None
                        ) -> OrderGrant:
        """ACME new-order: names outside policy are refused now (rejectedIdentifier), not at
        finalize; a requested validity is checked against the claims and recorded."""
        self._check_names(provisioner, x509.Name([]), names)
        requested = requested_validity(untrusted_not_before, untrusted_not_after, self._now())
        if requested.not_before is None and requested.not_after is None:
            return OrderGrant(names, None, None)
        not_before, not_after = self._validity(provisioner, requested)
        return OrderGrant(names, not_before, not_after)

    async def issue_server_tls(self, public_key: CertificatePublicKeyTypes,
                               dns_names: list[str]) -> IssuedCertificate:
        """The CA's own TLS certificate, authorized by its system provisioner."""
        return await self.issue(self.system.authorize_server_tls(public_key, dns_names,
                                                                 self.context))

    # -- the one pipeline ----------------------------------------------------------------------
    async def issue(self, plan: SignPlan) -> IssuedCertificate:
        """Validity, claims, template, name and key policy, pre-issuance checks; then the issuer."""
        provisioner = plan.provisioner
        not_before, not_after = self._validity(provisioner, plan.validity)
        description = plan.description or provisioner.template.describe(plan)
        self._check_names(provisioner, description.subject, description.sans)
        check_public_key(plan.public_key)
        extensions = self._extensions(provisioner, description)
        return await self.issuer.issue(IssuanceRequest(
            subject=description.subject,
            sans=description.sans,
            public_key=plan.public_key,
            not_before=not_before,
            not_after=not_after,
            provisioner=provisioner.name,
            token_use=plan.token_use,
            key_usage=description.key_usage,
            ext_key_usage=description.ext_key_usage or DEFAULT_EXT_KEY_USAGE,
            extra_extensions=extensions,
            audit_event=plan.audit_event,
        ))

    def _validity(self, provisioner: Provisioner, requested: RequestedValidity
                  ) -> tuple[datetime, datetime]:
        """Requested (or default) validity, checked against the provisioner's claims."""
        intermediate_end = self.issuer.certificate.not_valid_after_utc
        if requested.fixed:
            assert requested.not_before is not None and requested.not_after is not None
            return requested.not_before, min(requested.not_after, intermediate_end)
        now = self._now()
        not_before = requested.not_before or now
        not_after = requested.not_after or not_before + provisioner.claims.default_duration
        if not_after <= not_before:
            raise BadRequest("notAfter must be after notBefore")
        provisioner.claims.check_duration(not_after - not_before)
        if requested.not_before is None:
            not_before -= self.backdate  # absorb clock skew of relying parties
        elif not_before < now - MAX_BACKDATE_REQUEST:
            raise BadRequest("notBefore may not be more than a day in the past")
        if not_after > intermediate_end:
            raise BadRequest("requested notAfter is after the intermediate certificate expires")
        return not_before, not_after

    def _check_names(self, provisioner: Provisioner, subject: x509.Name,
                     sans: tuple[x509.GeneralName, ...]) -> None:
        """The names must be text, well-formed (names.check_san: no DNS name that reads as an
        address, no space or control character), and pass both policies."""
        try:
            subject.rfc4514_string().encode("utf-8")
            for name in sans:
                san_to_text(name).encode("utf-8")
        except UnicodeEncodeError:
            raise BadRequest("names must be valid Unicode text") from None
        for name in sans:  # whatever made them: token, order, template, a renewal's copy
            check_san(name)
        cns = subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        cn = str(cns[0].value) if cns else None
        if provisioner.under_authority_policy:
            self.policy.check(cn, sans)
        provisioner.policy.check(cn, sans)

    def _extensions(self, provisioner: Provisioner, description: CertificateDescription
                    ) -> tuple[x509.Extension[x509.ExtensionType], ...]:
        """Who authorised it and where its CRL is (a template's CRL location replaces ours),
        then the description's own; each extension at most once, none the issuer sets."""
        extensions: list[x509.Extension[x509.ExtensionType]] = []
        named = provisioner.certificate_extension()
        if named is not None:
            extensions.append(named)
        if description.crl_distribution_points:
            dp = x509.CRLDistributionPoints([x509.DistributionPoint(
                full_name=[x509.UniformResourceIdentifier(u)
                           for u in description.crl_distribution_points],
                relative_name=None, reasons=None, crl_issuer=None)])
            extensions.append(x509.Extension(dp.oid, False, dp))
        elif self._crl_dp is not None:
            extensions.append(x509.Extension(self._crl_dp.oid, False, self._crl_dp))
        extensions += description.extensions
        seen: set[x509.ObjectIdentifier] = set()
        for ext in extensions:
            if ext.oid in seen or ext.oid in ISSUER_SET_EXTENSIONS:
                raise BadRequest("the certificate cannot be built: extension "
                                 f"{ext.oid.dotted_string} would appear twice")
            seen.add(ext.oid)
        return tuple(extensions)

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

    async def _renewable(self, cert: x509.Certificate) -> Provisioner:
        record = await self.recorded(cert)
        if await self.store.get_revocation(cert.serial_number) is not None:
            raise Unauthorized("the certificate has been revoked")
        provisioner = self.provisioner_named(record.provisioner)
        if provisioner is None:
            raise Unauthorized(f"the provisioner {record.provisioner!r} that authorised this "
                               "certificate no longer exists")
        return provisioner

    def verify_x5c_token(self, untrusted_bearer: str, *, rekey: bool
                         ) -> tuple[x509.Certificate, TokenUse]:
        """An x5c Bearer token for /renew (or /rekey): the certificate it carries, its jti."""
        return verify_renew_token(untrusted_bearer, self.rekey_audiences if rekey
                                  else self.renew_audiences, self._clock())

    async def renew(self, cert: x509.Certificate, *, token_use: TokenUse | None = None,
                    new_public_key: CertificatePublicKeyTypes | None = None
                    ) -> tuple[IssuedCertificate, str]:
        """Same subject, names and lifetime length, starting now (step-ca's arithmetic)."""
        provisioner = await self._renewable(cert)
        plan = provisioner.authorize_renew(cert, self.context, token_use=token_use,
                                           new_public_key=new_public_key)
        return await self.issue(plan), provisioner.name

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
            provisioner, token = self.provisioner_for_token(request.untrusted_ott)
            token_use: TokenUse | None = provisioner.authorize_revoke(request, self.context,
                                                                      token)
            who, method = provisioner.name, "token"
        elif peer is not None:
            if peer.serial_number != request.serial:
                raise Unauthorized("over mTLS a certificate can revoke only itself")
            record = await self.recorded(peer)
            who, token_use = record.provisioner, None
        else:
            raise Unauthorized("revocation needs a revoke token (ott) or the certificate "
                               "itself over mTLS")
        await self.store.revoke(Revocation(
            serial=request.serial, reason_code=request.reason_code, reason=request.reason,
            revoked_at=self._now(), provisioner=who, method=method, token_use=token_use))
        await self.issuer.record(AuditEvent(
            "cert.revoke", "success", f"{method}:{who}",
            {"serial": format(request.serial, "x"), "reason_code": request.reason_code,
             "reason": request.reason}))
        if self.config.crl.enabled and self.config.crl.generate_on_revoke:
            await self.crl.regenerate()
        return who
