"""RFC 7512 ``pkcs11:`` URIs naming a module, a token and a key.

Only the attributes this appliance acts on are accepted: ``token``, ``object``, ``id`` and ``type``
in the path, ``module-path`` and ``pin-source`` in the query. Any other attribute is refused rather
than ignored, because ignoring (say) ``serial=`` could select a different token than the operator
meant. ``pin-value`` is always refused: PINs do not belong in URIs, which end up in configuration
files and logs.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from typing import Final
from urllib.parse import quote, unquote_to_bytes

from hsm.errors import HsmError

__all__ = ["InvalidPkcs11Uri", "Pkcs11Uri", "OBJECT_TYPES"]

SCHEME: Final = "pkcs11:"

OBJECT_TYPES: Final = frozenset({"public", "private", "cert", "secret-key", "data"})

_UNRESERVED: Final = string.ascii_letters + string.digits + "-._~"
# RFC 7512 section 2.3: pk11-p-res-avail and pk11-q-res-avail.
_PATH_SAFE: Final = ":[]@!$'()*+,="
_QUERY_SAFE: Final = _PATH_SAFE + "/?|"

_PATH_VALUE_RE: Final = re.compile(r"(?:[A-Za-z0-9\-._~:\[\]@!$'()*+,=]|%[0-9A-Fa-f]{2})*")
_QUERY_VALUE_RE: Final = re.compile(r"(?:[A-Za-z0-9\-._~:\[\]@!$'()*+,=/?|]|%[0-9A-Fa-f]{2})*")

_PATH_ATTRIBUTES: Final = ("token", "object", "id", "type")
_QUERY_ATTRIBUTES: Final = ("module-path", "pin-source")
# Attributes refused where they stand, and what to do instead.
_REFUSED_IN_PATH: Final = {
    name: f"pkcs11 URI attribute {name!r} belongs in the query"
    for name in ("pin-value", "pin-source", "module-path")
}
_REFUSED_IN_QUERY: Final = {
    "pin-value": "PINs do not belong in URIs: remove pin-value and use pin-source or a password "
    "file"
}


class InvalidPkcs11Uri(HsmError, ValueError):
    """The text is not a pkcs11: URI this appliance accepts."""


@dataclass(frozen=True)
class Pkcs11Uri:
    """A parsed pkcs11: URI; absent attributes are None."""

    token: str | None = None
    object: str | None = None
    id: bytes | None = None
    type: str | None = None
    module_path: str | None = None
    pin_source: str | None = None

    def __post_init__(self) -> None:
        if self.type is not None and self.type not in OBJECT_TYPES:
            raise InvalidPkcs11Uri(
                f"pkcs11 URI type must be one of {', '.join(sorted(OBJECT_TYPES))}, "
                f"not {self.type!r}"
            )

    @classmethod
    def parse(cls, text: str) -> Pkcs11Uri:
        """Parse and percent-decode an RFC 7512 URI; raise InvalidPkcs11Uri when it is not one."""
        if not isinstance(text, str):
            raise InvalidPkcs11Uri("a pkcs11 URI must be text")
        if text[: len(SCHEME)].lower() != SCHEME:
            raise InvalidPkcs11Uri("not a pkcs11 URI: it must start with 'pkcs11:'")
        rest = text[len(SCHEME) :]
        path, _, query = rest.partition("?")
        values: dict[str, str | bytes] = {}
        if path:
            _parse_section(values, path.split(";"), "path", _PATH_ATTRIBUTES, _PATH_VALUE_RE,
                           _REFUSED_IN_PATH)
        if query:
            _parse_section(values, query.split("&"), "query", _QUERY_ATTRIBUTES, _QUERY_VALUE_RE,
                           _REFUSED_IN_QUERY)

        def text_of(name: str) -> str | None:
            raw = values.get(name)
            return raw if raw is None or isinstance(raw, str) else None

        raw_id = values.get("id")
        return cls(
            token=text_of("token"),
            object=text_of("object"),
            id=raw_id if isinstance(raw_id, bytes) else None,
            type=text_of("type"),
            module_path=text_of("module-path"),
            pin_source=text_of("pin-source"),
        )

    def format(self) -> str:
        """Return the URI text, percent-encoding as RFC 7512 requires (id always fully)."""
        path: list[str] = []
        if self.token is not None:
            path.append("token=" + quote(self.token, safe=_PATH_SAFE))
        if self.object is not None:
            path.append("object=" + quote(self.object, safe=_PATH_SAFE))
        if self.id is not None:
            path.append("id=" + "".join(f"%{b:02X}" for b in self.id))
        if self.type is not None:
            path.append("type=" + self.type)
        query: list[str] = []
        if self.module_path is not None:
            query.append("module-path=" + quote(self.module_path, safe=_QUERY_SAFE))
        if self.pin_source is not None:
            query.append("pin-source=" + quote(self.pin_source, safe=_QUERY_SAFE))
        text = SCHEME + ";".join(path)
        if query:
            text += "?" + "&".join(query)
        return text

    def __str__(self) -> str:
        return self.format()


def _parse_section(values: dict[str, str | bytes], parts: list[str], where: str,
                   allowed: tuple[str, ...], value_re: re.Pattern[str],
                   refused: dict[str, str]) -> None:
    """Decode the path's or the query's attributes into `values`."""
    for part in parts:
        name, value = _split_attribute(part, where)
        if name in refused:
            raise InvalidPkcs11Uri(refused[name])
        if name not in allowed:
            raise InvalidPkcs11Uri(f"unsupported pkcs11 URI {where} attribute {name!r}")
        if value_re.fullmatch(value) is None:
            raise InvalidPkcs11Uri(
                f"pkcs11 URI attribute {name!r} has a character that must be "
                "percent-encoded or a malformed percent-escape"
            )
        _store(values, name, value)


def _split_attribute(part: str, where: str) -> tuple[str, str]:
    name, sep, value = part.partition("=")
    if not sep or not name:
        raise InvalidPkcs11Uri(f"malformed pkcs11 URI {where} attribute: expected name=value")
    return name.lower(), value


def _store(values: dict[str, str | bytes], name: str, encoded: str) -> None:
    if name in values:
        raise InvalidPkcs11Uri(f"pkcs11 URI attribute {name!r} appears more than once")
    raw = unquote_to_bytes(encoded)
    if name == "id":
        values[name] = raw
        return
    try:
        decoded = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidPkcs11Uri(
            f"pkcs11 URI attribute {name!r} is not UTF-8 after percent-decoding"
        ) from None
    if name == "type" and decoded not in OBJECT_TYPES:
        raise InvalidPkcs11Uri(
            f"pkcs11 URI type must be one of {', '.join(sorted(OBJECT_TYPES))}, not {decoded!r}"
        )
    values[name] = decoded
