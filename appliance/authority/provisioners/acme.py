"""The ACME provisioner: RFC 8555 clients prove control of names through challenges."""

from __future__ import annotations

from appliance.authority.claims import Claims
from appliance.authority.provisioners.base import Provisioner
from appliance.config import AcmeProvisionerConfig
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
