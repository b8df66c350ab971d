"""Bringing the issuer key online: a password file, or an M-of-N quorum of custodian shares."""
