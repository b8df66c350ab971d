"""Ceremonies run once, by an administrator: creating the CA and setting up its quorum."""
