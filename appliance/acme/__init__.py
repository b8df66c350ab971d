"""RFC 8555 ACME server: directory, nonces, accounts, orders, authorizations, challenges."""
