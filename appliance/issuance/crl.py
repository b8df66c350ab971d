"""The CRL: built from the unexpired revocations, numbered in the database, signed by the token."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime

import structlog
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from appliance.audit import AuditEvent
from appliance.config import CrlConfig
from appliance.errors import NotFound
from appliance.issuance.issuer import Issuer
from appliance.storage import CrlRecord, RevocationRecord, Store

log = structlog.get_logger("appliance.crl")

REASONS = {
    1: x509.ReasonFlags.key_compromise, 2: x509.ReasonFlags.ca_compromise,
    3: x509.ReasonFlags.affiliation_changed, 4: x509.ReasonFlags.superseded,
    5: x509.ReasonFlags.cessation_of_operation, 6: x509.ReasonFlags.certificate_hold,
    8: x509.ReasonFlags.remove_from_crl, 9: x509.ReasonFlags.privilege_withdrawn,
    10: x509.ReasonFlags.aa_compromise,
}
REASON_NAMES = {
    "unspecified": 0, "keycompromise": 1, "cacompromise": 2, "affiliationchanged": 3,
    "superseded": 4, "cessationofoperation": 5, "certificatehold": 6, "removefromcrl": 8,
    "privilegewithdrawn": 9, "aacompromise": 10,
}


def revoked_entry(r: RevocationRecord) -> x509.RevokedCertificate:
    builder = (x509.RevokedCertificateBuilder().serial_number(r.serial)
               .revocation_date(r.revoked_at))
    if r.reason_code in REASONS:  # RFC 5280: omit the reason rather than say "unspecified"
        builder = builder.add_extension(x509.CRLReason(REASONS[r.reason_code]), critical=False)
    return builder.build()


class CrlService:
    """Serves the newest CRL from the database and makes a new one when it is due."""

    def __init__(self, issuer: Issuer, store: Store, config: CrlConfig,
                 clock: Callable[[], float] = time.time) -> None:
        self.issuer = issuer
        self.store = store
        self.config = config
        self._clock = clock
        self._lock = asyncio.Lock()

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock(), UTC).replace(microsecond=0)

    def _due(self, crl: CrlRecord | None) -> bool:
        if crl is None:
            return True
        return self._now() >= crl.next_update - self.config.regenerate_before_expiry()

    async def current(self) -> CrlRecord:
        """The newest CRL, regenerated first when none exists or it is due."""
        if not self.config.enabled:
            raise NotFound("this CA does not publish a CRL (crl.enabled is false)")
        crl = await self.store.latest_crl()
        if not self._due(crl):
            assert crl is not None
            return crl
        async with self._lock:
            crl = await self.store.latest_crl()  # another request may have made it meanwhile
            if not self._due(crl):
                assert crl is not None
                return crl
            return await self.regenerate()

    async def regenerate(self) -> CrlRecord:
        """Number it durably, sign it in the token, record it."""
        now = self._now()
        next_update = now + self.config.lifetime()
        entries = await self.store.unexpired_revocations(now)
        number = await self.store.reserve_crl_number(now, next_update)
        crl = await self.issuer.sign_crl([revoked_entry(e) for e in entries], number, now,
                                         next_update)
        der = crl.public_bytes(serialization.Encoding.DER)
        await self.store.record_crl(number, der)
        await self.issuer.record(AuditEvent("crl.generate", "success", "ca",
                                            {"number": number, "entries": len(entries),
                                             "next_update": next_update.isoformat()}))
        log.info("crl_generated", number=number, entries=len(entries),
                 next_update=next_update.isoformat())
        return CrlRecord(number, now, next_update, der)
