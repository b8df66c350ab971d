"""python-pkcs11 key store: one logged-in session per token behind the process's one PKCS#11 thread.

Pkcs11KeyStore is the KeyStore the appliance uses. It checks what callers ask, then runs the work
on the PKCS#11 thread (hsm.pkcs11_thread: why there is only one) against the token's keys
(hsm.token_keys). Login belongs to the whole process (hsm.pkcs11_session), so a store logs in once
when opened and keeps that session until closed; a second store for the same token in the same
process is refused with TokenAlreadyOpen.

The caller sets SOFTHSM2_CONF (for SoftHSM2) before the module is first loaded; see hsm.softhsm.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import os
import secrets
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, TypeVar

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pkcs11.mechanisms import Mechanism
from pkcs11.types import PrivateKey, Session

from hsm.errors import HsmError, KeyNotFound, TokenUnavailable, UnsupportedKey, token_loss_reason
from hsm.key_attributes import KeyInspection
from hsm.key_objects import REQUIRED_MECHANISMS
from hsm.keys import TokenEd25519PrivateKey, TokenEllipticCurvePrivateKey, TokenRSAPrivateKey
from hsm.keystore import KeyRef, KeySpec, KeyStore, PublicKey, TokenPrivateKey
from hsm.pkcs11_session import login, relogin, translated
from hsm.pkcs11_thread import PKCS11_THREAD
from hsm.token_keys import TokenKeys
from hsm.uri import InvalidPkcs11Uri, Pkcs11Uri

__all__ = ["KeyInspection", "Pkcs11KeyStore"]

T = TypeVar("T")

_DEFAULT_KEY_ID_BYTES: Final = 8

# Told (reason for an operator, detail for the log) when a signature finds the token gone; it is
# called on the PKCS#11 thread, so it must only hand the news to its own thread or loop.
LossListener = Callable[[str, str], None]


class Pkcs11KeyStore:
    """CA keys in one PKCS#11 token, reached through the process's PKCS#11 thread.

    Open with Pkcs11KeyStore.open(); close (or use as a context manager) to log out.
    """

    token_label: str
    module_path: str

    def __init__(
        self,
        *,
        module_path: str,
        token_label: str,
        session: Session,
        mechanisms: frozenset[Mechanism],
        executor: concurrent.futures.ThreadPoolExecutor,
    ) -> None:
        """Use Pkcs11KeyStore.open(); this constructor only assembles an already logged-in store."""
        self.module_path = module_path
        self.token_label = token_label
        self._mechanisms = mechanisms
        self._executor = executor
        self._closed = False
        self._keys = TokenKeys(module_path, token_label, session)  # PKCS#11 thread only
        # Token health: the operator's reason while the token is lost (signing then fails fast
        # with TokenUnavailable until `reestablish`), and who is told when it goes.
        self._lost: str | None = None
        self._loss_listener: LossListener | None = None
        # The keys handed out and their public halves: found again and compared after a new
        # login (kept here, as the TokenKeys of a dead session may be gone by then).
        self._keys_in_use: dict[KeyRef, PublicKey] = {}

    # -- life cycle -------------------------------------------------------------------------

    @classmethod
    def open(cls, module_path: str, token_label: str, pin: str) -> Pkcs11KeyStore:
        """Load the module, find the token and log in once, all on the PKCS#11 thread."""
        executor = PKCS11_THREAD.acquire(module_path, token_label)
        try:
            if PKCS11_THREAD.on_thread():
                session, mechanisms = login(module_path, token_label, pin)
            else:
                session, mechanisms = executor.submit(login, module_path, token_label, pin).result()
        except BaseException:
            PKCS11_THREAD.release(module_path, token_label)
            raise
        return cls(
            module_path=module_path,
            token_label=token_label,
            session=session,
            mechanisms=mechanisms,
            executor=executor,
        )

    @property
    def executor(self) -> concurrent.futures.ThreadPoolExecutor:
        """The single-thread executor every PKCS#11 call of this process runs on."""
        return self._executor

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def holds_gil_while_signing(self) -> bool:
        """True for an in-process software token (SoftHSM2): see hsm.inprocess_sign."""
        return self._keys.holds_gil_while_signing

    def close(self) -> None:
        """Log out, close the session and stop the PKCS#11 thread if no other store uses it."""
        if self._closed:
            return
        try:
            self.run(self._keys.close)
        finally:
            self._closed = True
            PKCS11_THREAD.release(self.module_path, self.token_label)

    def __enter__(self) -> Pkcs11KeyStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<Pkcs11KeyStore token={self.token_label!r} module={self.module_path!r} {state}>"

    # -- the PKCS#11 thread ---------------------------------------------------------------------

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(*args) on the PKCS#11 thread and return its result.

        Called on that thread already (cryptography's builder.sign calls the key's sign() on
        the thread that called builder.sign), it calls fn directly instead of deadlocking.
        """
        if self._closed:
            raise HsmError(f"the key store for token {self.token_label!r} is closed")
        if PKCS11_THREAD.on_thread():
            return fn(*args)
        return self._executor.submit(fn, *args).result()

    async def run_async(self, fn: Callable[..., T], *args: Any) -> T:
        """Await fn(*args) run on the PKCS#11 thread, keeping the event loop free."""
        if self._closed:
            raise HsmError(f"the key store for token {self.token_label!r} is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args))

    # -- keys -----------------------------------------------------------------------------------

    def supports(self, spec: KeySpec) -> bool:
        """True when the token offers the mechanisms to generate and sign with `spec` keys."""
        return all(m in self._mechanisms for m in REQUIRED_MECHANISMS[spec.kty])

    def generate(self, spec: KeySpec, label: str, key_id: bytes | None = None) -> KeyRef:
        """Generate a key pair in the token: private key sensitive, never extractable, sign only.

        The public key is stored on the token too, with the same label and id. key_id defaults
        to 8 random bytes. Raises KeyExists when the label or id is taken, UnsupportedKey when
        the token cannot make such keys.
        """
        if not isinstance(label, str) or not label:
            raise ValueError("a key label must be a non-empty string")
        if key_id is None:
            key_id = secrets.token_bytes(_DEFAULT_KEY_ID_BYTES)
        if not key_id:
            raise ValueError("a key id must not be empty")
        if not self.supports(spec):
            generation, signing = REQUIRED_MECHANISMS[spec.kty]
            raise UnsupportedKey(
                f"token {self.token_label!r} cannot hold {spec.description} keys: it does not "
                f"offer CKM_{generation.name} and CKM_{signing.name}"
            )
        return self.run(self._keys.generate, spec, label, bytes(key_id))

    def find(self, label: str | None = None, key_id: bytes | None = None) -> KeyRef:
        """The key pair whose private key has this label and/or id; KeyNotFound when missing."""
        if label is None and key_id is None:
            raise ValueError("name the key by label, id or both")
        return self.run(self._keys.find, label, key_id)

    def find_uri(self, uri: str | Pkcs11Uri) -> KeyRef:
        """The key an RFC 7512 URI names (token must be this store's; object and/or id given)."""
        parsed = Pkcs11Uri.parse(uri) if isinstance(uri, str) else uri
        if parsed.token is not None and parsed.token != self.token_label:
            raise KeyNotFound(
                f"the URI names token {parsed.token!r} but this key store is token "
                f"{self.token_label!r}"
            )
        if parsed.module_path is not None and os.path.realpath(
            parsed.module_path
        ) != os.path.realpath(self.module_path):
            raise KeyNotFound(
                f"the URI names module {parsed.module_path} but this key store uses "
                f"{self.module_path}"
            )
        if parsed.type not in (None, "private", "public"):
            raise InvalidPkcs11Uri(f"the URI names a {parsed.type} object, not a key pair")
        if parsed.object is None and parsed.id is None:
            raise InvalidPkcs11Uri("the URI must name the key by object (label), id or both")
        return self.find(parsed.object, parsed.id)

    def list_keys(self) -> list[KeyRef]:
        """Every private key on the token, as KeyRefs."""
        return self.run(self._keys.list)

    def public_key(self, ref: KeyRef) -> PublicKey:
        """The key's public half as a cryptography object (read once, then cached)."""
        self._check_ref(ref)
        return self.run(self._keys.public_key, ref)

    def private_key(self, ref: KeyRef) -> TokenPrivateKey:
        """A cryptography private-key object whose sign() runs in the token."""
        self._check_ref(ref)
        public = self.public_key(ref)
        self.run(self._keys.private_handle, ref)  # fail now, not at the first signature
        self._keys_in_use[ref] = public
        if isinstance(public, ec.EllipticCurvePublicKey):
            return TokenEllipticCurvePrivateKey(self, ref, public)
        if isinstance(public, rsa.RSAPublicKey):
            return TokenRSAPrivateKey(self, ref, public)
        return TokenEd25519PrivateKey(self, ref, public)

    def check_protected(self, ref: KeyRef) -> None:
        """Raise KeyNotProtected unless the private key is sensitive and never extractable.

        The attributes checked are the rows of hsm.key_attributes with a serving refusal.
        """
        self._check_ref(ref)
        self.run(self._keys.check_protected, ref)

    def inspect(self, ref: KeyRef) -> KeyInspection:
        """What the token says of the private key, for an operator to see (`applianctl kms
        check`): every attribute of hsm.key_attributes as the token reports it, and whether the
        token refuses to hand out the key's secret value when asked."""
        self._check_ref(ref)
        return self.run(self._keys.inspect, ref)

    def destroy(self, ref: KeyRef) -> None:
        """Delete the key pair (private and public objects) from the token."""
        self._check_ref(ref)
        self.run(self._keys.destroy, ref)

    # -- signing --------------------------------------------------------------------------------

    def sign_raw(
        self,
        ref_or_handle: KeyRef | PrivateKey,
        mechanism: Mechanism,
        data: bytes,
        mechanism_param: Any = None,
    ) -> bytes:
        """C_Sign `data` with `mechanism` in the token, on the PKCS#11 thread (internal)."""
        if isinstance(ref_or_handle, KeyRef):
            self._check_ref(ref_or_handle)
        if self._lost is not None:
            raise TokenUnavailable(f"token {self.token_label!r} is unavailable ({self._lost}); "
                                   "it is being re-established")
        try:
            return self.run(self._keys.sign, ref_or_handle, mechanism, data, mechanism_param)
        except HsmError as e:
            self._note_loss(e)
            raise

    # -- token health ---------------------------------------------------------------------------

    @property
    def lost_reason(self) -> str | None:
        """Why the token is unavailable (an operator's phrase), or None while it signs."""
        return self._lost

    def on_loss(self, listener: LossListener | None) -> None:
        """Call LISTENER(reason, detail) when a signature finds the token gone (once per loss)."""
        self._loss_listener = listener

    def _note_loss(self, error: HsmError) -> None:
        reason = token_loss_reason(error)
        if reason is None or self._lost is not None:
            return
        self._lost = reason
        if self._loss_listener is not None:
            self._loss_listener(reason, str(error)[:300])

    async def reestablish(self, pin: str) -> None:
        """After a loss: initialise the module again, log in, find the same keys (HsmError).

        Runs on the PKCS#11 thread, after whatever was queued there. Refuses a token whose key
        under the same label and id is another key than the one the store was opened with.
        """
        try:
            await self.run_async(self._reestablish_on_thread, pin)
        except HsmError as e:
            self._lost = token_loss_reason(e) or self._lost or "the token failed"
            raise
        self._lost = None

    def _reestablish_on_thread(self, pin: str) -> None:
        self._keys.close()  # its session died with the token; closing it cannot fail
        session, mechanisms = relogin(self.module_path, self.token_label, pin)
        keys = TokenKeys(self.module_path, self.token_label, session)
        try:
            with translated(self.token_label):
                for ref, public in self._keys_in_use.items():
                    keys.private_handle(ref)
                    if not _same_public_key(public, keys.public_key(ref)):
                        raise KeyNotFound(
                            f"the key {ref.label!r} on token {self.token_label!r} is not the "
                            "key the CA was started with")
        except BaseException:
            keys.close()
            raise
        self._mechanisms = mechanisms
        self._keys = keys

    def _check_ref(self, ref: KeyRef) -> None:
        if ref.token_label != self.token_label:
            raise KeyNotFound(
                f"key {ref.label!r} is on token {ref.token_label!r}, not on {self.token_label!r}"
            )


def _same_public_key(a: PublicKey, b: PublicKey) -> bool:
    der, spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return a.public_bytes(der, spki) == b.public_bytes(der, spki)


if TYPE_CHECKING:
    # Pkcs11KeyStore is the KeyStore the rest of the appliance is typed against.
    def _is_a_key_store(store: Pkcs11KeyStore) -> KeyStore:
        return store
