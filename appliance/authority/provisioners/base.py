"""What every provisioner has: a name, claims, a name policy, and an optional template."""

from __future__ import annotations

from typing import Any

from appliance.authority.claims import Claims
from appliance.authority.policy import X509NamePolicy
from appliance.config import AcmeProvisionerConfig, JwkProvisionerConfig
from appliance.issuance.templates import X509Template


class Provisioner:
    type = ""

    def __init__(self, config: JwkProvisionerConfig | AcmeProvisionerConfig, claims: Claims,
                 template: X509Template | None = None) -> None:
        self.config = config
        self.name = config.name
        self.claims = claims
        self.template = template  # None: the built-in leaf description (fast path)
        self.policy = X509NamePolicy.of(config.policy)
        x509_options = config.options.x509 if config.options else None
        self.template_data: dict[str, Any] = (
            dict(x509_options.template_data or {}) if x509_options else {})

    @property
    def credential_id(self) -> str:
        """Recorded in step-ca's provisioner extension of every certificate it authorises."""
        return self.name

    def public_json(self) -> dict[str, Any]:
        return self.config.model_dump(by_alias=True, exclude_none=True)
