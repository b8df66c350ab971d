"""python-pkcs11 key store: one logged-in session per token behind the process's one PKCS#11 thread.

Why one thread: python-pkcs11 calls C_Initialize(NULL), which tells the module the application is
single-threaded, so SoftHSM2 (and other modules) take no locks; two threads inside the module at
once crash the process. Every PKCS#11 call in the process therefore runs on one worker thread
shared by all key stores of the process (see _Pkcs11Thread). Parallelism comes from several
processes, each with its own module handle and session.

Why one session per token: login belongs to the whole process (a second login raises
UserAlreadyLoggedIn and closing the logged-in session logs every session out), so a store logs in
once when opened and keeps that session until closed. A second store for the same token in the
same process is refused with TokenAlreadyOpen.

The caller sets SOFTHSM2_CONF (for SoftHSM2) before the module is first loaded; see hsm.softhsm.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import os
import secrets
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, TypeVar, cast

import pkcs11
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from pkcs11 import exceptions as p11
from pkcs11.constants import Attribute, MechanismFlag, ObjectClass
from pkcs11.mechanisms import KeyType as P11KeyType
from pkcs11.mechanisms import Mechanism
from pkcs11.types import Object, PrivateKey, Session, SignMixin

from hsm.errors import (
    DeviceError,
    HsmError,
    KeyAmbiguous,
    KeyExists,
    KeyNotExportable,
    KeyNotFound,
    KeyNotProtected,
    ModuleLoadError,
    PinIncorrect,
    PinLocked,
    TokenAlreadyOpen,
    TokenNotFound,
    UnsupportedKey,
)
from hsm.inprocess_sign import GilHoldingSigner
from hsm.keys import TokenEd25519PrivateKey, TokenEllipticCurvePrivateKey, TokenRSAPrivateKey
from hsm.keystore import KeyRef, KeySpec, KeyStore, PublicKey, TokenPrivateKey
from hsm.uri import InvalidPkcs11Uri, Pkcs11Uri

__all__ = ["Pkcs11KeyStore"]

T = TypeVar("T")

# DER of the ANSI X9.62 / RFC 8410 named-curve parameters (CKA_EC_PARAMS).
_EC_PARAMS: Final[dict[str, bytes]] = {
    "P-256": bytes.fromhex("06082a8648ce3d030107"),  # 1.2.840.10045.3.1.7
    "P-384": bytes.fromhex("06052b81040022"),  # 1.3.132.0.34
    "Ed25519": bytes.fromhex("06032b6570"),  # 1.3.101.112
}
# PKCS#11 3.0 also allows the curve name as a PrintableString for Edwards curves.
_ED25519_PRINTABLE: Final = b"\x13\x0cedwards25519"
_EC_CURVES: Final[dict[bytes, ec.EllipticCurve]] = {
    _EC_PARAMS["P-256"]: ec.SECP256R1(),
    _EC_PARAMS["P-384"]: ec.SECP384R1(),
}

# Mechanisms a token must offer for each key type: (generation, signing).
_REQUIRED_MECHANISMS: Final[dict[str, tuple[Mechanism, Mechanism]]] = {
    "EC": (Mechanism.EC_KEY_PAIR_GEN, Mechanism.ECDSA),
    "RSA": (Mechanism.RSA_PKCS_KEY_PAIR_GEN, Mechanism.RSA_PKCS),
    "OKP": (Mechanism.EC_EDWARDS_KEY_PAIR_GEN, Mechanism.EDDSA),
}

_DEFAULT_KEY_ID_BYTES: Final = 8
# What `inspect` reports of a private key, in this order.
_INSPECTED: Final[tuple[Attribute, ...]] = (
    Attribute.TOKEN, Attribute.PRIVATE, Attribute.SENSITIVE, Attribute.ALWAYS_SENSITIVE,
    Attribute.EXTRACTABLE, Attribute.NEVER_EXTRACTABLE, Attribute.LOCAL, Attribute.SIGN,
    Attribute.DECRYPT, Attribute.UNWRAP, Attribute.DERIVE,
)


@dataclass(frozen=True)
class KeyInspection:
    """A private key as the token describes it (see Pkcs11KeyStore.inspect)."""

    attributes: dict[str, bool | None]  # "CKA_SENSITIVE" -> True; None: not reported
    secret_attribute: str  # CKA_VALUE (EC, EdDSA) or CKA_PRIVATE_EXPONENT (RSA)
    secret_refusal: str  # the token's answer when asked for it; "" if it gave it out

# What check_protected requires of a private key, and what it means when the check fails.
_PROTECTION: Final[tuple[tuple[Attribute, bool, str], ...]] = (
    (Attribute.SENSITIVE, True, "CKA_SENSITIVE is false (the key value can be read)"),
    (Attribute.EXTRACTABLE, False, "CKA_EXTRACTABLE is true (the key can be exported)"),
    (
        Attribute.ALWAYS_SENSITIVE,
        True,
        "CKA_ALWAYS_SENSITIVE is false (the key was once readable)",
    ),
    (
        Attribute.NEVER_EXTRACTABLE,
        True,
        "CKA_NEVER_EXTRACTABLE is false (the key was once exportable)",
    ),
    (Attribute.PRIVATE, True, "CKA_PRIVATE is false (the key is usable without logging in)"),
)


class _Pkcs11Thread:
    """The process's single PKCS#11 worker thread, shared by every open key store.

    This is process-wide state on purpose: the constraint it enforces (one thread inside the
    module) is process-wide. The thread starts with the first open store and stops with the last.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._thread_id: int | None = None
        self._open_tokens: set[tuple[str, str]] = set()

    def _record_thread(self) -> None:
        self._thread_id = threading.get_ident()

    def acquire(self, module_path: str, token_label: str) -> concurrent.futures.ThreadPoolExecutor:
        """Reserve (module, token) for a new store and return the running executor."""
        key = (os.path.realpath(module_path), token_label)
        with self._lock:
            if key in self._open_tokens:
                raise TokenAlreadyOpen(
                    f"token {token_label!r} is already open in this process; "
                    "share the open key store instead of opening it twice"
                )
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix="pkcs11", initializer=self._record_thread
                )
            self._open_tokens.add(key)
            return self._executor

    def release(self, module_path: str, token_label: str) -> None:
        """Give back (module, token); stop the thread when no store is open any more."""
        key = (os.path.realpath(module_path), token_label)
        with self._lock:
            self._open_tokens.discard(key)
            if self._open_tokens or self._executor is None:
                return
            executor, self._executor = self._executor, None
            on_thread = self.on_thread()
            self._thread_id = None
        # Waiting for ourselves would deadlock; the thread then ends after this task returns.
        executor.shutdown(wait=not on_thread)

    def on_thread(self) -> bool:
        return self._thread_id is not None and threading.get_ident() == self._thread_id

    def reset_after_fork(self) -> None:
        # A forked child inherits this object but not the thread: start afresh instead of
        # queueing work that would never run.
        self._lock = threading.Lock()
        self._executor = None
        self._thread_id = None
        self._open_tokens = set()


_PKCS11_THREAD: Final = _Pkcs11Thread()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_PKCS11_THREAD.reset_after_fork)


@contextlib.contextmanager
def _translated(token_label: str) -> Iterator[None]:
    """Turn python-pkcs11 exceptions into the typed, PIN-free errors of hsm.errors."""
    try:
        yield
    except HsmError:
        raise
    except (p11.PinIncorrect, p11.PinLenRange, p11.PinInvalid) as exc:
        raise PinIncorrect(f"the token {token_label!r} refused the PIN") from exc
    except p11.PinExpired as exc:
        raise PinIncorrect(f"the PIN of token {token_label!r} has expired; set a new one") from exc
    except p11.PinLocked as exc:
        raise PinLocked(
            f"the PIN of token {token_label!r} is locked after too many failed logins; "
            "the security officer must unlock it"
        ) from exc
    except p11.UserPinNotInitialized as exc:
        raise PinIncorrect(f"token {token_label!r} has no user PIN set yet") from exc
    except (p11.NoSuchToken, p11.TokenNotPresent, p11.TokenNotRecognised) as exc:
        raise TokenNotFound(f"token {token_label!r} is not present") from exc
    except (p11.UserAlreadyLoggedIn, p11.AnotherUserAlreadyLoggedIn) as exc:
        raise TokenAlreadyOpen(
            f"token {token_label!r} is already logged in from this process"
        ) from exc
    except (p11.NoSuchKey, p11.ObjectHandleInvalid, p11.KeyHandleInvalid) as exc:
        raise KeyNotFound(f"the key is no longer on token {token_label!r}") from exc
    except p11.MultipleObjectsReturned as exc:
        raise KeyAmbiguous(f"more than one key matches on token {token_label!r}") from exc
    except p11.AttributeSensitive as exc:
        raise KeyNotExportable(
            f"the token {token_label!r} refused to reveal a sensitive key attribute"
        ) from exc
    except (
        p11.MechanismInvalid,
        p11.MechanismParamInvalid,
        p11.KeySizeRange,
        p11.DomainParamsInvalid,
        p11.KeyTypeInconsistent,
        p11.FunctionNotSupported,
        p11.TemplateInconsistent,
        p11.AttributeValueInvalid,
    ) as exc:
        raise UnsupportedKey(
            f"token {token_label!r} does not support this key or mechanism ({type(exc).__name__})"
        ) from exc
    except p11.UserNotLoggedIn as exc:
        raise DeviceError(f"the session with token {token_label!r} is no longer logged in") from exc
    except p11.PKCS11Error as exc:
        raise DeviceError(
            f"the token {token_label!r} reported a device error ({type(exc).__name__})"
        ) from exc


def _login(module_path: str, token_label: str, pin: str) -> tuple[Session, frozenset[Mechanism]]:
    """On the PKCS#11 thread: load the module, find the token, open the session and log in."""
    if not os.path.isfile(module_path):
        raise ModuleLoadError(f"the PKCS#11 module {module_path} does not exist")
    try:
        lib = pkcs11.lib(module_path)
    except p11.PKCS11Error as exc:
        reason = str(exc) if "exception while loading" in str(exc) else type(exc).__name__
        raise ModuleLoadError(
            f"could not load or initialise the PKCS#11 module {module_path} ({reason}); "
            "for SoftHSM2, check that SOFTHSM2_CONF names a readable configuration"
        ) from exc
    with _translated(token_label):
        try:
            token = lib.get_token(token_label=token_label)
        except p11.MultipleTokensReturned as exc:
            raise TokenNotFound(
                f"more than one token is labelled {token_label!r}; labels must be unique"
            ) from exc
        mechanisms = frozenset(token.slot.get_mechanisms())
        session = token.open(rw=True, user_pin=pin)
    return session, mechanisms


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
        self._session = session
        self._mechanisms = mechanisms
        self._executor = executor
        self._closed = False
        # Touched only on the PKCS#11 thread.
        self._private_handles: dict[KeyRef, PrivateKey] = {}
        self._public_keys: dict[KeyRef, PublicKey] = {}
        self._session_handle: int = cast(Any, session).handle
        self._gil_signer = GilHoldingSigner.for_module(module_path)

    # -- life cycle -------------------------------------------------------------------------

    @classmethod
    def open(cls, module_path: str, token_label: str, pin: str) -> Pkcs11KeyStore:
        """Load the module, find the token and log in once, all on the PKCS#11 thread."""
        executor = _PKCS11_THREAD.acquire(module_path, token_label)
        try:
            if _PKCS11_THREAD.on_thread():
                session, mechanisms = _login(module_path, token_label, pin)
            else:
                session, mechanisms = executor.submit(
                    _login, module_path, token_label, pin
                ).result()
        except BaseException:
            _PKCS11_THREAD.release(module_path, token_label)
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
        return self._gil_signer is not None

    def close(self) -> None:
        """Log out, close the session and stop the PKCS#11 thread if no other store uses it."""
        if self._closed:
            return
        try:
            self.run(self._close_on_thread)
        finally:
            self._closed = True
            _PKCS11_THREAD.release(self.module_path, self.token_label)

    def _close_on_thread(self) -> None:
        self._private_handles.clear()
        self._public_keys.clear()
        # Closing the process's only session on the token logs the user out.
        with contextlib.suppress(p11.PKCS11Error):
            self._session.close()

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
        if _PKCS11_THREAD.on_thread():
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
        return all(m in self._mechanisms for m in _REQUIRED_MECHANISMS[spec.kty])

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
            generation, signing = _REQUIRED_MECHANISMS[spec.kty]
            raise UnsupportedKey(
                f"token {self.token_label!r} cannot hold {spec.description} keys: it does not "
                f"offer CKM_{generation.name} and CKM_{signing.name}"
            )
        return self.run(self._generate_on_thread, spec, label, bytes(key_id))

    def _generate_on_thread(self, spec: KeySpec, label: str, key_id: bytes) -> KeyRef:
        with _translated(self.token_label):
            for attrs, what in (
                ({Attribute.LABEL: label}, f"labelled {label!r}"),
                ({Attribute.ID: key_id}, f"with id {key_id.hex()}"),
            ):
                for object_class in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY):
                    if self._objects(object_class, attrs):
                        raise KeyExists(
                            f"a key {what} already exists on token {self.token_label!r}"
                        )
            public_template: dict[Attribute, Any] = {
                Attribute.TOKEN: True,
                Attribute.PRIVATE: False,
                Attribute.VERIFY: True,
                Attribute.ENCRYPT: False,
                Attribute.WRAP: False,
            }
            private_template: dict[Attribute, Any] = {
                Attribute.TOKEN: True,
                Attribute.PRIVATE: True,
                Attribute.SENSITIVE: True,
                Attribute.EXTRACTABLE: False,
                Attribute.SIGN: True,
                Attribute.DECRYPT: False,
                Attribute.UNWRAP: False,
                Attribute.DERIVE: False,
            }
            key_length: int | None = None
            if spec.kty == "EC":
                assert spec.curve is not None
                key_type = P11KeyType.EC
                public_template[Attribute.EC_PARAMS] = _EC_PARAMS[spec.curve]
            elif spec.kty == "RSA":
                key_type = P11KeyType.RSA
                key_length = spec.size
            else:
                key_type = P11KeyType.EC_EDWARDS
                public_template[Attribute.EC_PARAMS] = _EC_PARAMS["Ed25519"]
            _, private = self._session.generate_keypair(
                key_type,
                key_length,
                id=key_id,
                label=label,
                store=True,
                capabilities=MechanismFlag.SIGN | MechanismFlag.VERIFY,
                public_template=public_template,
                private_template=private_template,
            )
            ref = KeyRef(token_label=self.token_label, label=label, id=key_id)
            self._private_handles[ref] = private
            try:
                self._check_protected_on_thread(ref)
                self._public_key_on_thread(ref)
            except BaseException:
                # A token that ignored our template must not keep a key we would refuse to use.
                with contextlib.suppress(HsmError, p11.PKCS11Error):
                    self._destroy_on_thread(ref)
                raise
            return ref

    def find(self, label: str | None = None, key_id: bytes | None = None) -> KeyRef:
        """The key pair whose private key has this label and/or id; KeyNotFound when missing."""
        if label is None and key_id is None:
            raise ValueError("name the key by label, id or both")
        return self.run(self._find_on_thread, label, key_id)

    def _find_on_thread(self, label: str | None, key_id: bytes | None) -> KeyRef:
        attrs: dict[Attribute, Any] = {}
        if label is not None:
            attrs[Attribute.LABEL] = label
        if key_id is not None:
            attrs[Attribute.ID] = bytes(key_id)
        with _translated(self.token_label):
            found = self._objects(ObjectClass.PRIVATE_KEY, attrs)
            if not found:
                raise KeyNotFound(
                    f"no private key {_describe(label, key_id)} on token {self.token_label!r}"
                )
            if len(found) > 1:
                raise KeyAmbiguous(
                    f"{len(found)} private keys {_describe(label, key_id)} on token "
                    f"{self.token_label!r}; name the key by label and id"
                )
            private = found[0]
            assert isinstance(private, PrivateKey)
            ref = KeyRef(token_label=self.token_label, label=private.label, id=private.id)
            self._private_handles[ref] = private
            return ref

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
        return self.run(self._list_on_thread)

    def _list_on_thread(self) -> list[KeyRef]:
        with _translated(self.token_label):
            refs = []
            for obj in self._objects(ObjectClass.PRIVATE_KEY, {}):
                assert isinstance(obj, PrivateKey)
                refs.append(KeyRef(token_label=self.token_label, label=obj.label, id=obj.id))
            return refs

    def public_key(self, ref: KeyRef) -> PublicKey:
        """The key's public half as a cryptography object (read once, then cached)."""
        self._check_ref(ref)
        return self.run(self._public_key_on_thread, ref)

    def _public_key_on_thread(self, ref: KeyRef) -> PublicKey:
        cached = self._public_keys.get(ref)
        if cached is not None:
            return cached
        with _translated(self.token_label):
            attrs = {Attribute.LABEL: ref.label, Attribute.ID: ref.id}
            found = self._objects(ObjectClass.PUBLIC_KEY, attrs)
            if len(found) > 1:
                raise KeyAmbiguous(
                    f"{len(found)} public keys labelled {ref.label!r} with id {ref.id.hex()} "
                    f"on token {self.token_label!r}"
                )
            source: Object = found[0] if found else self._private_handle(ref)
            public = _public_key_from_object(source, ref, has_public_object=bool(found))
        self._public_keys[ref] = public
        return public

    def private_key(self, ref: KeyRef) -> TokenPrivateKey:
        """A cryptography private-key object whose sign() runs in the token."""
        self._check_ref(ref)
        public = self.public_key(ref)
        self.run(self._private_handle, ref)  # fail now, not at the first signature
        if isinstance(public, ec.EllipticCurvePublicKey):
            return TokenEllipticCurvePrivateKey(self, ref, public)
        if isinstance(public, rsa.RSAPublicKey):
            return TokenRSAPrivateKey(self, ref, public)
        return TokenEd25519PrivateKey(self, ref, public)

    def check_protected(self, ref: KeyRef) -> None:
        """Raise KeyNotProtected unless the private key is sensitive and never extractable."""
        self._check_ref(ref)
        self.run(self._check_protected_on_thread, ref)

    def _check_protected_on_thread(self, ref: KeyRef) -> None:
        with _translated(self.token_label):
            private = self._private_handle(ref)
            for attribute, wanted, failure in _PROTECTION:
                try:
                    value = private[attribute]
                except p11.AttributeTypeInvalid:
                    value = None
                if value is not wanted:
                    if value is None:
                        failure = f"the token does not report CKA_{attribute.name}"
                    raise KeyNotProtected(
                        f"key {ref.label!r} on token {self.token_label!r} is not protected: "
                        f"{failure}"
                    )

    def inspect(self, ref: KeyRef) -> KeyInspection:
        """What the token says of the private key, for an operator to see (`applianctl kms
        check`): its protection attributes as the token reports them, and whether the token
        refuses to hand out the key's secret value when asked."""
        self._check_ref(ref)
        return self.run(self._inspect_on_thread, ref)

    def _inspect_on_thread(self, ref: KeyRef) -> KeyInspection:
        with _translated(self.token_label):
            private = self._private_handle(ref)
            attributes: dict[str, bool | None] = {}
            for attribute in _INSPECTED:
                try:
                    value = private[attribute]
                except (p11.AttributeTypeInvalid, p11.AttributeSensitive):
                    value = None
                attributes[f"CKA_{attribute.name}"] = value if isinstance(value, bool) else None
            secret = (Attribute.PRIVATE_EXPONENT if private.key_type == P11KeyType.RSA
                      else Attribute.VALUE)
            try:
                private[secret]
            except p11.AttributeSensitive:
                refusal = "CKR_ATTRIBUTE_SENSITIVE"
            except p11.AttributeTypeInvalid:
                refusal = "CKR_ATTRIBUTE_TYPE_INVALID"
            except p11.PKCS11Error as e:
                refusal = type(e).__name__
            else:
                refusal = ""  # the token handed the secret out; it is dropped, never shown
            return KeyInspection(attributes, f"CKA_{secret.name}", refusal)

    def destroy(self, ref: KeyRef) -> None:
        """Delete the key pair (private and public objects) from the token."""
        self._check_ref(ref)
        self.run(self._destroy_on_thread, ref)

    def _destroy_on_thread(self, ref: KeyRef) -> None:
        self._private_handles.pop(ref, None)
        self._public_keys.pop(ref, None)
        with _translated(self.token_label):
            attrs = {Attribute.LABEL: ref.label, Attribute.ID: ref.id}
            found = self._objects(ObjectClass.PRIVATE_KEY, attrs) + self._objects(
                ObjectClass.PUBLIC_KEY, attrs
            )
            if not found:
                raise KeyNotFound(
                    f"no key {_describe(ref.label, ref.id)} on token {ref.token_label!r}"
                )
            for obj in found:
                obj.destroy()

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
        return self.run(self._sign_on_thread, ref_or_handle, mechanism, data, mechanism_param)

    def _sign_on_thread(
        self,
        ref_or_handle: KeyRef | PrivateKey,
        mechanism: Mechanism,
        data: bytes,
        mechanism_param: Any,
    ) -> bytes:
        with _translated(self.token_label):
            if not isinstance(ref_or_handle, KeyRef):
                return _sign(ref_or_handle, mechanism, data, mechanism_param)
            if self._gil_signer is not None and mechanism_param is None:
                handle = self._private_handle(ref_or_handle)
                signature = self._gil_signer.sign(
                    self._session_handle, cast(Any, handle).handle, int(mechanism), data)
                if signature is not None:
                    return signature
            try:
                return _sign(self._private_handle(ref_or_handle), mechanism, data, mechanism_param)
            except (p11.ObjectHandleInvalid, p11.KeyHandleInvalid):
                # The cached handle went stale (the object was re-created): look it up again.
                self._private_handles.pop(ref_or_handle, None)
                return _sign(self._private_handle(ref_or_handle), mechanism, data, mechanism_param)

    # -- helpers (PKCS#11 thread only) ----------------------------------------------------------

    def _check_ref(self, ref: KeyRef) -> None:
        if ref.token_label != self.token_label:
            raise KeyNotFound(
                f"key {ref.label!r} is on token {ref.token_label!r}, not on {self.token_label!r}"
            )

    def _objects(self, object_class: ObjectClass, attrs: dict[Attribute, Any]) -> list[Object]:
        query = dict(attrs)
        query[Attribute.CLASS] = object_class
        return list(self._session.get_objects(query))

    def _private_handle(self, ref: KeyRef) -> PrivateKey:
        handle = self._private_handles.get(ref)
        if handle is not None:
            return handle
        found = self._objects(
            ObjectClass.PRIVATE_KEY, {Attribute.LABEL: ref.label, Attribute.ID: ref.id}
        )
        if not found:
            raise KeyNotFound(
                f"no private key {_describe(ref.label, ref.id)} on token {self.token_label!r}"
            )
        if len(found) > 1:
            raise KeyAmbiguous(
                f"{len(found)} private keys {_describe(ref.label, ref.id)} on token "
                f"{self.token_label!r}"
            )
        private = found[0]
        assert isinstance(private, PrivateKey)
        self._private_handles[ref] = private
        return private


def _sign(handle: PrivateKey, mechanism: Mechanism, data: bytes, mechanism_param: Any) -> bytes:
    # python-pkcs11 builds key objects with the mixins their attributes allow; the stubs of
    # PrivateKey do not show SignMixin, so say what the object is.
    signer = cast(SignMixin, handle)
    return bytes(signer.sign(data, mechanism=mechanism, mechanism_param=mechanism_param))


def _describe(label: str | None, key_id: bytes | None) -> str:
    parts = []
    if label is not None:
        parts.append(f"labelled {label!r}")
    if key_id is not None:
        parts.append(f"with id {key_id.hex()}")
    return " and ".join(parts)


def _public_key_from_object(obj: Object, ref: KeyRef, *, has_public_object: bool) -> PublicKey:
    key_type = obj[Attribute.KEY_TYPE]
    if key_type == P11KeyType.RSA:
        modulus = int.from_bytes(obj[Attribute.MODULUS], "big")
        exponent = int.from_bytes(obj[Attribute.PUBLIC_EXPONENT], "big")
        return rsa.RSAPublicNumbers(exponent, modulus).public_key()
    if not has_public_object:
        raise KeyNotFound(
            f"the public key object of {ref.label!r} (id {ref.id.hex()}) is missing from "
            f"token {ref.token_label!r}"
        )
    params = bytes(obj[Attribute.EC_PARAMS])
    point = bytes(obj[Attribute.EC_POINT])
    if key_type == P11KeyType.EC:
        curve = _EC_CURVES.get(params)
        if curve is None:
            raise UnsupportedKey(f"key {ref.label!r} is on an EC curve this appliance does not use")
        raw_length = 1 + 2 * ((curve.key_size + 7) // 8)
        return ec.EllipticCurvePublicKey.from_encoded_point(
            curve, _unwrap_octet_string(point, raw_length)
        )
    if key_type == P11KeyType.EC_EDWARDS:
        if params not in (_EC_PARAMS["Ed25519"], _ED25519_PRINTABLE):
            raise UnsupportedKey(f"key {ref.label!r} is on an Edwards curve other than Ed25519")
        return ed25519.Ed25519PublicKey.from_public_bytes(_unwrap_octet_string(point, 32))
    raise UnsupportedKey(f"key {ref.label!r} is of a type this appliance does not use")


def _unwrap_octet_string(value: bytes, raw_length: int) -> bytes:
    """CKA_EC_POINT is a DER OCTET STRING by the standard, but some tokens store it bare."""
    if len(value) == raw_length:
        return value
    if len(value) < 2 or value[0] != 0x04:
        raise DeviceError("the token returned a malformed EC point")
    length = value[1]
    offset = 2
    if length & 0x80:
        count = length & 0x7F
        length = int.from_bytes(value[2 : 2 + count], "big")
        offset = 2 + count
    body = value[offset:]
    if len(body) != length or length != raw_length:
        raise DeviceError("the token returned a malformed EC point")
    return body


if TYPE_CHECKING:
    # Pkcs11KeyStore is the KeyStore the rest of the appliance is typed against.
    def _is_a_key_store(store: Pkcs11KeyStore) -> KeyStore:
        return store
