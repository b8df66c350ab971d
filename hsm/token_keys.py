"""The keys on one logged-in token: lookup, creation, checks and signing, on the PKCS#11 thread.

Pkcs11KeyStore (hsm.pkcs11_store) hands every call here through the process's PKCS#11 thread;
nothing in this module hops threads or may be called from any other thread. It caches object
handles and public keys, which are therefore touched by that one thread only.
"""

from __future__ import annotations

import contextlib
from typing import Any, cast

from pkcs11 import exceptions as p11
from pkcs11.constants import Attribute, MechanismFlag, ObjectClass
from pkcs11.mechanisms import Mechanism
from pkcs11.types import Object, PrivateKey, Session, SignMixin

from hsm.errors import HsmError, KeyAmbiguous, KeyExists, KeyNotFound, KeyNotProtected
from hsm.inprocess_sign import GilHoldingSigner
from hsm.key_attributes import KeyInspection
from hsm.key_objects import (
    describe,
    generation_templates,
    inspect_private,
    protection_failure,
    public_key_from_object,
)
from hsm.keystore import KeyRef, KeySpec, PublicKey
from hsm.pkcs11_session import translated

__all__ = ["TokenKeys"]


class TokenKeys:
    """Key pairs on one token, reached through the process's one logged-in session to it."""

    def __init__(self, module_path: str, token_label: str, session: Session) -> None:
        self.token_label = token_label
        self._session = session
        self._private_handles: dict[KeyRef, PrivateKey] = {}
        self._public_keys: dict[KeyRef, PublicKey] = {}
        self._session_handle: int = cast(Any, session).handle
        self._gil_signer = GilHoldingSigner.for_module(module_path)

    @property
    def holds_gil_while_signing(self) -> bool:
        return self._gil_signer is not None

    def close(self) -> None:
        self._private_handles.clear()
        self._public_keys.clear()
        # Closing the process's only session on the token logs the user out.
        with contextlib.suppress(p11.PKCS11Error):
            self._session.close()

    # -- lookup ---------------------------------------------------------------------------------

    def _objects(self, object_class: ObjectClass, attrs: dict[Attribute, Any]) -> list[Object]:
        query = dict(attrs)
        query[Attribute.CLASS] = object_class
        return list(self._session.get_objects(query))

    def _lookup_private(self, label: str | None, key_id: bytes | None, hint: str = ""
                        ) -> PrivateKey:
        attrs: dict[Attribute, Any] = {}
        if label is not None:
            attrs[Attribute.LABEL] = label
        if key_id is not None:
            attrs[Attribute.ID] = bytes(key_id)
        found = self._objects(ObjectClass.PRIVATE_KEY, attrs)
        if not found:
            raise KeyNotFound(
                f"no private key {describe(label, key_id)} on token {self.token_label!r}"
            )
        if len(found) > 1:
            raise KeyAmbiguous(
                f"{len(found)} private keys {describe(label, key_id)} on token "
                f"{self.token_label!r}{hint}"
            )
        private = found[0]
        assert isinstance(private, PrivateKey)
        return private

    def private_handle(self, ref: KeyRef) -> PrivateKey:
        """The private key object `ref` names (looked up once, then cached)."""
        handle = self._private_handles.get(ref)
        if handle is None:
            handle = self._lookup_private(ref.label, ref.id)
            self._private_handles[ref] = handle
        return handle

    def find(self, label: str | None, key_id: bytes | None) -> KeyRef:
        with translated(self.token_label):
            private = self._lookup_private(label, key_id, "; name the key by label and id")
            ref = KeyRef(token_label=self.token_label, label=private.label, id=private.id)
            self._private_handles[ref] = private
            return ref

    def list(self) -> list[KeyRef]:
        with translated(self.token_label):
            refs = []
            for obj in self._objects(ObjectClass.PRIVATE_KEY, {}):
                assert isinstance(obj, PrivateKey)
                refs.append(KeyRef(token_label=self.token_label, label=obj.label, id=obj.id))
            return refs

    def public_key(self, ref: KeyRef) -> PublicKey:
        cached = self._public_keys.get(ref)
        if cached is not None:
            return cached
        with translated(self.token_label):
            attrs = {Attribute.LABEL: ref.label, Attribute.ID: ref.id}
            found = self._objects(ObjectClass.PUBLIC_KEY, attrs)
            if len(found) > 1:
                raise KeyAmbiguous(
                    f"{len(found)} public keys labelled {ref.label!r} with id {ref.id.hex()} "
                    f"on token {self.token_label!r}"
                )
            source: Object = found[0] if found else self.private_handle(ref)
            public = public_key_from_object(source, ref, has_public_object=bool(found))
        self._public_keys[ref] = public
        return public

    # -- creation and removal -------------------------------------------------------------------

    def generate(self, spec: KeySpec, label: str, key_id: bytes) -> KeyRef:
        with translated(self.token_label):
            for attrs, what in (
                ({Attribute.LABEL: label}, f"labelled {label!r}"),
                ({Attribute.ID: key_id}, f"with id {key_id.hex()}"),
            ):
                for object_class in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY):
                    if self._objects(object_class, attrs):
                        raise KeyExists(
                            f"a key {what} already exists on token {self.token_label!r}"
                        )
            key_type, key_length, public_template, private_template = generation_templates(spec)
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
                self.check_protected(ref)
                self.public_key(ref)
            except BaseException:
                # A token that ignored our template must not keep a key we would refuse to use.
                with contextlib.suppress(HsmError, p11.PKCS11Error):
                    self.destroy(ref)
                raise
            return ref

    def destroy(self, ref: KeyRef) -> None:
        self._private_handles.pop(ref, None)
        self._public_keys.pop(ref, None)
        with translated(self.token_label):
            attrs = {Attribute.LABEL: ref.label, Attribute.ID: ref.id}
            found = self._objects(ObjectClass.PRIVATE_KEY, attrs) + self._objects(
                ObjectClass.PUBLIC_KEY, attrs
            )
            if not found:
                raise KeyNotFound(
                    f"no key {describe(ref.label, ref.id)} on token {ref.token_label!r}"
                )
            for obj in found:
                obj.destroy()

    # -- what the token says of a key -----------------------------------------------------------

    def check_protected(self, ref: KeyRef) -> None:
        with translated(self.token_label):
            failure = protection_failure(self.private_handle(ref))
        if failure is not None:
            raise KeyNotProtected(
                f"key {ref.label!r} on token {self.token_label!r} is not protected: {failure}"
            )

    def inspect(self, ref: KeyRef) -> KeyInspection:
        with translated(self.token_label):
            return inspect_private(self.private_handle(ref))

    # -- signing --------------------------------------------------------------------------------

    def sign(self, ref_or_handle: KeyRef | PrivateKey, mechanism: Mechanism, data: bytes,
             mechanism_param: Any) -> bytes:
        with translated(self.token_label):
            if not isinstance(ref_or_handle, KeyRef):
                return _sign(ref_or_handle, mechanism, data, mechanism_param)
            if self._gil_signer is not None and mechanism_param is None:
                handle = self.private_handle(ref_or_handle)
                signature = self._gil_signer.sign(
                    self._session_handle, cast(Any, handle).handle, int(mechanism), data)
                if signature is not None:
                    return signature
            try:
                return _sign(self.private_handle(ref_or_handle), mechanism, data, mechanism_param)
            except (p11.ObjectHandleInvalid, p11.KeyHandleInvalid):
                # The cached handle went stale (the object was re-created): look it up again.
                self._private_handles.pop(ref_or_handle, None)
                return _sign(self.private_handle(ref_or_handle), mechanism, data, mechanism_param)


def _sign(handle: PrivateKey, mechanism: Mechanism, data: bytes, mechanism_param: Any) -> bytes:
    # python-pkcs11 builds key objects with the mixins their attributes allow; the stubs of
    # PrivateKey do not show SignMixin, so say what the object is.
    signer = cast(SignMixin, handle)
    return bytes(signer.sign(data, mechanism=mechanism, mechanism_param=mechanism_param))
