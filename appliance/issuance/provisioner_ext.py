"""step-ca's provisioner extension: which provisioner authorised a certificate.

OID 1.3.6.1.4.1.37476.9000.64.1, value DER SEQUENCE { type INTEGER, name OCTET STRING,
credentialID OCTET STRING, keyValuePairs SEQUENCE OF UTF8String OPTIONAL }. Writing the same
extension as step-ca lets tools that read it (e.g. `step certificate inspect`) show ours too.
"""

from __future__ import annotations

from cryptography import x509

PROVISIONER_OID = x509.ObjectIdentifier("1.3.6.1.4.1.37476.9000.64.1")
PROVISIONER_TYPES = {"JWK": 1, "OIDC": 2, "GCP": 3, "AWS": 4, "Azure": 5, "ACME": 6, "X5C": 7,
                     "K8sSA": 8, "SSHPOP": 9, "SCEP": 10, "Nebula": 11}


def _der(tag: int, body: bytes) -> bytes:
    n = len(body)
    if n < 0x80:
        length = bytes([n])
    else:
        raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(raw)]) + raw
    return bytes([tag]) + length + body


def provisioner_extension(kind: str, name: str, credential_id: str) -> x509.Extension[
        x509.ExtensionType]:
    """The non-critical extension naming the provisioner (type, name, credential id)."""
    kind_code = PROVISIONER_TYPES[kind]
    value = _der(0x30, _der(0x02, bytes([kind_code])) + _der(0x04, name.encode())
                 + _der(0x04, credential_id.encode()))
    return x509.Extension(PROVISIONER_OID, False, x509.UnrecognizedExtension(PROVISIONER_OID,
                                                                              value))


def provisioner_name_of(cert: x509.Certificate) -> str | None:
    """The provisioner name recorded in a certificate's extension, if any."""
    try:
        ext = cert.extensions.get_extension_for_oid(PROVISIONER_OID)
    except x509.ExtensionNotFound:
        return None
    value = ext.value
    if not isinstance(value, x509.UnrecognizedExtension):
        return None
    data = value.value
    try:
        pos = 2 if data[1] < 0x80 else 2 + (data[1] & 0x7F)  # inside the SEQUENCE
        pos += 2 + data[pos + 1]  # skip the INTEGER
        if data[pos] != 0x04:
            return None
        length = data[pos + 1]
        if length >= 0x80:
            return None
        return data[pos + 2:pos + 2 + length].decode()
    except (IndexError, UnicodeDecodeError):
        return None
