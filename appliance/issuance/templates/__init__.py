"""Certificate templates: a provisioner's Jinja2 template renders a JSON certificate description.

This is step-ca's `options.x509.template` with Jinja2 in place of Go templates. The template runs
in a sandbox (sandbox.py: the environment and the functions a template may call); X509Template
and TemplateData (x509_template.py) compile it, give it the request's values and bound its
output; the JSON it produces becomes a typed CertificateDescription (description.py), and
anything that would make a CA certificate is refused.
"""

from appliance.issuance.templates.description import CertificateDescription
from appliance.issuance.templates.sandbox import MAX_VALUE_SIZE
from appliance.issuance.templates.x509_template import (
    DEFAULT_LEAF_SOURCE,
    MAX_OUTPUT_BYTES,
    MAX_TEMPLATE_BYTES,
    TemplateData,
    X509Template,
)

__all__ = [
    "DEFAULT_LEAF_SOURCE",
    "MAX_OUTPUT_BYTES",
    "MAX_TEMPLATE_BYTES",
    "MAX_VALUE_SIZE",
    "CertificateDescription",
    "TemplateData",
    "X509Template",
]
