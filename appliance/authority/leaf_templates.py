"""What a plan's certificate says: the provisioner's template, or the built-in default leaf.

Both answer `describe(plan) -> CertificateDescription`; the default leaf is step-ca's default
leaf template (the authorized subject as CN, the authorized names as SANs, serverAuth and
clientAuth) written in Python, because it runs on every issuance of the hot path.
"""

from __future__ import annotations

from typing import Protocol

from cryptography import x509
from cryptography.x509.oid import NameOID

from appliance.authority.plan import SignPlan
from appliance.issuance.names import san_to_text, sans_of
from appliance.issuance.templates import CertificateDescription, TemplateData, X509Template


class LeafTemplate(Protocol):
    def describe(self, plan: SignPlan) -> CertificateDescription: ...


class DefaultLeaf:
    """step-ca's DefaultLeafTemplate: {"subject": {"commonName": .Subject.CommonName},
    "sans": .SANs, keyUsage by key type, extKeyUsage serverAuth + clientAuth}."""

    def describe(self, plan: SignPlan) -> CertificateDescription:
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, plan.subject)]
                            if plan.subject else [])
        return CertificateDescription(
            subject=subject, sans=plan.sans, key_usage=None, ext_key_usage=None,
            basic_constraints=None, crl_distribution_points=(), extensions=())


class OperatorTemplate:
    """A provisioner's ca.json template (options.x509.template / templateFile), sandboxed."""

    def __init__(self, template: X509Template) -> None:
        self.compiled = template

    def describe(self, plan: SignPlan) -> CertificateDescription:
        csr = plan.csr
        cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME) if csr else []
        return self.compiled.render(TemplateData(
            subject=plan.subject or "", sans=tuple(san_to_text(n) for n in plan.sans),
            token=plan.trusted_data, csr_subject=str(cns[0].value) if cns else None,
            csr_sans=tuple(san_to_text(n) for n in sans_of(csr)) if csr else (),
            user=plan.untrusted_data, provisioner_data=plan.provisioner.template_data))


DEFAULT_LEAF = DefaultLeaf()


def leaf_template_of(template: X509Template | None) -> LeafTemplate:
    return DEFAULT_LEAF if template is None else OperatorTemplate(template)
