"""A rendered template's JSON, parsed into a typed certificate description.

The JSON a template produces is step's certificate shape (subject, sans, keyUsage, extKeyUsage,
basicConstraints, crlDistributionPoints, extensions), matched case-insensitively as Go's
encoding/json does. It is parsed into cryptography objects here, and anything that would make a
CA certificate, or forge what the issuer writes itself, is refused with a BadRequest that says
which field is wrong.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

from appliance.errors import BadRequest
from appliance.issuance.names import canonical_san, normalise_dns, parse_san
from appliance.issuance.provisioner_ext import PROVISIONER_OID

__all__ = ["CertificateDescription", "describe"]

# The output fields, keyed by their lowercase form: Go's encoding/json (which step uses) matches
# object keys case-insensitively, so `{{ Subject | toJson }}` ({"CommonName": ...}) is a subject.
_TOP_LEVEL_KEYS = {k.lower(): k for k in (
    "subject", "sans", "keyUsage", "extKeyUsage", "basicConstraints", "crlDistributionPoints",
    "extensions")}

# (JSON name, OID, upper bound on length). Order is the one Go's pkix.Name writes, C first.
_SUBJECT_FIELDS: tuple[tuple[str, x509.ObjectIdentifier, int], ...] = (
    ("country", NameOID.COUNTRY_NAME, 2),
    ("province", NameOID.STATE_OR_PROVINCE_NAME, 128),
    ("locality", NameOID.LOCALITY_NAME, 128),
    ("streetAddress", NameOID.STREET_ADDRESS, 128),
    ("postalCode", NameOID.POSTAL_CODE, 40),
    ("organization", NameOID.ORGANIZATION_NAME, 64),
    ("organizationalUnit", NameOID.ORGANIZATIONAL_UNIT_NAME, 64),
    ("commonName", NameOID.COMMON_NAME, 64),
    ("serialNumber", NameOID.SERIAL_NUMBER, 64),
)
_SUBJECT_KEYS = {name.lower(): name for name, _, _ in _SUBJECT_FIELDS}

_KEY_USAGES = {k.lower(): v for k, v in {
    "digitalSignature": "digital_signature",
    "contentCommitment": "content_commitment",
    "keyEncipherment": "key_encipherment",
    "dataEncipherment": "data_encipherment",
    "keyAgreement": "key_agreement",
    "encipherOnly": "encipher_only",
    "decipherOnly": "decipher_only",
}.items()}
_CA_KEY_USAGES = {"certsign", "keycertsign", "crlsign"}

_EXT_KEY_USAGES = {k.lower(): v for k, v in {
    "serverAuth": ExtendedKeyUsageOID.SERVER_AUTH,
    "clientAuth": ExtendedKeyUsageOID.CLIENT_AUTH,
    "codeSigning": ExtendedKeyUsageOID.CODE_SIGNING,
    "emailProtection": ExtendedKeyUsageOID.EMAIL_PROTECTION,
    "timeStamping": ExtendedKeyUsageOID.TIME_STAMPING,
    "ocspSigning": ExtendedKeyUsageOID.OCSP_SIGNING,
}.items()}

# Extensions a template may not add raw: the issuer writes these itself (a second copy would
# fail to sign or contradict it), they have their own checked field, or they only mean something
# in a CA certificate.
_MANAGED_EXTENSIONS: dict[x509.ObjectIdentifier, str] = {
    ExtensionOID.SUBJECT_KEY_IDENTIFIER: "the issuer sets subjectKeyIdentifier",
    ExtensionOID.AUTHORITY_KEY_IDENTIFIER: "the issuer sets authorityKeyIdentifier",
    ExtensionOID.KEY_USAGE: "use the keyUsage field",
    ExtensionOID.EXTENDED_KEY_USAGE: "use the extKeyUsage field",
    ExtensionOID.SUBJECT_ALTERNATIVE_NAME: "use the sans field",
    ExtensionOID.BASIC_CONSTRAINTS: "use the basicConstraints field",
    ExtensionOID.CRL_DISTRIBUTION_POINTS: "use the crlDistributionPoints field",
    ExtensionOID.NAME_CONSTRAINTS: "name constraints belong in CA certificates",
    ExtensionOID.POLICY_CONSTRAINTS: "policy constraints belong in CA certificates",
    ExtensionOID.POLICY_MAPPINGS: "policy mappings belong in CA certificates",
    ExtensionOID.INHIBIT_ANY_POLICY: "inhibitAnyPolicy belongs in CA certificates",
    # Renewal and revocation read the provisioner from it: a template must not forge it.
    PROVISIONER_OID: "the authority records the provisioner itself",
}

_DOTTED_OID = re.compile(r"^[0-2](\.(0|[1-9][0-9]{0,17})){1,63}$")
_COUNTRY = re.compile(r"^[A-Za-z]{2}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_CRL_SCHEMES = ("http", "https", "ldap")
_SAN_TYPES = ("dns", "ip", "email", "uri", "auto")


@dataclass(frozen=True)
class CertificateDescription:
    """What a template asks for; the issuer adds key identifiers, validity and the signature."""

    subject: x509.Name
    sans: tuple[x509.GeneralName, ...]
    key_usage: x509.KeyUsage | None  # None: the issuer's default for the key type
    ext_key_usage: tuple[x509.ObjectIdentifier, ...] | None  # None: serverAuth, clientAuth
    basic_constraints: x509.BasicConstraints | None  # never ca=True
    crl_distribution_points: tuple[str, ...]
    extensions: tuple[x509.Extension[x509.ExtensionType], ...]


def _fields(obj: dict[str, Any], known: Mapping[str, str], where: str) -> dict[str, Any]:
    """Keys folded to their canonical names; unknown or repeated (in another case) keys refused."""
    out: dict[str, Any] = {}
    for key, value in obj.items():
        canonical = known.get(key.lower())
        if canonical is None:
            raise BadRequest(f"{where} has an unknown key {key!r}; known keys are "
                             f"{', '.join(known.values())}")
        if canonical in out:
            raise BadRequest(f"{where} has the key {canonical!r} twice")
        if value is not None:  # null means "not set", as in Go
            out[canonical] = value
    return out


def _strings(value: Any, where: str) -> list[str]:
    """step's MultiString: one string or a list of strings."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise BadRequest(f"{where} must be a string or a list of strings")
    return items


def describe(document: Any) -> CertificateDescription:
    if not isinstance(document, dict):
        raise BadRequest("template output must be a JSON object")
    fields = _fields(document, _TOP_LEVEL_KEYS, "template output")
    subject = _subject(fields.get("subject", {}))
    sans = _sans(fields.get("sans", []))
    if len(subject) == 0 and not sans:
        raise BadRequest("template output names neither a subject nor any SANs")
    ext_key_usage = fields.get("extKeyUsage")
    return CertificateDescription(
        subject=subject,
        sans=sans,
        key_usage=_key_usage(fields["keyUsage"]) if "keyUsage" in fields else None,
        ext_key_usage=_ext_key_usage(ext_key_usage) if ext_key_usage is not None else None,
        basic_constraints=(_basic_constraints(fields["basicConstraints"])
                           if "basicConstraints" in fields else None),
        crl_distribution_points=_crl_distribution_points(fields.get("crlDistributionPoints", [])),
        extensions=_extensions(fields.get("extensions", [])),
    )


def _subject(value: Any) -> x509.Name:
    if isinstance(value, str):
        value = {"commonName": value}
    if not isinstance(value, dict):
        raise BadRequest("subject must be an object such as {\"commonName\": \"...\"} or a string")
    fields = _fields(value, _SUBJECT_KEYS, "subject")
    if "commonName" in fields and not isinstance(fields["commonName"], str):
        raise BadRequest("subject commonName must be a string")
    attributes: list[x509.NameAttribute[str]] = []
    for key, oid, limit in _SUBJECT_FIELDS:
        for text in _strings(fields.get(key, []), f"subject {key}"):
            if not text:
                continue  # empty means absent, as with step's omitempty
            if _CONTROL.search(text):
                raise BadRequest(f"subject {key} {text!r} contains a control character")
            if key == "country" and not _COUNTRY.match(text):
                raise BadRequest(f"subject country {text!r} must be a two-letter code")
            if len(text) > limit:
                raise BadRequest(f"subject {key} is longer than {limit} characters")
            attributes.append(x509.NameAttribute(oid, text))
    return x509.Name(attributes)


def _sans(value: Any) -> tuple[x509.GeneralName, ...]:
    if not isinstance(value, list):
        raise BadRequest("sans must be a list")
    out: dict[str, x509.GeneralName] = {}
    for item in value:
        name = _san(item)
        out.setdefault(canonical_san(name), name)  # repeats collapse, first spelling wins
    return tuple(out.values())


def _san(item: Any) -> x509.GeneralName:
    if isinstance(item, str):
        return parse_san(item)
    if not isinstance(item, dict):
        raise BadRequest("each SAN must be a string or an object {\"type\": ..., \"value\": ...}")
    fields = _fields(item, {"type": "type", "value": "value"}, "SAN")
    kind, text = fields.get("type", "auto"), fields.get("value")
    if not isinstance(text, str) or not text:
        raise BadRequest("each SAN needs a non-empty string value")
    if not isinstance(kind, str) or kind.lower() not in _SAN_TYPES:
        raise BadRequest(f"SAN type {kind!r} is not supported; use one of {', '.join(_SAN_TYPES)}")
    kind = kind.lower()
    if kind == "auto":
        return parse_san(text)
    if kind == "dns":
        return x509.DNSName(normalise_dns(text))
    if kind == "ip":
        try:
            return x509.IPAddress(ipaddress.ip_address(text.strip("[]")))
        except ValueError:
            raise BadRequest(f"SAN {text!r} is not an IP address") from None
    if _CONTROL.search(text) or " " in text:
        raise BadRequest(f"SAN {text!r} contains a space or control character")
    if kind == "email":
        local, at, domain = text.rpartition("@")
        if not at or not local:
            raise BadRequest(f"SAN {text!r} is not an e-mail address")
        return x509.RFC822Name(f"{local}@{normalise_dns(domain)}")
    parts = urlsplit(text)
    if not parts.scheme or not (parts.netloc or parts.scheme == "urn" or parts.path):
        raise BadRequest(f"SAN {text!r} is not an absolute URI")
    return x509.UniformResourceIdentifier(text)


def _key_usage(value: Any) -> x509.KeyUsage:
    names = _strings(value, "keyUsage")
    if not names:
        raise BadRequest("keyUsage must name at least one usage; leave it out for the default")
    flags = dict.fromkeys(_KEY_USAGES.values(), False)
    for name in names:
        if name.lower() in _CA_KEY_USAGES:
            raise BadRequest(f"keyUsage {name} is for CA certificates; a leaf template may not "
                             "set it")
        flag = _KEY_USAGES.get(name.lower())
        if flag is None:
            raise BadRequest(f"keyUsage {name!r} is unknown; use digitalSignature, "
                             "contentCommitment, keyEncipherment, dataEncipherment, "
                             "keyAgreement, encipherOnly or decipherOnly")
        flags[flag] = True
    if (flags["encipher_only"] or flags["decipher_only"]) and not flags["key_agreement"]:
        raise BadRequest("keyUsage encipherOnly and decipherOnly need keyAgreement")
    return x509.KeyUsage(key_cert_sign=False, crl_sign=False, **flags)


def _oid(text: str, where: str) -> x509.ObjectIdentifier:
    if not _DOTTED_OID.match(text):
        raise BadRequest(f"{where} {text!r} is not a dotted OID such as 1.3.6.1.4.1.99999.1")
    try:
        return x509.ObjectIdentifier(text)
    except ValueError:
        raise BadRequest(f"{where} {text!r} is not a valid OID") from None


def _ext_key_usage(value: Any) -> tuple[x509.ObjectIdentifier, ...]:
    names = _strings(value, "extKeyUsage")
    if not names:
        raise BadRequest("extKeyUsage must name at least one usage; leave it out for the default")
    out: dict[x509.ObjectIdentifier, None] = {}
    for name in names:
        oid = _EXT_KEY_USAGES.get(name.lower())
        if oid is None:
            if not name[:1].isdigit():
                raise BadRequest(f"extKeyUsage {name!r} is unknown; use serverAuth, clientAuth, "
                                 "codeSigning, emailProtection, timeStamping, ocspSigning or a "
                                 "dotted OID")
            oid = _oid(name, "extKeyUsage")
        out[oid] = None
    return tuple(out)


def _basic_constraints(value: Any) -> x509.BasicConstraints:
    if not isinstance(value, dict):
        raise BadRequest("basicConstraints must be an object such as {\"isCA\": false}")
    fields = _fields(value, {"isca": "isCA", "maxpathlen": "maxPathLen"}, "basicConstraints")
    is_ca = fields.get("isCA", False)
    if not isinstance(is_ca, bool):
        raise BadRequest("basicConstraints isCA must be true or false")
    if is_ca:
        raise BadRequest("basicConstraints isCA true is refused: this template issues leaf "
                         "certificates, not CA certificates")
    max_path_len = fields.get("maxPathLen", 0)
    if isinstance(max_path_len, bool) or not isinstance(max_path_len, int) or max_path_len > 0:
        # step ignores maxPathLen 0 and -1 on a leaf; a positive one means someone wanted a CA.
        raise BadRequest("basicConstraints maxPathLen only applies to CA certificates; use 0 "
                         "or leave it out")
    return x509.BasicConstraints(ca=False, path_length=None)


def _crl_distribution_points(value: Any) -> tuple[str, ...]:
    urls = _strings(value, "crlDistributionPoints")
    for url in urls:
        parts = urlsplit(url)
        if (parts.scheme.lower() not in _CRL_SCHEMES or not parts.netloc
                or _CONTROL.search(url) or " " in url):
            raise BadRequest(f"crlDistributionPoints {url!r} must be an http, https or ldap URL")
    return tuple(dict.fromkeys(urls))


def _extensions(value: Any) -> tuple[x509.Extension[x509.ExtensionType], ...]:
    if not isinstance(value, list):
        raise BadRequest("extensions must be a list")
    out: dict[x509.ObjectIdentifier, x509.Extension[x509.ExtensionType]] = {}
    for item in value:
        if not isinstance(item, dict):
            raise BadRequest("each extension must be an object {\"id\", \"critical\", \"value\"}")
        fields = _fields(item, {"id": "id", "critical": "critical", "value": "value"},
                         "extension")
        oid_text, critical, encoded = fields.get("id"), fields.get("critical", False), \
            fields.get("value")
        if not isinstance(oid_text, str):
            raise BadRequest("each extension needs an id, a dotted OID")
        oid = _oid(oid_text, "extension id")
        if oid in _MANAGED_EXTENSIONS:
            raise BadRequest(f"extension {oid_text} may not be set raw: "
                             f"{_MANAGED_EXTENSIONS[oid]}")
        if oid in out:
            raise BadRequest(f"extension {oid_text} appears twice")
        if not isinstance(critical, bool):
            raise BadRequest(f"extension {oid_text} critical must be true or false")
        if not isinstance(encoded, str):
            raise BadRequest(f"extension {oid_text} needs a value: base64 of its DER encoding")
        try:
            der = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest(f"extension {oid_text} value is not valid base64") from None
        if not _is_one_der_value(der):
            raise BadRequest(f"extension {oid_text} value is not one DER-encoded ASN.1 value")
        out[oid] = x509.Extension(oid, critical, x509.UnrecognizedExtension(oid, der))
    return tuple(out.values())


def _is_one_der_value(der: bytes) -> bool:
    """Whether the bytes are exactly one DER tag-length-value (the content is not parsed)."""
    i = 1
    if not der:
        return False
    if der[0] & 0x1F == 0x1F:  # high-tag-number form
        while i < len(der) and der[i] & 0x80:
            i += 1
        i += 1
    if i >= len(der):
        return False
    first = der[i]
    i += 1
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if count == 0 or count > 4 or i + count > len(der) or der[i] == 0:
            return False  # indefinite length, absurd length or non-minimal encoding
        length = int.from_bytes(der[i:i + count], "big")
        i += count
        if length < 0x80:
            return False
    return i + length == len(der)
