"""The server's own TLS: a certificate from its intermediate, loaded from memory, never a file."""

from __future__ import annotations

import os
import ssl
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from appliance.authority.authority import Authority
from appliance.config import CIPHER_SUITES, TlsConfig
from appliance.fileio import write_atomic

_VERSIONS = {1.2: ssl.TLSVersion.TLSv1_2, 1.3: ssl.TLSVersion.TLSv1_3}


async def issue_server_certificate(authority: Authority, dns_names: list[str]
                                   ) -> tuple[bytes, bytes, datetime]:
    """A fresh key and a 24-hour certificate for the configured names: (chain PEM, key PEM, end).

    The authority's system provisioner authorizes it; it takes the way every certificate takes.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    issued = await authority.issue_server_tls(key.public_key(), dns_names)
    chain = "".join(issued.pem_chain()).encode()
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return chain, key_pem, issued.certificate.not_valid_after_utc


def _memfile(data: bytes) -> int:
    fd = os.memfd_create("appliance-tls", os.MFD_CLOEXEC)
    os.write(fd, data)
    return fd


def load_chain(context: ssl.SSLContext, chain_pem: bytes, key_pem: bytes) -> None:
    """Load (or replace, for later handshakes) the server certificate without touching disk."""
    chain_fd, key_fd = _memfile(chain_pem), _memfile(key_pem)
    try:
        context.load_cert_chain(f"/proc/self/fd/{chain_fd}", f"/proc/self/fd/{key_fd}")
    finally:
        os.close(chain_fd)
        os.close(key_fd)


def server_context(tls: TlsConfig, chain_pem: bytes, key_pem: bytes,
                   client_root_pem: str | None = None) -> ssl.SSLContext:
    """TLS 1.2+ with step-ca's cipher suites, no renegotiation, no compression.

    With `client_root_pem`, clients may present a certificate (renew, rekey, revoke over mTLS);
    the handshake checks it chains to the root, and the handlers check it is one we recorded.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    if client_root_pem:
        context.verify_mode = ssl.CERT_OPTIONAL
        context.load_verify_locations(cadata=client_root_pem)
    context.minimum_version = _VERSIONS[tls.min_version]
    context.maximum_version = _VERSIONS[tls.max_version]
    context.set_ciphers(":".join(CIPHER_SUITES[s] for s in tls.cipher_suites))
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    if not tls.renegotiation:
        context.options |= ssl.OP_NO_RENEGOTIATION
    context.set_alpn_protocols(["http/1.1"])
    load_chain(context, chain_pem, key_pem)
    return context


def save_server_tls(directory: Path, chain_pem: bytes, key_pem: bytes) -> None:
    """Quorum mode only: keep the server's TLS key (0600) so a sealed restart can serve HTTPS.

    It is the key of a 24-hour leaf, never a CA key; in password mode it stays in memory.
    """
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    for name, data, mode in (("server.key", key_pem, 0o600), ("server.crt", chain_pem, 0o644)):
        write_atomic(directory / name, data, mode)


def load_server_tls(directory: Path) -> tuple[bytes, bytes, datetime] | None:
    try:
        chain = (directory / "server.crt").read_bytes()
        key = (directory / "server.key").read_bytes()
        leaf = x509.load_pem_x509_certificate(chain)
    except (FileNotFoundError, ValueError):
        return None
    return chain, key, leaf.not_valid_after_utc
