"""`AcmeService`: accounts, the order/authorization/challenge state machine, and finalize.

It owns ACME's decisions and their failure semantics; the store records them, the authority
(`AcmeIssuing`) issues, the challenge registry validates. Time comes from the injected clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import structlog
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from appliance.acme import jws, messages
from appliance.acme.challenge_registry import ChallengeRegistry, Validation
from appliance.acme.challenges import ChallengeFailed
from appliance.acme.issuing import AcmeIssuing
from appliance.acme.messages import (
    AccountUpdate,
    CertId,
    Finalize,
    NewAccount,
    NewOrder,
    Urls,
)
from appliance.acme.nonces import NonceIssuer
from appliance.acme.problems import AcmeProblem, from_appliance_error
from appliance.authority.plan import SignPlan
from appliance.authority.provisioners.acme import AcmeProvisioner
from appliance.errors import ApplianceError, RecordConflict
from appliance.jose.base64url import b64url_encode
from appliance.storage.acme_protocol import (
    AccountChange,
    AccountStatus,
    AcmeAccount,
    AcmeAuthz,
    AcmeChallenge,
    AcmeOrder,
    AcmeStore,
    AuthorizationStatus,
    ChallengeStatus,
    JsonObject,
    NonceUse,
    OrderStatus,
    new_id,
)

T = TypeVar("T")

log = structlog.get_logger("appliance.acme")

CHALLENGE_WAIT = 2.0  # seconds a challenge POST waits for its validation before answering
PURGE_INTERVAL = 600.0  # seconds between purges of expired nonces and lapsed orders


def serial_hex(serial: int) -> str:
    """A serial as the certificates table keys it (lowercase hex)."""
    return format(serial, "x")


class PendingNonce:
    """A request's checked nonce, until it is used up: by the write it authorizes (`take`,
    in the same commit) or, if that never comes, before the answer leaves."""

    def __init__(self, use: NonceUse) -> None:
        self._use: NonceUse | None = use

    def take(self) -> NonceUse | None:
        use, self._use = self._use, None
        return use


def _take(nonce: PendingNonce | None) -> NonceUse | None:
    return None if nonce is None else nonce.take()


@dataclass(frozen=True)
class KeyInUse:
    """A key change refused because another account holds the new key."""

    account_id: str


@dataclass(frozen=True)
class RenewalWindow:
    start: datetime
    end: datetime


class AcmeService:
    """RFC 8555's decisions over an `AcmeStore`; one per process, shared by every request."""

    def __init__(self, store: AcmeStore, issuing: AcmeIssuing, challenges: ChallengeRegistry,
                 *, order_lifetime: timedelta, max_concurrent: int, validation_timeout: float,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.issuing = issuing
        self.challenges = challenges
        self.order_lifetime = order_lifetime
        self.validation_timeout = validation_timeout
        self.clock = clock
        self._max_concurrent = max_concurrent
        self._semaphore: asyncio.Semaphore | None = None  # made in the running loop
        self._nonces: NonceIssuer | None = None
        self._tasks: set[asyncio.Task[object]] = set()

    # -- nonces ------------------------------------------------------------------------------
    async def _nonce_issuer(self) -> NonceIssuer:
        if self._nonces is None:
            self._nonces = NonceIssuer(await self.store.secret("acme-nonce-key"), self.clock)
        return self._nonces

    async def new_nonce(self) -> str:
        return (await self._nonce_issuer()).new()

    async def check_nonce(self, untrusted_nonce: str) -> PendingNonce | None:
        """The nonce to use up with the request's change, if it is ours and unexpired."""
        expires = (await self._nonce_issuer()).check(untrusted_nonce)
        return None if expires is None else PendingNonce(NonceUse(untrusted_nonce, expires))

    # -- accounts ----------------------------------------------------------------------------
    async def new_account(self, provisioner: AcmeProvisioner, jwk: JsonObject,
                          request: NewAccount, new_account_url: str
                          ) -> tuple[AcmeAccount, bool]:
        """The account of this key (made now unless it exists); whether it was made now."""
        thumb = jws.thumbprint(jwk)
        existing = await self.store.find_account_by_key(provisioner.name, thumb)
        if existing is not None:
            if existing.status is not AccountStatus.VALID:
                raise AcmeProblem.unauthorized(f"the account for this key is {existing.status}",
                                               status=401)
            return existing, False
        if request.only_return_existing:
            raise AcmeProblem.account_does_not_exist("no account exists for this key")
        contacts = request.contacts()
        if provisioner.terms_of_service and not request.terms_of_service_agreed:
            raise AcmeProblem("userActionRequired", "agree to the terms of service to register")
        eab_kid = None
        if request.untrusted_external_account_binding is not None:
            eab_kid = await self._check_eab(provisioner, request.untrusted_external_account_binding,
                                            jwk, new_account_url)
        elif provisioner.require_eab:
            raise AcmeProblem.external_account_required(
                "this provisioner requires external account binding (--eab with a key id and "
                "HMAC key)")
        now = int(self.clock())
        account = AcmeAccount(new_id(), provisioner.name, thumb, jwk, AccountStatus.VALID,
                              contacts, eab_kid, now)
        try:
            account = await self.store.create_account(account, eab_bound_at=now)
        except RecordConflict as e:
            raise AcmeProblem.unauthorized(e.message) from None
        log.info("acme_account_created", provisioner=provisioner.name, account=account.id)
        return account, True

    async def _check_eab(self, provisioner: AcmeProvisioner, eab: object,
                         outer_jwk: JsonObject, url: str) -> str:
        kid = _eab_kid(eab)
        key = await self.store.get_eab_key(provisioner.name, kid)
        if key is None:
            raise AcmeProblem.unauthorized("unknown external account key id")
        if key.account_id is not None:
            raise AcmeProblem.unauthorized("this external account key is already bound to an "
                                           "account")
        return jws.verify_external_account_binding(
            eab, outer_jwk, url, lambda k: key.hmac_key if k == kid else None)

    async def update_account(self, account: AcmeAccount, update: AccountUpdate
                             ) -> AcmeAccount:
        cascade = (messages.AUTHZ_DEACTIVATED_WITH_ACCOUNT
                   if update.status is AccountStatus.DEACTIVATED else ())
        return await self.store.update_account(
            account.id, AccountChange(contact=update.contact, status=update.status),
            deactivate_authzs_from=cascade)

    async def change_key(self, account: AcmeAccount, new_jwk: JsonObject
                         ) -> AcmeAccount | KeyInUse:
        thumb = jws.thumbprint(new_jwk)
        other = await self.store.find_account_by_key(account.provisioner, thumb)
        if other is not None:
            return KeyInUse(other.id)
        try:
            changed = await self.store.update_account(
                account.id, AccountChange(jwk=new_jwk, thumbprint=thumb))
        except RecordConflict as e:
            raise AcmeProblem.malformed(e.message, status=409) from None
        log.info("acme_key_changed", account=changed.id)
        return changed

    # -- orders ------------------------------------------------------------------------------
    async def new_order(self, provisioner: AcmeProvisioner, account: AcmeAccount,
                        request: NewOrder, nonce: PendingNonce | None) -> AcmeOrder:
        # Refuse names outside policy now, with rejectedIdentifier, rather than at finalize.
        names = messages.identifier_names(request.identifiers)
        grant = self.issuing.authorize_order(provisioner, names, request.untrusted_not_before,
                                             request.untrusted_not_after)
        if request.replaces is not None:
            cert_id = CertId.parse(request.replaces)
            if not await self.store.order_with_certificate(account.id,
                                                           serial_hex(cert_id.serial)):
                raise AcmeProblem.malformed("replaces names a certificate this account did "
                                            "not order", status=409)
        now = int(self.clock())
        expires = now + int(self.order_lifetime.total_seconds())
        order_id = new_id()
        authzs: list[AcmeAuthz] = []
        for identifier in request.identifiers:
            wildcard = messages.is_wildcard(identifier)
            base = (messages.Identifier(identifier.type, identifier.value[2:]) if wildcard
                    else identifier)
            kinds = self.challenges.offered(base, wildcard, provisioner.challenges)
            if not kinds:
                raise AcmeProblem.rejected_identifier(
                    f"no challenge type this provisioner offers can validate "
                    f"{identifier.value!r}")
            authz_id = new_id()
            authzs.append(AcmeAuthz(
                authz_id, order_id, account.id, base, wildcard, AuthorizationStatus.PENDING,
                expires, tuple(AcmeChallenge(new_id(), authz_id, kind,
                                             b64url_encode(secrets.token_bytes(32)),
                                             ChallengeStatus.PENDING, None, None)
                               for kind in kinds)))
        order = AcmeOrder(order_id, provisioner.name, account.id, OrderStatus.PENDING, expires,
                          request.identifiers, _timestamp(grant.not_before),
                          _timestamp(grant.not_after), tuple(a.id for a in authzs), None,
                          None, request.replaces)
        await self.store.create_order(order, authzs, created_at=now, nonce=_take(nonce))
        return order

    async def owned_order(self, provisioner: AcmeProvisioner, found: AcmeOrder | None,
                          account: AcmeAccount) -> AcmeOrder:
        """The order `found` (read with the account), if it is this account's, as it is now."""
        if found is None or found.provisioner != provisioner.name:
            raise AcmeProblem.malformed("no such order", status=404)
        if found.account_id != account.id:
            raise AcmeProblem.unauthorized("the order belongs to another account")
        if messages.order_lapsed(found, self.clock()):
            await self.purge()
            now = await self.store.get_order(found.id)
            assert now is not None
            return now
        return found

    async def purge(self) -> int:
        """Forget expired nonces; lapsed orders become invalid."""
        return await self.store.purge(int(self.clock()), expire=messages.ORDER_EXPIRES_FROM,
                                      expired_error=messages.order_expired_error())

    async def account_owns(self, account: AcmeAccount, serial: int) -> bool:
        return await self.store.order_with_certificate(account.id, serial_hex(serial))

    # -- authorizations and challenges -------------------------------------------------------
    async def deactivate_authz(self, authz: AcmeAuthz, nonce: PendingNonce | None) -> AcmeAuthz:
        await self.store.deactivate_authz(authz.id, from_=messages.AUTHZ_DEACTIVATABLE_FROM,
                                          settle=messages.settle_order, nonce=_take(nonce))
        now = await self.store.get_authz(authz.id)
        assert now is not None
        return now

    async def respond_to_challenge(self, authz: AcmeAuthz, chal: AcmeChallenge,
                                   account: AcmeAccount, nonce: PendingNonce | None
                                   ) -> AcmeChallenge:
        """Start validating a pending challenge (§7.5.1); the challenge as it is after a short
        wait for the outcome (most validations take milliseconds: answering with it saves
        clients a polling round; lego waits 5 s when told "processing" without Retry-After)."""
        if chal.status is not ChallengeStatus.PENDING:
            return chal
        if messages.authz_status_at(authz, self.clock()) is not AuthorizationStatus.PENDING:
            raise AcmeProblem.malformed(f"the authorization is {authz.status}; it cannot be "
                                        "validated")
        finished = None
        if await self.store.transition_challenge(chal.id, from_=ChallengeStatus.PENDING,
                                                 to=ChallengeStatus.PROCESSING,
                                                 nonce=_take(nonce)):
            task = self._spawn(self._validate(authz, chal, account.jwk))
            with contextlib.suppress(TimeoutError):
                finished = await asyncio.wait_for(asyncio.shield(task), CHALLENGE_WAIT)
        current = finished or await self.store.get_challenge(chal.id)
        assert current is not None
        return current

    def _spawn(self, work: Coroutine[object, object, T]) -> asyncio.Task[T]:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._settled)
        return task

    def _settled(self, task: asyncio.Task[object]) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            task.exception()  # seen here: the request that awaited it may be gone

    async def _validate(self, authz: AcmeAuthz, chal: AcmeChallenge, account_jwk: JsonObject
                        ) -> AcmeChallenge:
        """Validate, bounded in time and in how many run at once; record the outcome."""
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(self._max_concurrent)
        validation = Validation(authz.identifier, chal.token,
                                jws.key_authorization(chal.token, account_jwk))
        error: JsonObject | None = None
        async with self._semaphore:
            try:
                await asyncio.wait_for(self.challenges.validate(chal.type, validation),
                                       self.validation_timeout + 5)
            except ChallengeFailed as e:
                error = AcmeProblem(e.problem_type, e.detail).to_json()
            except TimeoutError:
                error = AcmeProblem.connection("validation timed out").to_json()
            except Exception as e:  # noqa: BLE001 - recorded as the challenge's error
                log.exception("acme_validation_error")
                error = AcmeProblem.server_internal(f"validation failed: {type(e).__name__}"
                                                    ).to_json()
        valid = error is None
        if error is not None:
            error = dict(error, identifier=authz.identifier.to_json())
        done = await self.store.finish_challenge(
            chal.id, status=ChallengeStatus.VALID if valid else ChallengeStatus.INVALID,
            validated=int(self.clock()) if valid else None, error=error,
            authz_status=AuthorizationStatus.VALID if valid else AuthorizationStatus.INVALID,
            authz_from=messages.AUTHZ_SETTLED_FROM, settle=messages.settle_order)
        log.info("acme_challenge_done", type=str(chal.type), identifier=authz.identifier.value,
                 valid=valid, error=None if error is None else error.get("detail"))
        return done

    # -- finalize ----------------------------------------------------------------------------
    async def finalize(self, provisioner: AcmeProvisioner, account: AcmeAccount,
                       order: AcmeOrder, request: Finalize, nonce: PendingNonce | None
                       ) -> AcmeOrder:
        """Issue the order's certificate; the order as it is afterwards.

        A refused CSR leaves the order ready, so the client may send a corrected one. Once the
        order is processing, issuing and recording the order's outcome are one unit that the
        request's cancellation (a dropped client, the request time limit) does not interrupt:
        an issued certificate always has its order pointing at it.
        """
        if order.status is not OrderStatus.READY:
            raise AcmeProblem.order_not_ready(f"the order is {order.status}, not ready")
        plan = self.issuing.authorize_finalize(
            provisioner, messages.identifier_names(order.identifiers), request.csr,
            not_before=_datetime(order.not_before), not_after=_datetime(order.not_after),
            account_id=account.id)
        if not await self.store.transition_order(order.id, from_=OrderStatus.READY,
                                                 to=OrderStatus.PROCESSING,
                                                 nonce=_take(nonce)):
            raise AcmeProblem.order_not_ready("the order is already being finalized")
        return await asyncio.shield(self._spawn(self._issue_and_record(account, order, plan)))

    async def _issue_and_record(self, account: AcmeAccount, order: AcmeOrder, plan: SignPlan
                                ) -> AcmeOrder:
        try:
            cert = await self.issuing.issue(plan)
        except Exception as e:
            problem = (e if isinstance(e, AcmeProblem)
                       else from_appliance_error(e) if isinstance(e, ApplianceError)
                       else AcmeProblem.server_internal("issuance failed"))
            if not isinstance(e, ApplianceError | AcmeProblem):
                log.exception("acme_issuance_failed", order=order.id)
            await self.store.finish_finalize(order.id, status=OrderStatus.INVALID,
                                             cert_serial=None, error=problem.to_json())
            raise problem from None
        serial = serial_hex(cert.serial_number)
        finished = await self.store.finish_finalize(order.id, status=OrderStatus.VALID,
                                                    cert_serial=serial, error=None)
        log.info("acme_issued", account=account.id, order=order.id, serial=serial)
        return finished

    # -- certificates ------------------------------------------------------------------------
    async def revoke(self, provisioner: AcmeProvisioner, account: AcmeAccount | None,
                     jwk: JsonObject, cert: x509.Certificate, reason: int) -> None:
        """revokeCert by the ordering account, or signed by the certificate's own key."""
        record = await self.issuing.recorded(cert)
        if account is not None:
            if record.provisioner != provisioner.name or not await self.account_owns(
                    account, cert.serial_number):
                raise AcmeProblem.unauthorized("this account did not order that certificate")
        else:
            cert_key = cert.public_key()
            if not isinstance(cert_key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey
                              | ed25519.Ed25519PublicKey) or jws.thumbprint(jwk) != \
                    jws.thumbprint(jws.public_jwk(cert_key)):
                raise AcmeProblem.unauthorized("the request is not signed by the certificate's "
                                               "key")
        await self.issuing.revoke(cert, reason)

    async def renewal_window(self, cert_id: CertId) -> RenewalWindow:
        """RFC 9773's suggested window: the last third-to-sixth of the lifetime; now if revoked."""
        record = await self.issuing.certificate(cert_id.serial)
        if record is None or record.der is None:
            raise AcmeProblem.malformed("no certificate with that id", status=404)
        cert = x509.load_der_x509_certificate(record.der)
        try:
            aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
            if aki.key_identifier != cert_id.key_identifier:
                raise AcmeProblem.malformed("no certificate with that id", status=404)
        except x509.ExtensionNotFound:
            pass
        start = cert.not_valid_before_utc
        life = cert.not_valid_after_utc - start
        if await self.issuing.is_revoked(cert_id.serial):
            now = datetime.fromtimestamp(self.clock(), UTC)
            return RenewalWindow(now - timedelta(hours=1), now)
        return RenewalWindow(start + life * 2 / 3, start + life * 5 / 6)

    # -- life --------------------------------------------------------------------------------
    async def purge_periodically(self) -> None:
        while True:
            await asyncio.sleep(PURGE_INTERVAL)
            try:
                await self.purge()
            except ApplianceError as e:
                log.warning("acme_purge_failed", reason=e.message[:200])

    async def close(self) -> None:
        """Let running validations and finalizations finish (bounded), then close."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=self.validation_timeout + 5)
        await self.challenges.close()
        await self.store.close()


def _eab_kid(eab: object) -> str:
    if not isinstance(eab, dict) or not isinstance(eab.get("protected"), str):
        raise AcmeProblem.malformed("externalAccountBinding must be a flattened JWS")
    try:
        header = json.loads(messages.decode_b64url(eab["protected"], "externalAccountBinding"))
    except ValueError:
        raise AcmeProblem.malformed("externalAccountBinding header is not JSON") from None
    kid = header.get("kid") if isinstance(header, dict) else None
    if not isinstance(kid, str) or not kid:
        raise AcmeProblem.malformed("externalAccountBinding needs a kid")
    return kid


def _timestamp(value: datetime | None) -> int | None:
    return None if value is None else int(value.timestamp())


def _datetime(ts: int | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC)


__all__ = ["AcmeService", "KeyInUse", "RenewalWindow", "Urls"]
