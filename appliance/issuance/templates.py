"""Certificate templates: a provisioner's Jinja2 template renders a JSON certificate description.

This is step-ca's `options.x509.template` with Jinja2 in place of Go templates. The template is
operator configuration; what it reads may not be: `Insecure.*` holds what the requester sent
(CSR names, request templateData) and a template that copies it into the certificate does so
on purpose. The template runs in Jinja2's immutable sandbox with no loader, no `_` attributes,
no `self`, and undefined names as errors. The JSON it produces is parsed into typed cryptography
objects here, and anything that would make a CA certificate is refused.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, NoReturn
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID
from jinja2 import StrictUndefined, TemplateSyntaxError, Undefined, nodes
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment

from appliance import strict_json
from appliance.errors import BadRequest, ConfigError
from appliance.issuance.names import canonical_san, normalise_dns, parse_san
from appliance.issuance.provisioner_ext import PROVISIONER_OID

MAX_TEMPLATE_BYTES = 64 * 1024
MAX_OUTPUT_BYTES = 64 * 1024
# Bounds a single `*`, `+` or `**` in a template: a string or list of at most this many items, an
# integer of at most this many bits. Without it one expression could allocate gigabytes.
MAX_VALUE_SIZE = 64 * 1024

DEFAULT_LEAF_SOURCE = """{
    "subject": {{ Subject | toJson }},
    "sans": {{ SANs | toJson }}
}
"""

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


@dataclass(frozen=True)
class TemplateData:
    """The values a template sees; `csr_*` and `user` come from the requester and are untrusted."""

    subject: str
    sans: tuple[str, ...]
    token: Mapping[str, Any]
    csr_subject: str | None
    csr_sans: tuple[str, ...]
    user: Mapping[str, Any]
    provisioner_data: Mapping[str, Any]


class _TemplateFailure(Exception):
    """Raised by `fail("...")` in a template: the message is for the requester."""


class _Refused(BadRequest):
    """The template called fail(): a deliberate answer, not a broken template."""


class _OutputTooLarge(Exception):
    pass


class _ValueTooLarge(Exception):
    pass


class _SampleMapping(dict[str, Any]):
    """Sample Token/User/Data for check(): any key a template reads has a placeholder string."""

    def __missing__(self, key: str) -> str:
        return f"sample-{key}"

    def get(self, key: str, default: Any = None) -> Any:
        return self[key]  # a key the template asks for always exists in the sample


def _to_json(value: Any) -> str:
    if isinstance(value, Undefined):
        value._fail_with_undefined_error()
    return json.dumps(value, ensure_ascii=False, allow_nan=False, default=_not_json)


def _not_json(value: Any) -> NoReturn:
    if isinstance(value, Undefined):
        value._fail_with_undefined_error()
    raise TypeError(f"toJson cannot encode a {type(value).__name__}")


def _fail(message: Any = "the template refused the request") -> NoReturn:
    raise _TemplateFailure(str(message))


def _size_of(value: Any) -> int:
    if isinstance(value, bool):
        return 1
    if isinstance(value, int):
        return value.bit_length()
    if isinstance(value, str | bytes | list | tuple):
        return len(value)
    return 0


class _TemplateEnvironment(ImmutableSandboxedEnvironment):
    """The immutable sandbox, with `*`, `+` and `**` bounded so one expression cannot eat memory."""

    intercepted_binops = frozenset({"*", "+", "**"})

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        if operator == "**":
            if isinstance(left, int) and isinstance(right, int) and right > 0 and (
                    max(left.bit_length(), 1) * right > MAX_VALUE_SIZE):
                raise _ValueTooLarge(operator)
            return left**right
        if operator == "*":
            if isinstance(left, int) and isinstance(right, int):
                size = left.bit_length() + right.bit_length()
            elif isinstance(right, int):
                size = _size_of(left) * right
            elif isinstance(left, int):
                size = _size_of(right) * left
            else:
                size = 0
            if size > MAX_VALUE_SIZE:
                raise _ValueTooLarge(operator)
            return left * right
        if _size_of(left) + _size_of(right) > MAX_VALUE_SIZE:
            raise _ValueTooLarge(operator)
        return left + right


def _environment() -> _TemplateEnvironment:
    env = _TemplateEnvironment(undefined=StrictUndefined, autoescape=False)
    env.globals.pop("lipsum", None)  # lipsum(n) is an unbounded text generator and no use here
    env.globals["toJson"] = _to_json
    env.globals["fail"] = _fail
    env.filters["toJson"] = _to_json
    env.filters["tojson"] = _to_json  # JSON, not HTML-escaped JSON: the output is not a page
    return env


def _static_refusal(tree: nodes.Template) -> tuple[int, str] | None:
    """Refuse at compile time what the sandbox would only stop at render time, with a line."""
    for include in tree.find_all((nodes.Extends, nodes.Include, nodes.Import, nodes.FromImport)):
        return include.lineno, ("extends, include and import are not available: a template "
                                "is self-contained")
    for name in tree.find_all(nodes.Name):
        if name.name == "self":
            return name.lineno, "'self' is not available in certificate templates"
    for getattr_node in tree.find_all(nodes.Getattr):
        if getattr_node.attr.startswith("_"):
            return getattr_node.lineno, f"attribute {getattr_node.attr!r} is not accessible"
    for getitem in tree.find_all(nodes.Getitem):
        if (isinstance(getitem.arg, nodes.Const) and isinstance(getitem.arg.value, str)
                and getitem.arg.value.startswith("_")):
            return getitem.lineno, f"item {getitem.arg.value!r} is not accessible"
    for filter_node in tree.find_all(nodes.Filter):
        if filter_node.name == "attr" and any(
                isinstance(a, nodes.Const) and str(a.value).startswith("_")
                for a in filter_node.args):
            return filter_node.lineno, "attributes starting with '_' are not accessible"
    return None


def _template_line(tb: TracebackType | None, filename: str) -> int | None:
    """The template line an exception came from; Jinja rewrites tracebacks to carry it."""
    line = None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == filename:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def _plain(value: Any, what: str) -> Any:
    """A deep copy holding only JSON types, so a template sees dicts, lists and scalars only."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError, RecursionError):
        raise BadRequest(f"{what} must be JSON data (objects, arrays, strings, numbers)"
                         ) from None


def _san_object(text: str, what: str) -> dict[str, str]:
    name = parse_san(text)
    if isinstance(name, x509.IPAddress):
        return {"type": "ip", "value": str(name.value)}
    if isinstance(name, x509.RFC822Name):
        return {"type": "email", "value": name.value}
    if isinstance(name, x509.UniformResourceIdentifier):
        return {"type": "uri", "value": name.value}
    if isinstance(name, x509.DNSName):
        return {"type": "dns", "value": name.value}
    raise BadRequest(f"{what} {text!r} is not a DNS name, IP address, e-mail address or URI")


def _context(data: TemplateData) -> dict[str, Any]:
    return {
        "Subject": {"CommonName": data.subject},
        "SANs": [_san_object(s, "SAN") for s in data.sans],
        "Token": _plain(dict(data.token), "token claims"),
        "Insecure": {
            "CR": {
                "Subject": {"CommonName": data.csr_subject},
                "SANs": [_san_object(s, "certificate request SAN") for s in data.csr_sans],
            },
            "User": _plain(dict(data.user), "templateData"),
        },
        "Data": _plain(dict(data.provisioner_data), "provisioner templateData"),
    }


class X509Template:
    """A compiled, sandboxed certificate template; render() it per request."""

    def __init__(self, name: str, render_stream: Callable[[dict[str, Any]], Iterator[str]],
                 filename: str) -> None:
        self.name = name
        self._render_stream = render_stream
        self._filename = filename

    @classmethod
    def compile(cls, source: str, *, name: str = "template") -> X509Template:
        """Parse and compile a template; ConfigError with the line number if it is not valid."""
        if len(source.encode("utf-8", "surrogatepass")) > MAX_TEMPLATE_BYTES:
            raise ConfigError(f"{name}: template is larger than {MAX_TEMPLATE_BYTES} bytes")
        env = _environment()
        filename = f"<certificate template {name}>"
        try:
            tree = env.parse(source, name, filename)
        except TemplateSyntaxError as e:
            raise ConfigError(f"{name}: line {e.lineno}: {e.message}") from None
        refusal = _static_refusal(tree)
        if refusal is not None:
            raise ConfigError(f"{name}: line {refusal[0]}: {refusal[1]}")
        try:
            code = env.compile(tree, name, filename)
        except TemplateSyntaxError as e:  # some checks (e.g. duplicate blocks) run here
            raise ConfigError(f"{name}: line {e.lineno}: {e.message}") from None
        template = env.template_class.from_code(env, code, env.make_globals(None))
        return cls(name, template.generate, filename)

    @classmethod
    def default_leaf(cls) -> X509Template:
        """step's default leaf: subject CN from the authorised subject, SANs as authorised."""
        return cls.compile(DEFAULT_LEAF_SOURCE, name="default leaf")

    def render(self, data: TemplateData) -> CertificateDescription:
        """Render for one request; BadRequest saying what went wrong if the result is unusable."""
        try:
            return self._render(_context(data))
        except UnicodeError:
            raise BadRequest("the template produced text that is not valid Unicode") from None
        except ValueError as e:
            # cryptography refuses some values (a malformed URI host, a non-ASCII mailbox):
            # that is the request's or the template's data, never a server fault.
            raise BadRequest(f"the template produced an unusable value: {str(e)[:200]}"
                             ) from None

    def check(self, provisioner_data: Mapping[str, Any] | None = None) -> None:
        """Render once with sample data; ConfigError if the template cannot produce a leaf.

        Token claims and Insecure.User keys the template reads get placeholder strings, since
        they vary per request. Data is the provisioner's templateData when given (so a typo in
        a key is caught), placeholders otherwise. A template that calls fail() on the sample
        passes: refusing a request is what fail() is for.
        """
        sample = TemplateData(
            subject="check.example.com",
            sans=("check.example.com", "192.0.2.10"),
            token={"iss": "check", "sub": "check.example.com", "aud": "https://ca.example.com",
                   "sans": ["check.example.com", "192.0.2.10"], "jti": "check",
                   "iat": 0, "nbf": 0, "exp": 0},
            csr_subject="check.example.com",
            csr_sans=("check.example.com",),
            user={},
            provisioner_data=provisioner_data or {},
        )
        context = _context(sample)
        context["Token"] = _SampleMapping(context["Token"])
        context["Insecure"]["User"] = _SampleMapping()
        if provisioner_data is None:
            context["Data"] = _SampleMapping()
        try:
            self._render(context, quote_output=True)
        except _Refused:
            return  # fail() on placeholder values is the template doing its job
        except BadRequest as e:
            raise ConfigError(f"{self.name}: rendering with sample data failed: {e.message}"
                              ) from None

    def _render(self, context: dict[str, Any], *, quote_output: bool = False
                ) -> CertificateDescription:
        text = self._render_text(context)
        try:
            document = strict_json.loads(text)
        except strict_json.DuplicateKey as e:
            raise BadRequest(f"template output has the key {e.key!r} twice") from None
        except strict_json.NonJsonConstant as e:
            raise BadRequest(f"template output contains {e.name}, which is not JSON") from None
        except json.JSONDecodeError as e:
            where = f"{e.msg} at output line {e.lineno} column {e.colno}"
            lines = text.splitlines()
            if quote_output and 0 < e.lineno <= len(lines):
                # Only for the operator at check time: a requester should not be shown the
                # rendered text (it may hold Data values or object reprs).
                where += f": {lines[e.lineno - 1].strip()[:80]!r}"
            raise BadRequest(f"template output is not valid JSON: {where}") from None
        except RecursionError:
            raise BadRequest("template output is nested too deeply") from None
        return _describe(document)

    def _render_text(self, context: dict[str, Any]) -> str:
        chunks: list[str] = []
        size = 0
        try:
            for chunk in self._render_stream(context):
                size += len(chunk.encode("utf-8", "surrogatepass"))
                if size > MAX_OUTPUT_BYTES:
                    raise _OutputTooLarge
                chunks.append(chunk)
        except _OutputTooLarge:
            raise BadRequest(f"template output is larger than {MAX_OUTPUT_BYTES} bytes"
                             ) from None
        except _TemplateFailure as e:
            raise _Refused(f"the certificate template refused the request: {e}") from None
        except Exception as e:  # noqa: BLE001 - any error in operator code is a clear 400
            raise BadRequest(self._render_error(e)) from None
        return "".join(chunks)

    def _render_error(self, error: Exception) -> str:
        line = _template_line(error.__traceback__, self._filename)
        where = f"{self.name} line {line}" if line is not None else self.name
        if isinstance(error, _ValueTooLarge):
            detail = f"the result of {error} would be too large"
        elif isinstance(error, RecursionError):
            detail = "recursion is too deep"
        elif isinstance(error, MemoryError):
            detail = "out of memory"
        else:
            # Jinja's messages name the missing variable or unsafe attribute; Python's name the
            # operation. Neither carries anything the operator did not write.
            detail = f"{type(error).__name__}: {error}"[:300]
        return f"certificate template failed at {where}: {detail}"


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


def _describe(document: Any) -> CertificateDescription:
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
