"""The one door to the signer: reserve the serial and record the intent, sign in the token, record.

Boulder's rule: the serial and what is to be signed are durable before the HSM signs, so a crash
never leaves a signed certificate the database does not know; the certificate is durable before
the requester sees it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import Any, TypeVar

import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    CertificatePublicKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID

from appliance.audit import AuditError, AuditEvent, AuditSink, Signer, sign_message
from appliance.errors import ApplianceError, Unauthorized, Unavailable
from appliance.issuance.names import san_to_text
from appliance.storage import CertificateIntent, Store, TokenReused, TokenUse

T = TypeVar("T")
MAX_BATCH = 64  # requests one cycle takes from the queue
# Retry-After of a request refused because the token is unavailable: the server tries to
# re-establish a lost token at least this often (appliance/server/token_health.py).
TOKEN_RETRY_AFTER_SECONDS = 5
log = structlog.get_logger("appliance.issuance")

# The extensions `_build` sets itself; a request's extra extensions may not repeat them.
ISSUER_SET_EXTENSIONS = frozenset({
    ExtensionOID.KEY_USAGE, ExtensionOID.EXTENDED_KEY_USAGE, ExtensionOID.BASIC_CONSTRAINTS,
    ExtensionOID.SUBJECT_KEY_IDENTIFIER, ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
    ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
})

# Runs a blocking callable on the thread that owns the token session.
SigningRunner = Callable[[Callable[[], Any]], Awaitable[Any]]


class CertificateNotBuilt(ApplianceError):
    """cryptography refused the certificate's content (a bug above: the pipeline checks it)."""


@dataclass(frozen=True)
class IssuanceRequest:
    """A fully authorised description of a leaf certificate."""

    subject: x509.Name
    sans: tuple[x509.GeneralName, ...]
    public_key: CertificatePublicKeyTypes
    not_before: datetime
    not_after: datetime
    provisioner: str
    token_use: TokenUse | None = None
    key_usage: x509.KeyUsage | None = None  # None: digitalSignature (+ keyEncipherment for RSA)
    audit_event: str = "cert.issue"  # cert.renew, cert.rekey
    ext_key_usage: tuple[x509.ObjectIdentifier, ...] = (
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    )
    extra_extensions: tuple[x509.Extension[x509.ExtensionType], ...] = field(default=())


@dataclass(frozen=True)
class IssuedCertificate:
    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...]
    chain_pem: tuple[str, ...] = ()  # the chain's PEM, encoded once per issuer, not per request

    def pem_chain(self) -> list[str]:
        chain = list(self.chain_pem) or [c.public_bytes(serialization.Encoding.PEM).decode()
                                         for c in self.chain]
        return [self.certificate.public_bytes(serialization.Encoding.PEM).decode(), *chain]


def signature_hash(key: CertificateIssuerPrivateKeyTypes) -> hashes.HashAlgorithm | None:
    """The hash an issuer key signs with: SHA-384 for P-384, none for EdDSA, SHA-256 otherwise."""
    if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        return None
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size >= 384:
        return hashes.SHA384()
    return hashes.SHA256()


def token_unavailable(reason: str) -> Unavailable:
    """The refusal while the token is lost: the reason is an operator's phrase, no code."""
    return Unavailable(f"the token is unavailable ({reason}); issuance resumes when it is back",
                       retry_after=TOKEN_RETRY_AFTER_SECONDS)


def leaf_key_usage(public_key: CertificatePublicKeyTypes) -> x509.KeyUsage:
    rsa_key = isinstance(public_key, rsa.RSAPublicKey)
    return x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=rsa_key,
        data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
        encipher_only=False, decipher_only=False)


class _Job:
    """One request's way through a batch: its serial, intent and the future its caller awaits."""

    __slots__ = ("request", "serial", "intent", "future", "issuer", "certificate")

    def __init__(self, request: IssuanceRequest, serial: int,
                 future: asyncio.Future[IssuedCertificate], issuer: Issuer) -> None:
        self.request = request
        self.serial = serial
        self.future = future
        self.issuer = issuer
        self.certificate: x509.Certificate | None = None
        self.intent = CertificateIntent(
            serial=serial,
            subject=request.subject.rfc4514_string(),
            sans=tuple(san_to_text(n) for n in request.sans),
            not_before=request.not_before,
            not_after=request.not_after,
            provisioner=request.provisioner,
            token_use=request.token_use,
        )

    def audit_event(self, outcome: str, reason: str | None = None) -> AuditEvent:
        intent = self.intent
        details: dict[str, Any] = {
            "serial": format(self.serial, "x"), "subject": intent.subject,
            "names": list(intent.sans), "not_before": intent.not_before.isoformat(),
            "not_after": intent.not_after.isoformat()}
        if reason is not None:
            details["reason"] = reason
        return AuditEvent(self.request.audit_event, outcome,
                          f"provisioner:{self.request.provisioner}", details)

    def succeed(self) -> None:
        if not self.future.done() and self.certificate is not None:
            self.future.set_result(self.issuer.issued(self.certificate))

    def fail(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)


class Issuer:
    """Issues leaves under one intermediate whose key lives in the token."""

    def __init__(
        self,
        certificate: x509.Certificate,
        chain: tuple[x509.Certificate, ...],
        signing_key: CertificateIssuerPrivateKeyTypes,
        run_signing: SigningRunner,
        store: Store,
        audit: AuditSink | None = None,
        token_lost: Callable[[], str | None] | None = None,
    ) -> None:
        self.audit = audit
        # Why the token cannot sign now (None: it can): requests are then refused before a
        # serial is reserved or an audit record written, instead of failing at the signature.
        self._token_lost = token_lost
        self.certificate = certificate
        self.chain = chain  # intermediate(s) up to, not including, the root
        self._chain_pem = tuple(c.public_bytes(serialization.Encoding.PEM).decode()
                                for c in chain)
        self._key = signing_key
        self._hash = signature_hash(signing_key)
        self._run_signing = run_signing
        self._store = store
        self._aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(
            certificate.public_key())  # type: ignore[arg-type]
        self._pending: list[_Job] = []
        self._drainer: asyncio.Task[None] | None = None

    async def issue(self, request: IssuanceRequest) -> IssuedCertificate:
        """Record, sign in the token, record again, return. Raise typed errors only.

        Concurrent requests are issued together (group commit). One task drains the queue in
        cycles; a cycle takes every request waiting and, in one database commit, records the
        certificates the previous cycle signed and the intents of the new ones; then one audit
        write for the new ones, then one trip to the token's thread to sign them. Each request
        still passes every step on its own: its intent and audit record before its signature,
        its certificate recorded before it is returned, its own outcome.
        """
        self._refuse_if_token_lost()
        loop = asyncio.get_running_loop()
        job = _Job(request, x509.random_serial_number(), loop.create_future(), self)
        self._pending.append(job)
        if self._drainer is None:
            self._drainer = loop.create_task(self._drain())
        # Shielded: a client that drops mid-request must not abandon a signature halfway.
        return await asyncio.shield(job.future)

    async def _drain(self) -> None:
        signed: list[tuple[_Job, bytes]] = []  # signed last cycle, recorded in this one
        try:
            while self._pending or signed:
                batch = self._pending[:MAX_BATCH]
                del self._pending[:MAX_BATCH]
                try:
                    signed = await self._cycle(signed, batch)
                except Exception as e:  # noqa: BLE001 - every waiter must hear, or it hangs
                    log.error("issuance_batch_failed", error=type(e).__name__)
                    error = e if isinstance(e, ApplianceError) else Unavailable(
                        "issuance failed; try again")
                    for job in (*(j for j, _ in signed), *batch):
                        job.fail(error)
                    signed = []
        finally:
            self._drainer = None

    async def _cycle(self, signed: list[tuple[_Job, bytes]], batch: list[_Job]
                     ) -> list[tuple[_Job, bytes]]:
        """Record `signed`, reserve, audit and sign `batch`; return what is now signed."""
        recorded, outcomes = await self._store.record_and_reserve(
            [(job.serial, der) for job, der in signed], [job.intent for job in batch])
        for (job, _), not_recorded in zip(signed, recorded, strict=True):
            if not_recorded is None:
                job.succeed()
            else:
                job.fail(not_recorded)
        reserved: list[_Job] = []
        for job, refused in zip(batch, outcomes, strict=True):
            if refused is None:
                reserved.append(job)
            elif isinstance(refused, TokenReused):
                job.fail(Unauthorized("token already used: one-time tokens cannot be replayed"))
            else:
                job.fail(refused)
        if not reserved:
            return []
        try:
            # The audit record comes before the signature: no certificate exists unrecorded.
            await self.record_many([job.audit_event("success") for job in reserved])
        except Unavailable as e:
            await self._store.record_failures([job.serial for job in reserved])
            for job in reserved:
                job.fail(e)
            return []
        try:
            built = await self._run_signing(partial(self._build_many, reserved))
        except Exception as e:  # noqa: BLE001 - the token thread itself failed: none signed
            built = [e] * len(reserved)
        now_signed: list[tuple[_Job, bytes]] = []
        unsigned: list[_Job] = []
        unbuilt: list[tuple[_Job, CertificateNotBuilt]] = []
        for job, outcome in zip(reserved, built, strict=True):
            if isinstance(outcome, x509.Certificate):
                job.certificate = outcome
                now_signed.append((job, outcome.public_bytes(serialization.Encoding.DER)))
            elif isinstance(outcome, CertificateNotBuilt):
                log.error("certificate_not_built", serial=format(job.serial, "x"),
                          reason=outcome.message)
                unbuilt.append((job, outcome))
            else:
                log.error("token_sign_failed", serial=format(job.serial, "x"),
                          error=type(outcome).__name__)
                unsigned.append(job)
        if unsigned:
            await self._store.record_failures([job.serial for job in unsigned])
            with contextlib.suppress(Unavailable):
                await self.record_many([job.audit_event("failure", "the token did not sign")
                                        for job in unsigned])
            lost = self._token_lost() if self._token_lost is not None else None
            error = (token_unavailable(lost) if lost is not None else Unavailable(
                "the token could not sign the certificate; try again",
                retry_after=TOKEN_RETRY_AFTER_SECONDS))
            for job in unsigned:
                job.fail(error)
        if unbuilt:
            await self._store.record_failures([job.serial for job, _ in unbuilt])
            with contextlib.suppress(Unavailable):
                await self.record_many([job.audit_event("failure", refusal.message)
                                        for job, refusal in unbuilt])
            for job, refusal in unbuilt:
                job.fail(refusal)
        return now_signed

    def _build_many(self, jobs: list[_Job]) -> list[x509.Certificate | Exception]:
        """Build and token-sign each job's certificate (on the token's thread); one outcome each."""
        out: list[x509.Certificate | Exception] = []
        for job in jobs:
            try:
                out.append(self._build(job.request, job.serial))
            except Exception as e:  # noqa: BLE001 - reported per certificate by the caller
                out.append(e)
        return out

    async def record_many(self, events: list[AuditEvent]) -> None:
        """Write audit records in one write; fail closed like `record`."""
        if self.audit is None:
            return
        try:
            await self.audit.append_many(events)
        except AuditError:
            log.error("audit_write_failed", audit_event=events[0].event)
            raise Unavailable("the audit log cannot be written: issuance is stopped until it "
                              "can be") from None

    def issued(self, certificate: x509.Certificate) -> IssuedCertificate:
        return IssuedCertificate(certificate, self.chain, self._chain_pem)

    async def record(self, event: AuditEvent) -> None:
        """Write an audit record; fail closed: no record, no certificate (or CRL, revocation)."""
        if self.audit is None:
            return
        try:
            await self.audit.append(event)
        except AuditError:
            log.error("audit_write_failed", audit_event=event.event)
            raise Unavailable("the audit log cannot be written: issuance is stopped until it "
                              "can be") from None

    def audit_signer(self) -> Signer:
        """Checkpoint signatures by the issuer key, on the token's thread."""
        async def sign(message: bytes) -> bytes:
            signature: bytes = await self._run_signing(partial(sign_message, self._key, message))
            return signature
        return sign

    async def sign_crl(self, entries: list[x509.RevokedCertificate], number: int,
                       this_update: datetime, next_update: datetime
                       ) -> x509.CertificateRevocationList:
        """Sign a CRL with the issuer key in the token (on the token's thread)."""
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.certificate.subject)
            .last_update(this_update)
            .next_update(next_update)
            .add_extension(x509.CRLNumber(number), critical=False)
            .add_extension(self._aki, critical=False)
        )
        for entry in entries:
            builder = builder.add_revoked_certificate(entry)
        self._refuse_if_token_lost()
        try:
            crl: x509.CertificateRevocationList = await asyncio.shield(self._run_signing(
                partial(builder.sign, self._key, self._hash)))  # type: ignore[arg-type]
        except Exception:
            self._refuse_if_token_lost()  # the signature just found the token gone: say so
            raise
        return crl

    def _refuse_if_token_lost(self) -> None:
        lost = self._token_lost() if self._token_lost is not None else None
        if lost is not None:
            raise token_unavailable(lost) from None

    def _build(self, request: IssuanceRequest, serial: int) -> x509.Certificate:
        try:
            builder = self._builder(request, serial)
        except (ValueError, TypeError) as e:  # cryptography's refusal, before any signature
            raise CertificateNotBuilt(f"the certificate could not be built: {e}") from None
        return builder.sign(self._key, self._hash)  # type: ignore[arg-type]

    def _builder(self, request: IssuanceRequest, serial: int) -> x509.CertificateBuilder:
        san_critical = len(request.subject) == 0
        builder = (
            x509.CertificateBuilder()
            .subject_name(request.subject)
            .issuer_name(self.certificate.subject)
            .public_key(request.public_key)
            .serial_number(serial)
            .not_valid_before(request.not_before)
            .not_valid_after(request.not_after)
            .add_extension(request.key_usage or leaf_key_usage(request.public_key),
                           critical=True)
            .add_extension(x509.ExtendedKeyUsage(list(request.ext_key_usage)), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(request.public_key),
                           critical=False)
            .add_extension(self._aki, critical=False)
        )
        if request.sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(list(request.sans)),
                                            critical=san_critical)
        for ext in request.extra_extensions:
            builder = builder.add_extension(ext.value, critical=ext.critical)
        return builder
