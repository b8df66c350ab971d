"""The ACME provisioner: RFC 8555 clients prove control of names through challenges.

The HTTP protocol and its state machine live in appliance/acme/; this is what the authority
decides about an order: which identifiers may be ordered, and what a finalize CSR may get.
"""

from __future__ import annotations

import ipaddress
from datetime import datetime

from cryptography import x509
from cryptography.x509.oid import NameOID

from appliance.authority.claims import Claims
from appliance.authority.csr import check_csr
from appliance.authority.plan import RequestedValidity, SignPlan
from appliance.authority.provisioners.base import Provisioner
from appliance.config import AcmeProvisionerConfig
from appliance.errors import ApplianceError, BadCsr
from appliance.issuance.names import canonical_san, san_to_text, sans_of
from appliance.issuance.templates import X509Template


class AcmeProvisioner(Provisioner):
    type = "ACME"
    config: AcmeProvisionerConfig

    def __init__(self, config: AcmeProvisionerConfig, claims: Claims,
                 template: X509Template | None = None) -> None:
        super().__init__(config, claims, template)
        self.challenges = tuple(config.challenges)
        self.require_eab = config.require_eab
        self.force_cn = config.force_cn
        self.terms_of_service = config.terms_of_service

    def authorize_finalize(self, identifiers: tuple[x509.GeneralName, ...],
                           csr: x509.CertificateSigningRequest, *,
                           not_before: datetime | None, not_after: datetime | None,
                           account_id: str) -> SignPlan:
        """A ready order's identifiers, proven by challenges, and the CSR that finalizes it.

        The CSR must name exactly the order's identifiers; its common name, if any, must be one
        of them (an IP address common name matches an ip identifier). BadCsr says what differs.
        """
        try:
            check_csr(csr)
        except ApplianceError as e:
            raise BadCsr(e.message) from None
        want = {canonical_san(n) for n in identifiers}
        got = {canonical_san(n) for n in sans_of(csr)}
        cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        cn = str(cns[0].value) if cns else None
        if cn is not None:
            cn_name = _common_name_as_identifier(cn)
            if canonical_san(cn_name) not in want:
                raise BadCsr(f"the CSR common name {cn!r} is not an identifier of the order")
            got.add(canonical_san(cn_name))
        if got != want:
            extra = sorted(got - want)
            missing = sorted(want - got)
            raise BadCsr(
                "the CSR names do not match the order"
                + (f"; not in the order: {', '.join(x.split(':', 1)[1] for x in extra)}"
                   if extra else "")
                + (f"; missing: {', '.join(x.split(':', 1)[1] for x in missing)}"
                   if missing else ""))
        if cn is None and self.force_cn:
            cn = san_to_text(identifiers[0])
        return SignPlan(
            provisioner=self, public_key=csr.public_key(), subject=cn, sans=identifiers,
            csr=csr, trusted_data={"acme_account": account_id},
            validity=RequestedValidity(not_before, not_after))


def _common_name_as_identifier(cn: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(cn))
    except ValueError:
        return x509.DNSName(cn.lower())
