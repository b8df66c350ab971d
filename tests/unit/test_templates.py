"""Certificate templates: what an operator writes in options.x509.template lands in the certificate,
and nothing a template or a requester does can escape the sandbox or make a CA certificate."""

import base64
import ipaddress
import json
import subprocess
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

from appliance.errors import BadRequest, ConfigError
from appliance.issuance.provisioner_ext import PROVISIONER_OID
from appliance.issuance.templates import (
    MAX_OUTPUT_BYTES,
    MAX_TEMPLATE_BYTES,
    CertificateDescription,
    TemplateData,
    X509Template,
)

UTF8_HELLO_DER = bytes([0x0C, 0x05]) + b"hello"  # UTF8String "hello"
CUSTOM_OID = "1.3.6.1.4.1.55555.1.2"


def data(**overrides: Any) -> TemplateData:
    values: dict[str, Any] = dict(
        subject="web.test",
        sans=("web.test", "192.0.2.7"),
        token={"iss": "ops", "sub": "web.test", "sans": ["web.test", "192.0.2.7"]},
        csr_subject="web.test",
        csr_sans=("web.test",),
        user={},
        provisioner_data={},
    )
    values.update(overrides)
    return TemplateData(**values)


def build_certificate(desc: CertificateDescription) -> x509.Certificate:
    """Self-sign what a template described, the way the issuer will, to see the fields land."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    key_usage = desc.key_usage or x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
        encipher_only=False, decipher_only=False)
    eku = desc.ext_key_usage or (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH)
    builder = (
        x509.CertificateBuilder()
        .subject_name(desc.subject).issuer_name(desc.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + timedelta(hours=1))
        .add_extension(key_usage, critical=True)
        .add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
        .add_extension(desc.basic_constraints or x509.BasicConstraints(ca=False, path_length=None),
                       critical=True)
    )
    if desc.sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(desc.sans)),
                                        critical=len(desc.subject) == 0)
    if desc.crl_distribution_points:
        builder = builder.add_extension(x509.CRLDistributionPoints([
            x509.DistributionPoint([x509.UniformResourceIdentifier(u)], None, None, None)
            for u in desc.crl_distribution_points]), critical=False)
    for ext in desc.extensions:
        builder = builder.add_extension(ext.value, critical=ext.critical)
    cert = builder.sign(key, hashes.SHA256())
    # Round-trip through DER so the assertions read what a relying party would parse.
    return x509.load_der_x509_certificate(cert.public_bytes(serialization.Encoding.DER))


def names(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> list[str]:
    return [str(a.value) for a in cert.subject.get_attributes_for_oid(oid)]


def test_default_leaf_round_trip() -> None:
    template = X509Template.default_leaf()
    template.check()
    desc = template.render(data())
    assert desc.subject.rfc4514_string() == "CN=web.test"
    assert desc.sans == (x509.DNSName("web.test"),
                         x509.IPAddress(ipaddress.ip_address("192.0.2.7")))
    assert desc.key_usage is None and desc.ext_key_usage is None, \
        "the default template must leave key usages to the issuer's defaults"
    assert desc.basic_constraints is None and desc.extensions == ()
    cert = build_certificate(desc)
    assert names(cert, NameOID.COMMON_NAME) == ["web.test"]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["web.test"]


def test_default_leaf_without_subject_keeps_sans() -> None:
    desc = X509Template.default_leaf().render(data(subject="", sans=("a.test",)))
    assert len(desc.subject) == 0 and desc.sans == (x509.DNSName("a.test"),)


CUSTOM = """{
    "subject": {
        "commonName": {{ Subject.CommonName | toJson }},
        "organization": {{ Data.organization | toJson }},
        "country": "DE"
    },
    "sans": {{ (SANs + [{"type": "dns", "value": Data.extraName}]) | toJson }},
    "keyUsage": ["digitalSignature", "keyAgreement"],
    "extKeyUsage": ["clientAuth", "codeSigning", "{{ Data.customEku }}"],
    "basicConstraints": {"isCA": false, "maxPathLen": 0},
    "crlDistributionPoints": ["http://crl.example.test/ca.crl"],
    "extensions": [
        {"id": "{{ Data.extOid }}", "critical": false, "value": {{ Data.extValue | toJson }}}
    ]
}"""

CUSTOM_DATA = {
    "organization": "Acme Robotics",
    "extraName": "Metrics.Web.Test",
    "customEku": "1.3.6.1.4.1.55555.3",
    "extOid": CUSTOM_OID,
    "extValue": base64.b64encode(UTF8_HELLO_DER).decode(),
}


def test_custom_template_fields_land_in_the_certificate() -> None:
    template = X509Template.compile(CUSTOM, name="robots")
    template.check(provisioner_data=CUSTOM_DATA)
    cert = build_certificate(template.render(data(provisioner_data=CUSTOM_DATA)))

    assert names(cert, NameOID.ORGANIZATION_NAME) == ["Acme Robotics"]
    assert names(cert, NameOID.COUNTRY_NAME) == ["DE"]
    assert names(cert, NameOID.COMMON_NAME) == ["web.test"]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["web.test", "metrics.web.test"], \
        "the extra SAN from Data must be added (lowercased) after the authorised ones"
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("192.0.2.7")]
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and ku.key_agreement and not ku.key_encipherment
    assert not ku.key_cert_sign and not ku.crl_sign
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.CODE_SIGNING,
                         x509.ObjectIdentifier("1.3.6.1.4.1.55555.3")]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    cdp = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    assert cdp[0].full_name == [x509.UniformResourceIdentifier("http://crl.example.test/ca.crl")]
    extra = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(CUSTOM_OID))
    assert extra.critical is False
    assert isinstance(extra.value, x509.UnrecognizedExtension)
    assert extra.value.value == UTF8_HELLO_DER

    # And a second parser agrees: openssl reads the same fields out of the DER.
    text = subprocess.run(["openssl", "x509", "-inform", "DER", "-noout", "-text"],
                          input=cert.public_bytes(serialization.Encoding.DER),
                          capture_output=True, check=True).stdout.decode()
    for expected in ("O = Acme Robotics", "DNS:metrics.web.test", "Code Signing",
                     "1.3.6.1.4.1.55555.3", f"{CUSTOM_OID}:", "CA:FALSE",
                     "URI:http://crl.example.test/ca.crl"):
        assert expected in text, f"openssl does not show {expected!r} in:\n{text}"


def test_check_with_provisioner_data_catches_a_typo_in_a_data_key() -> None:
    template = X509Template.compile(CUSTOM, name="robots")
    with pytest.raises(ConfigError, match=r"robots.*has no attribute 'extraName'"):
        template.check(provisioner_data={k: v for k, v in CUSTOM_DATA.items()
                                         if k != "extraName"})


USER_OU = """{
    "subject": {
        "commonName": {{ Subject.CommonName | toJson }},
        "organizationalUnit": {{ Insecure.User.team | default("unassigned") | toJson }}
    },
    "sans": {{ SANs | toJson }}
}"""


def test_insecure_user_data_in_subject_ou() -> None:
    template = X509Template.compile(USER_OU)
    template.check()
    cert = build_certificate(template.render(data(user={"team": "Payments"})))
    assert names(cert, NameOID.ORGANIZATIONAL_UNIT_NAME) == ["Payments"]
    desc = template.render(data(user={}))
    assert [a.value for a in desc.subject.get_attributes_for_oid(
        NameOID.ORGANIZATIONAL_UNIT_NAME)] == ["unassigned"]


def test_insecure_user_data_cannot_inject_json_or_control_characters() -> None:
    template = X509Template.compile(USER_OU)
    injected = template.render(data(user={"team": 'x", "commonName": "evil'}))
    assert [a.value for a in injected.subject.get_attributes_for_oid(
        NameOID.ORGANIZATIONAL_UNIT_NAME)] == ['x", "commonName": "evil'], \
        "toJson must quote requester data so it stays one string"
    assert [a.value for a in injected.subject.get_attributes_for_oid(NameOID.COMMON_NAME)] == [
        "web.test"]
    with pytest.raises(BadRequest, match="control character"):
        template.render(data(user={"team": "a\x00b"}))
    with pytest.raises(BadRequest, match="templateData must be JSON"):
        template.render(data(user={"team": object()}))


def test_insecure_certificate_request_values() -> None:
    template = X509Template.compile(
        '{"subject": {"commonName": {{ Insecure.CR.Subject.CommonName | toJson }}},'
        ' "sans": {{ Insecure.CR.SANs | toJson }}}')
    desc = template.render(data(csr_subject="csr.test", csr_sans=("csr.test", "10.1.2.3")))
    assert desc.subject.rfc4514_string() == "CN=csr.test"
    assert desc.sans == (x509.DNSName("csr.test"),
                         x509.IPAddress(ipaddress.ip_address("10.1.2.3")))


def test_typo_in_variable_is_an_error_naming_it_and_the_line() -> None:
    template = X509Template.compile('{\n  "subject": {{ Subject.CommonNmae | toJson }}\n}',
                                    name="typo")
    with pytest.raises(BadRequest, match=r"typo line 2: .*no attribute 'CommonNmae'"):
        template.render(data())
    with pytest.raises(ConfigError, match="CommonNmae"):
        template.check()
    with pytest.raises(BadRequest, match="'Subjcet' is undefined"):
        X509Template.compile('{"subject": {{ Subjcet | toJson }}}').render(data())


def test_syntax_error_names_the_line() -> None:
    with pytest.raises(ConfigError, match=r"broken: line 3: "):
        X509Template.compile('{\n  "subject": "x",\n  {% if %}\n}', name="broken")


@pytest.mark.parametrize("source", [
    "{{ ''.__class__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ self }}",
    "{{ self._TemplateReference__context }}",
    "{{ Data['__class__'] }}",
    "{{ ''|attr('__class__') }}",
    "{% include 'other' %}",
    "{% import 'other' as o %}",
    "{% extends 'base' %}",
    "{{ (Data|attr(Insecure.User.key)).__name__ }}",
    "{{ namespace.__init__ }}",
    "{{ range.__self__ }}",
])
def test_sandbox_escapes_refused_at_compile(source: str) -> None:
    with pytest.raises(ConfigError, match="line 1"):
        X509Template.compile(source)


@pytest.mark.parametrize(("source", "message"), [
    ("{{ ''|attr('__cla' ~ 'ss__') }}", "unsafe"),
    ("{{ Data[Insecure.User.key] }}", "unsafe"),
    ("{{ lipsum() }}", "'lipsum' is undefined"),
    ("{{ SANs.append(1) }}", "unsafe|cannot|not safely callable"),
    ("{{ Data.update({'a': 1}) }}", "unsafe|cannot|not safely callable"),
    ("{{ 'x' * 1000000000 }}", "too large"),
    ("{{ 7 ** 100000000 }}", "too large"),
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "recursion"),
    ("{{ range(1000000) | list }}", "Range too big"),
])
def test_sandbox_escapes_refused_at_render(source: str, message: str) -> None:
    template = X509Template.compile(source)
    with pytest.raises(BadRequest, match=message):
        template.render(data(user={"key": "__class__"}))
    with pytest.raises(ConfigError):
        template.check()


def test_fail_refuses_with_the_operators_message() -> None:
    template = X509Template.compile(
        '{% if not Insecure.User.team is defined %}{{ fail("templateData.team is required") }}'
        '{% endif %}{"subject": {{ Insecure.User.team | toJson }}}')
    with pytest.raises(BadRequest, match="refused the request: templateData.team is required"):
        template.render(data())
    assert template.render(data(user={"team": "x"})).subject.rfc4514_string() == "CN=x"
    template.check()  # refusing the placeholder request is not a broken template


CA_TEMPLATE = ('{"subject": {{ Subject | toJson }}, '
               '"basicConstraints": {"isCA": true, "maxPathLen": 0}}')


def test_ca_certificate_refused() -> None:
    template = X509Template.compile(CA_TEMPLATE, name="sneaky")
    with pytest.raises(BadRequest, match="isCA true is refused"):
        template.render(data())
    with pytest.raises(ConfigError, match="sneaky.*isCA true is refused"):
        template.check()
    with pytest.raises(BadRequest, match="maxPathLen only applies to CA"):
        X509Template.compile('{"subject": "x", "basicConstraints": {"isCA": false, '
                             '"maxPathLen": 2}}').render(data())


@pytest.mark.parametrize("usage", ["certSign", "crlSign", "keyCertSign", "CERTSIGN"])
def test_cert_sign_and_crl_sign_refused(usage: str) -> None:
    template = X509Template.compile(
        f'{{"subject": "x", "keyUsage": ["digitalSignature", "{usage}"]}}')
    with pytest.raises(BadRequest, match=f"keyUsage {usage} is for CA certificates"):
        template.render(data())
    with pytest.raises(ConfigError, match="for CA certificates"):
        template.check()


def test_raw_extensions_cannot_smuggle_ca_or_managed_extensions() -> None:
    ca_true = base64.b64encode(x509.BasicConstraints(ca=True, path_length=None).public_bytes())
    for oid, why in [(ExtensionOID.BASIC_CONSTRAINTS, "basicConstraints field"),
                     (ExtensionOID.KEY_USAGE, "keyUsage field"),
                     (ExtensionOID.NAME_CONSTRAINTS, "CA certificates"),
                     (ExtensionOID.SUBJECT_KEY_IDENTIFIER, "the issuer sets"),
                     (PROVISIONER_OID, "records the provisioner itself")]:
        source = json.dumps({"subject": "x", "extensions": [
            {"id": oid.dotted_string, "critical": True, "value": ca_true.decode()}]})
        with pytest.raises(BadRequest, match=why):
            X509Template.compile(source).render(data())


@pytest.mark.parametrize(("extension", "message"), [
    ({"id": CUSTOM_OID, "value": "ZXh0ZW5zaW9u"}, "not one DER-encoded"),
    ({"id": CUSTOM_OID, "value": "not base64!"}, "not valid base64"),
    ({"id": "1.2.x", "value": "BQA="}, "not a dotted OID"),
    ({"id": CUSTOM_OID, "critical": "yes", "value": "BQA="}, "critical must be true or false"),
    ({"id": CUSTOM_OID}, "needs a value"),
])
def test_bad_extensions_named(extension: dict[str, Any], message: str) -> None:
    source = json.dumps({"subject": "x", "extensions": [extension]})
    with pytest.raises(BadRequest, match=message):
        X509Template.compile(source).render(data())


def test_bad_json_output_message_points_at_the_output_line() -> None:
    template = X509Template.compile('{\n  "subject": {{ Subject.CommonName }}\n}', name="raw")
    with pytest.raises(BadRequest, match=r"not valid JSON: Expecting value at output line 2 "
                                         r"column 14$"):
        template.render(data())
    with pytest.raises(ConfigError, match=r"raw: .*not valid JSON: .* output line 2 .*"
                                          r"check\.example\.com"):
        template.check()  # the operator, not the requester, sees the offending output line
    with pytest.raises(BadRequest, match="must be a JSON object"):
        X509Template.compile("[1, 2]").render(data())
    with pytest.raises(BadRequest, match="key 'subject' twice"):
        X509Template.compile('{"subject": "a", "subject": "b"}').render(data())
    with pytest.raises(BadRequest, match="contains NaN, which is not JSON"):
        X509Template.compile('{"subject": "a", "sans": NaN}').render(data())


def test_unknown_keys_named() -> None:
    with pytest.raises(BadRequest, match=r"template output has an unknown key 'dnsNames'"):
        X509Template.compile('{"subject": "x", "dnsNames": ["a.test"]}').render(data())
    with pytest.raises(BadRequest, match=r"subject has an unknown key 'title'"):
        X509Template.compile('{"subject": {"commonName": "x", "title": "y"}}').render(data())
    with pytest.raises(BadRequest, match=r"extKeyUsage 'anyPurpose' is unknown"):
        X509Template.compile('{"subject": "x", "extKeyUsage": ["anyPurpose"]}').render(data())
    with pytest.raises(BadRequest, match=r"SAN type 'otherName' is not supported"):
        X509Template.compile(
            '{"sans": [{"type": "otherName", "value": "x"}]}').render(data())


def test_bad_field_values_named() -> None:
    cases = [
        ('{"subject": {"country": "Germany"}}', "two-letter code"),
        ('{"subject": {"commonName": ["a", "b"]}}', "commonName must be a string"),
        ('{"subject": {"commonName": "' + "a" * 65 + '"}}', "longer than 64"),
        ('{"sans": [{"type": "ip", "value": "300.1.1.1"}]}', "not an IP address"),
        ('{"sans": [{"type": "dns", "value": "bad_name.test"}]}', "not a valid DNS name"),
        ('{"subject": "x", "keyUsage": []}', "at least one usage"),
        ('{"subject": "x", "keyUsage": ["encipherOnly"]}', "need keyAgreement"),
        ('{"subject": "x", "crlDistributionPoints": ["file:///etc/passwd"]}', "http, https"),
        ('{}', "neither a subject nor any SANs"),
    ]
    for source, message in cases:
        with pytest.raises(BadRequest, match=message):
            X509Template.compile(source).render(data())


def test_size_limits() -> None:
    with pytest.raises(ConfigError, match=f"larger than {MAX_TEMPLATE_BYTES} bytes"):
        X509Template.compile("{}" + " " * MAX_TEMPLATE_BYTES)
    padded = '{"subject": "x"}' + " " * (MAX_TEMPLATE_BYTES - 100)
    assert X509Template.compile(padded).render(data()).subject.rfc4514_string() == "CN=x"
    big = X509Template.compile('{"subject": "x", "sans": [{% for i in range(10000) %}'
                               '"n{{ i }}.test",{% endfor %} "last.test"]}', name="big")
    with pytest.raises(BadRequest, match=f"larger than {MAX_OUTPUT_BYTES} bytes"):
        big.render(data())
    with pytest.raises(ConfigError, match=f"big: .*larger than {MAX_OUTPUT_BYTES} bytes"):
        big.check()
    # Requester data is counted too: a huge templateData value cannot slip past the bound.
    with pytest.raises(BadRequest, match=f"larger than {MAX_OUTPUT_BYTES} bytes"):
        X509Template.compile(USER_OU).render(data(user={"team": "x" * MAX_OUTPUT_BYTES}))


def test_case_insensitive_keys_like_step_and_dedupe() -> None:
    desc = X509Template.compile(
        '{"Subject": {"CommonName": "x", "Organization": ["A", "B"]},'
        ' "SANs": ["a.test", "A.TEST", {"Type": "EMAIL", "Value": "ops@Example.TEST"}],'
        ' "ExtKeyUsage": "serverAuth"}').render(data())
    assert desc.subject.rfc4514_string() == "CN=x,O=B,O=A"
    assert desc.sans == (x509.DNSName("a.test"), x509.RFC822Name("ops@example.test"))
    assert desc.ext_key_usage == (ExtendedKeyUsageOID.SERVER_AUTH,)
