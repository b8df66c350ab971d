"""A compiled certificate template and what it sees: X509Template and TemplateData.

The template is operator configuration; what it reads may not be: `Insecure.*` holds what the
requester sent (CSR names, request templateData) and a template that copies it into the
certificate does so on purpose. Rendering streams the output with a size bound, then hands the
JSON to appliance.issuance.templates.description.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from jinja2 import TemplateSyntaxError

from appliance import strict_json
from appliance.errors import BadRequest, ConfigError
from appliance.issuance.names import parse_san
from appliance.issuance.templates.description import CertificateDescription, describe
from appliance.issuance.templates.sandbox import (
    TemplateFailure,
    ValueTooLarge,
    environment,
    static_refusal,
    template_line,
)

__all__ = [
    "DEFAULT_LEAF_SOURCE",
    "MAX_OUTPUT_BYTES",
    "MAX_TEMPLATE_BYTES",
    "TemplateData",
    "X509Template",
]

MAX_TEMPLATE_BYTES = 64 * 1024
MAX_OUTPUT_BYTES = 64 * 1024

DEFAULT_LEAF_SOURCE = """{
    "subject": {{ Subject | toJson }},
    "sans": {{ SANs | toJson }}
}
"""


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


class _Refused(BadRequest):
    """The template called fail(): a deliberate answer, not a broken template."""


class _OutputTooLarge(Exception):
    pass


class _SampleMapping(dict[str, Any]):
    """Sample Token/User/Data for check(): any key a template reads has a placeholder string."""

    def __missing__(self, key: str) -> str:
        return f"sample-{key}"

    def get(self, key: str, default: Any = None) -> Any:
        return self[key]  # a key the template asks for always exists in the sample


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
        env = environment()
        filename = f"<certificate template {name}>"
        try:
            tree = env.parse(source, name, filename)
        except TemplateSyntaxError as e:
            raise ConfigError(f"{name}: line {e.lineno}: {e.message}") from None
        refusal = static_refusal(tree)
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
        return describe(document)

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
        except TemplateFailure as e:
            raise _Refused(f"the certificate template refused the request: {e}") from None
        except Exception as e:  # noqa: BLE001 - any error in operator code is a clear 400
            raise BadRequest(self._render_error(e)) from None
        return "".join(chunks)

    def _render_error(self, error: Exception) -> str:
        line = template_line(error.__traceback__, self._filename)
        where = f"{self.name} line {line}" if line is not None else self.name
        if isinstance(error, ValueTooLarge):
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
