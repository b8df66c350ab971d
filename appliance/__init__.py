"""Hardened certificate-authority appliance whose CA keys live in a PKCS#11 token."""

__version__ = "0.1.0"
