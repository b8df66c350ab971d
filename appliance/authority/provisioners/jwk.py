"""The JWK provisioner: one-time tokens (JWTs) signed by the provisioner's key.

Claims: iss (provisioner name), sub (subject), aud (https://<ca>/1.0/sign), nbf/iat/exp, jti,
sha (root fingerprint), sans. Verified here: signature with the provisioner's one algorithm
(never `none` or HMAC), iss + kid, audience, times with a minute of leeway, lifetime at most an
hour. Single use of jti is enforced by the store, atomically with the issuance it authorises.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography.x509.oid import NameOID

from appliance.authority.claims import Claims
from appliance.authority.csr import parse_csr_pem
from appliance.authority.lifecycle import RevokeRequest, parse_serial
from appliance.authority.plan import SignPlan
from appliance.authority.provisioners.base import AuthorizationContext, Provisioner
from appliance.authority.provisioners.jwk_keys import jwk_alg
from appliance.authority.requests import SignRequest, requested_validity
from appliance.config import JwkProvisionerConfig
from appliance.errors import BadRequest, Forbidden, Unauthorized
from appliance.issuance.names import canonical_san, parse_san, san_to_text, sans_of
from appliance.issuance.templates import X509Template
from appliance.jose import jwk as jose_jwk
from appliance.jose import jws as jose_jws
from appliance.jose.jws import CompactJws
from appliance.storage import TokenUse

LEEWAY_SECONDS = 60
MAX_TOKEN_LIFETIME = 3600
MAX_TOKEN_BYTES = 8192
MAX_CN_LENGTH = 64


@dataclass(frozen=True)
class TokenClaims:
    """What a verified one-time token grants."""

    provisioner: str
    subject: str
    sans: tuple[str, ...]
    jti: str
    expires_at: datetime
    raw: dict[str, Any]


class JwkProvisioner(Provisioner):
    type = "JWK"
    config: JwkProvisionerConfig

    def __init__(self, config: JwkProvisionerConfig, claims: Claims,
                 template: X509Template | None = None) -> None:
        super().__init__(config, claims, template)
        self.kid = str(config.key["kid"])
        self.alg = jwk_alg(config.key)
        self._public_key = jose_jwk.public_key(dict(config.key), self.alg, "provisioner key")

    def verify_token(
        self, untrusted_token: str | CompactJws, audiences: list[str], root_fingerprint: str,
        now: float | None = None,
    ) -> TokenClaims:
        """Check a token the authority has routed here by its kid (and alg): signature with
        the provisioner's one algorithm, iss, audience, times, lifetime, sha, subject, jti."""
        token = (jose_jws.parse_compact(untrusted_token) if isinstance(untrusted_token, str)
                 else untrusted_token)
        claims = jose_jws.verify_compact(token, self._public_key, self.alg)
        if claims.get("nbf") is None and claims.get("iat") is None:
            raise Unauthorized("token needs an nbf or iat claim")
        exp = jose_jws.check_claims(
            claims, audiences=audiences, now=time.time() if now is None else now,
            leeway=LEEWAY_SECONDS, max_lifetime=MAX_TOKEN_LIFETIME,
            required=("exp", "iss", "aud", "sub", "jti"))
        if claims["iss"] != self.name:
            raise Unauthorized("token issuer does not match the provisioner")
        sha = claims.get("sha")
        if sha is not None and str(sha).lower().replace(":", "") != root_fingerprint:
            raise Unauthorized("token sha claim is not this CA's root fingerprint")
        subject = claims["sub"]
        jti = claims["jti"]
        if not isinstance(subject, str) or not subject:
            raise Unauthorized("token subject must be a non-empty string")
        if not isinstance(jti, str) or not 8 <= len(jti) <= 256:
            raise Unauthorized("token jti must be a string of 8 to 256 characters")
        raw_sans = claims.get("sans", [subject])
        if not isinstance(raw_sans, list) or not all(isinstance(s, str) for s in raw_sans):
            raise BadRequest("token sans must be a list of strings")
        return TokenClaims(
            provisioner=self.name, subject=subject, sans=tuple(raw_sans), jti=jti,
            expires_at=datetime.fromtimestamp(exp, UTC), raw=claims)

    @property
    def credential_id(self) -> str:
        return self.kid

    def authorize_sign(self, request: SignRequest, context: AuthorizationContext,
                       token: CompactJws | None = None) -> SignPlan:
        """The token is this provisioner's, unexpired and for /sign; the CSR asks for the token's
        subject and names only. The jti is recorded with the certificate (single use)."""
        claims = self.verify_token(token or request.untrusted_ott, list(context.audiences.sign),
                                   context.root_fingerprint, now=context.clock())
        csr = parse_csr_pem(request.untrusted_csr)
        if len(claims.subject) > MAX_CN_LENGTH:
            raise BadRequest(f"subject is longer than {MAX_CN_LENGTH} characters")
        cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if cns and cns[0].value != claims.subject:
            raise Forbidden(f"certificate request common name {cns[0].value!r} does not match "
                            f"the token subject {claims.subject!r}")
        token_sans = tuple(parse_san(s) for s in claims.sans)
        allowed = {canonical_san(n) for n in token_sans}
        for name in sans_of(csr):
            if canonical_san(name) not in allowed:
                raise Forbidden(f"certificate request name {san_to_text(name)!r} is not among "
                                f"the token's names {list(claims.sans)}")
        return SignPlan(
            provisioner=self, public_key=csr.public_key(), subject=claims.subject,
            sans=token_sans, csr=csr, trusted_data=claims.raw,
            untrusted_data=request.untrusted_template_data or {},
            validity=requested_validity(request.untrusted_not_before,
                                        request.untrusted_not_after, context.now()),
            token_use=TokenUse(self.name, claims.jti, claims.expires_at))

    def authorize_revoke(self, request: RevokeRequest, context: AuthorizationContext,
                         token: CompactJws | None = None) -> TokenUse:
        """A revoke token of this provisioner whose subject is the serial to revoke."""
        assert request.untrusted_ott is not None
        claims = self.verify_token(token or request.untrusted_ott,
                                   list(context.audiences.revoke), context.root_fingerprint,
                                   now=context.clock())
        if parse_serial(claims.subject) != request.serial:
            raise Unauthorized("the revoke token's subject is not the serial to revoke")
        return TokenUse(self.name, claims.jti, claims.expires_at)
