"""ACME problem documents (RFC 8555 §6.7 on RFC 7807): one exception that carries its problem type.

The ACME layer raises AcmeProblem; the web edge renders `to_json()` as application/problem+json with
`status` as the HTTP status. Typed appliance errors reach ACME clients through
`from_appliance_error`, which drops the message of every 5xx: it may hold internal details.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any, TypedDict, Unpack

from appliance.errors import ApplianceError

ERROR_NAMESPACE = "urn:ietf:params:acme:error:"
PROBLEM_CONTENT_TYPE = "application/problem+json"

# Every type of the RFC 8555 §6.7 registry, with the status a problem of that type gets unless
# the raiser says otherwise. Types outside this registry must not use the ACME namespace (§6.7).
DEFAULT_STATUS: Mapping[str, int] = MappingProxyType({
    "accountDoesNotExist": 400,
    "alreadyRevoked": 400,
    "badCSR": 400,
    "badNonce": 400,
    "badPublicKey": 400,
    "badRevocationReason": 400,
    "badSignatureAlgorithm": 400,
    "caa": 403,
    "compound": 400,
    "connection": 400,
    "dns": 400,
    "externalAccountRequired": 400,
    "incorrectResponse": 403,
    "invalidContact": 400,
    "malformed": 400,
    "orderNotReady": 403,
    "rateLimited": 429,
    "rejectedIdentifier": 400,
    "serverInternal": 500,
    "tls": 400,
    "unauthorized": 403,
    "unsupportedContact": 400,
    "unsupportedIdentifier": 400,
    "userActionRequired": 403,
})


class ProblemOptions(TypedDict, total=False):
    """Optional members shared by the named constructors."""

    status: int
    subproblems: Sequence[AcmeProblem | Mapping[str, Any]]
    identifier: Mapping[str, str]


class AcmeProblem(Exception):
    """An RFC 8555 problem: `type` is the short name ("malformed"), `urn` the full type URI."""

    def __init__(self, type: str, detail: str, status: int | None = None, *,
                 subproblems: Sequence[AcmeProblem | Mapping[str, Any]] | None = None,
                 identifier: Mapping[str, str] | None = None,
                 algorithms: Sequence[str] | None = None,
                 instance: str | None = None) -> None:
        if type not in DEFAULT_STATUS:
            raise ValueError(f"{type!r} is not an RFC 8555 problem type")
        status = DEFAULT_STATUS[type] if status is None else status
        if not 400 <= status <= 599:
            raise ValueError(f"a problem needs a 4xx or 5xx status, not {status}")
        super().__init__(detail)
        self.type = type
        self.detail = detail
        self.status = status
        self.subproblems: list[dict[str, Any]] | None = None
        if subproblems is not None:
            self.subproblems = [p.to_json() if isinstance(p, AcmeProblem) else dict(p)
                                for p in subproblems]
        # §6.7.1: "identifier" belongs in subproblems only; a problem that has one is meant to be
        # passed in another problem's subproblems, not rendered at the top level.
        self.identifier = dict(identifier) if identifier is not None else None
        self.algorithms = list(algorithms) if algorithms is not None else None
        self.instance = instance

    @property
    def urn(self) -> str:
        return ERROR_NAMESPACE + self.type

    def to_json(self) -> dict[str, Any]:
        """The problem document: type, detail, status, and whichever optional members are set."""
        document: dict[str, Any] = {"type": self.urn, "detail": self.detail,
                                    "status": self.status}
        if self.subproblems is not None:
            document["subproblems"] = [dict(p) for p in self.subproblems]
        if self.identifier is not None:
            document["identifier"] = dict(self.identifier)
        if self.algorithms is not None:
            document["algorithms"] = list(self.algorithms)
        if self.instance is not None:
            document["instance"] = self.instance
        return document

    def __repr__(self) -> str:
        return f"AcmeProblem({self.type!r}, {self.detail!r}, {self.status})"

    # -- one constructor per RFC 8555 §6.7 type ------------------------------------------------
    @classmethod
    def account_does_not_exist(cls, detail: str, **o: Unpack[ProblemOptions]) -> AcmeProblem:
        """The request specified an account that does not exist (400)."""
        return cls("accountDoesNotExist", detail, **o)

    @classmethod
    def already_revoked(cls, detail: str, **o: Unpack[ProblemOptions]) -> AcmeProblem:
        """The certificate to be revoked is already revoked (400)."""
        return cls("alreadyRevoked", detail, **o)

    @classmethod
    def bad_csr(cls, detail: str, **o: Unpack[ProblemOptions]) -> AcmeProblem:
        """The CSR is unacceptable (400)."""
        return cls("badCSR", detail, **o)

    @classmethod
    def bad_nonce(cls, detail: str, **o: Unpack[ProblemOptions]) -> AcmeProblem:
        """The anti-replay nonce is missing or unacceptable (400); send a fresh Replay-Nonce."""
        return cls("badNonce", detail, **o)

    @classmethod
    def bad_public_key(cls, detail: str, **o: Unpack[ProblemOptions]) -> AcmeProblem:
        """The JWS key is of a kind or strength the server does not accept (400)."""
        return cls("badPublicKey", detail, **o)

    @classmethod
    def bad_revocation_reason(cls, detail: str, **o: Unpack[ProblemOptions]) -> AcmeProblem:
        """The revocation reason is not allowed (400)."""
        return cls("badRevocationReason", detail, **o)

    @classmethod
    def bad_signature_algorithm(cls, detail: str, algorithms: Sequence[str],
                                **o: Unpack[ProblemOptions]) -> AcmeProblem:
        """The JWS alg is not supported (400); §6.2 requires the list of supported algs."""
        return cls("badSignatureAlgorithm", detail, algorithms=algorithms, **o)

    @classmethod
    def caa(cls, detail: str, **o: Unpack[ProblemOptions]) -> AcmeProblem:
        """CAA records forbid issuance (403)."""
        return cls("caa", detail, **o)

    @classmethod
    def compound(cls, detail: str, subproblems: Sequence[AcmeProblem | Mapping[str, Any]],
                 status: int | None = None) -> AcmeProblem:
        """Several problems; the specific ones are in `subproblems` (400 unless told)."""
        return cls("compound", detail, status, subproblems=subproblems)

    @classmethod
    def connection(cls, detail: str, **o: Unpack[ProblemOptions]) -> AcmeProblem:
        """The server could not connect to the validation target (400)."""
        return cls("connection", detail, **o)

    @classmethod
    def dns(cls, detail: str, **o: Unpack[ProblemOptions]) -> AcmeProblem:
        """A DNS query during validation failed (400)."""
        return cls("dns", detail, **o)

    @classmethod
    def external_account_required(cls, detail: str,
                                  **o: Unpack[ProblemOptions]) -> AcmeProblem:
        """newAccount needs an externalAccountBinding (400)."""
        return cls("externalAccountRequired", detail, **o)

    @classmethod
    def incorrect_response(cls, detail: str, **o: Unpack[ProblemOptions]) -> AcmeProblem:
        """The challenge response did not match (403)."""
        return cls("incorrectResponse", detail, **o)

    @classmethod
    def invalid_contact(cls, detail: str, **o: Unpack[ProblemOptions]) -> AcmeProblem:
        """A contact URL of a supported scheme is invalid (400)."""
        return cls("invalidContact", detail, **o)

    @classmethod
    def malformed(cls, detail: str, **o: Unpack[ProblemOptions]) -> AcmeProblem:
        """The request message was malformed (400)."""
        return cls("malformed", detail, **o)

    @classmethod
    def order_not_ready(cls, detail: str, **o: Unpack[ProblemOptions]) -> AcmeProblem:
        """The order cannot be finalized yet (403)."""
        return cls("orderNotReady", detail, **o)

    @classmethod
    def rate_limited(cls, detail: str, **o: Unpack[ProblemOptions]) -> AcmeProblem:
        """A rate limit is exceeded (429); the edge should add Retry-After."""
        return cls("rateLimited", detail, **o)

    @classmethod
    def rejected_identifier(cls, detail: str, **o: Unpack[ProblemOptions]) -> AcmeProblem:
        """The server will not issue for the identifier (400)."""
        return cls("rejectedIdentifier", detail, **o)

    @classmethod
    def server_internal(cls, detail: str = "internal server error",
                        **o: Unpack[ProblemOptions]) -> AcmeProblem:
        """The server failed (500); the detail must not describe the internals."""
        return cls("serverInternal", detail, **o)

    @classmethod
    def tls(cls, detail: str, **o: Unpack[ProblemOptions]) -> AcmeProblem:
        """A TLS error during validation (400)."""
        return cls("tls", detail, **o)

    @classmethod
    def unauthorized(cls, detail: str, **o: Unpack[ProblemOptions]) -> AcmeProblem:
        """The client lacks authorization (403; 401 for a deactivated account, §7.3.6)."""
        return cls("unauthorized", detail, **o)

    @classmethod
    def unsupported_contact(cls, detail: str, **o: Unpack[ProblemOptions]) -> AcmeProblem:
        """A contact URL uses an unsupported scheme (400); say which schemes are accepted."""
        return cls("unsupportedContact", detail, **o)

    @classmethod
    def unsupported_identifier(cls, detail: str, **o: Unpack[ProblemOptions]) -> AcmeProblem:
        """An identifier is of an unsupported type (400)."""
        return cls("unsupportedIdentifier", detail, **o)

    @classmethod
    def user_action_required(cls, detail: str, instance: str,
                             **o: Unpack[ProblemOptions]) -> AcmeProblem:
        """A human must visit `instance` (403); §7.3.3 requires the URL."""
        return cls("userActionRequired", detail, instance=instance, **o)


def from_appliance_error(error: ApplianceError) -> AcmeProblem:
    """The problem an ACME client sees for a typed appliance error.

    4xx keep their status and requester-facing message, typed by the error's `acme_type`
    (malformed when that is not a 4xx ACME type). 5xx keep their status (a 503 tells the client
    to retry) but become serverInternal with a generic detail: their message may hold internals.
    """
    status = error.status
    if not 400 <= status <= 499:
        if status == 503:
            return AcmeProblem.server_internal(
                "the service is temporarily unavailable; try again later", status=503)
        return AcmeProblem.server_internal(status=status if 500 <= status <= 599 else 500)
    problem_type = error.acme_type
    if problem_type not in DEFAULT_STATUS or problem_type == "serverInternal":
        problem_type = "malformed"
    return AcmeProblem(problem_type, error.message, status)
