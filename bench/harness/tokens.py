"""Request bodies for POST /1.0/sign, each with its own one-time token, and the check of an answer.

Both load generators send pre-minted bodies, so the timed phase spends the load generator's CPU
on HTTP (ES256 signing in Python is the slow part of minting).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from harness.common import TOKEN_LIFETIME


def sign_request_bodies(encrypted_key: str, password: bytes, provisioner: str, url: str,
                        root_fingerprint: str, subject: str, count: int) -> Iterator[str]:
    """`count` JSON bodies for `subject`: one CSR, every body with its own one-time token."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from appliance.authority.provisioners.jwk_keys import decrypt_private_key
    from appliance.authority.provisioners.jwk_tokens import TokenSigner
    from appliance.client import make_csr

    key, _ = decrypt_private_key(encrypted_key, password)
    signer = TokenSigner.for_key(key, provisioner)
    csr_pem = make_csr(ec.generate_private_key(ec.SECP256R1()), subject, [subject]).public_bytes(
        serialization.Encoding.PEM).decode()
    for _ in range(count):
        yield json.dumps({"csr": csr_pem, "ott": signer.mint(
            subject, audience=url, sans=[subject], root_fingerprint=root_fingerprint,
            lifetime=TOKEN_LIFETIME)})


def check_answer(body: str | bytes, subject: str, intermediate: Any) -> None:
    """Verify one answer fully: a leaf for `subject` signed by the intermediate, and the chain."""
    from cryptography import x509

    data = json.loads(body)
    cert = x509.load_pem_x509_certificate(data["crt"].encode())
    cert.verify_directly_issued_by(intermediate)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == [subject], names
    assert len(data["certChain"]) == 2, "certChain should be leaf + intermediate"
