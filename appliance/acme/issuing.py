"""What ACME asks of the authority, as one small interface: `AcmeIssuing`.

`AuthorityIssuing` answers it with the authority: the provisioner's order and finalize
decisions, then `Authority.issue(plan)`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Protocol

from cryptography import x509

from appliance.acme.problems import AcmeProblem
from appliance.authority.authority import Authority
from appliance.authority.lifecycle import RevokeRequest
from appliance.authority.plan import OrderGrant, SignPlan
from appliance.authority.provisioners.acme import AcmeProvisioner
from appliance.errors import ApplianceError, PolicyViolation
from appliance.storage import CertificateRecord


class AcmeIssuing(Protocol):
    """The authority's part in ACME: order and finalize decisions, issuance, revocation."""

    @property
    def chain(self) -> tuple[x509.Certificate, ...]:
        """The issuer's chain a certificate download carries after the certificate."""

    def provisioner_named(self, name: str) -> AcmeProvisioner | None: ...

    def authorize_order(self, provisioner: AcmeProvisioner, names: tuple[x509.GeneralName, ...],
                        untrusted_not_before: str | None, untrusted_not_after: str | None
                        ) -> OrderGrant:
        """Name policy (rejectedIdentifier) and the requested validity (malformed)."""

    def authorize_finalize(self, provisioner: AcmeProvisioner,
                           names: tuple[x509.GeneralName, ...],
                           csr: x509.CertificateSigningRequest, *, not_before: datetime | None,
                           not_after: datetime | None, account_id: str) -> SignPlan:
        """The CSR must be sound and name the order's identifiers (badCSR otherwise)."""

    async def issue(self, plan: SignPlan) -> x509.Certificate:
        """Issue (and record) the certificate of the plan."""

    async def recorded(self, cert: x509.Certificate) -> CertificateRecord:
        """The record of a certificate this CA issued (Unauthorized if not ours)."""

    async def certificate(self, serial: int) -> CertificateRecord | None: ...

    async def is_revoked(self, serial: int) -> bool: ...

    async def revoke(self, cert: x509.Certificate, reason_code: int) -> None:
        """Revoke (AlreadyRevoked when it was)."""


class AuthorityIssuing:
    """`AcmeIssuing` by the authority."""

    def __init__(self, authority: Authority) -> None:
        self._authority = authority

    @property
    def chain(self) -> tuple[x509.Certificate, ...]:
        return self._authority.issuer.chain

    def provisioner_named(self, name: str) -> AcmeProvisioner | None:
        provisioner = self._authority.provisioner_named(name)
        return provisioner if isinstance(provisioner, AcmeProvisioner) else None

    def authorize_order(self, provisioner: AcmeProvisioner, names: tuple[x509.GeneralName, ...],
                        untrusted_not_before: str | None, untrusted_not_after: str | None
                        ) -> OrderGrant:
        try:
            return self._authority.authorize_order(provisioner, names, untrusted_not_before,
                                                   untrusted_not_after)
        except PolicyViolation as e:
            raise AcmeProblem.rejected_identifier(e.message) from None

    def authorize_finalize(self, provisioner: AcmeProvisioner,
                           names: tuple[x509.GeneralName, ...],
                           csr: x509.CertificateSigningRequest, *, not_before: datetime | None,
                           not_after: datetime | None, account_id: str) -> SignPlan:
        try:
            return provisioner.authorize_finalize(names, csr, not_before=not_before,
                                                  not_after=not_after, account_id=account_id)
        except ApplianceError as e:
            raise AcmeProblem.bad_csr(e.message) from None

    async def issue(self, plan: SignPlan) -> x509.Certificate:
        return (await self._authority.issue(plan)).certificate

    async def recorded(self, cert: x509.Certificate) -> CertificateRecord:
        return await self._authority.recorded(cert)

    async def certificate(self, serial: int) -> CertificateRecord | None:
        return await self._authority.store.get_certificate(serial)

    async def is_revoked(self, serial: int) -> bool:
        return await self._authority.store.get_revocation(serial) is not None

    async def revoke(self, cert: x509.Certificate, reason_code: int) -> None:
        await self._authority.revoke(
            RevokeRequest(cert.serial_number, None, reason_code, "ACME revokeCert"), cert,
            method="acme")
