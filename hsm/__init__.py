"""Everything PKCS#11: CA keys that live in a token and never leave it.

Nothing outside this package imports pkcs11; nothing in it imports from appliance.
"""
