"""The process model: supervisor, workers, connection hand-over, sd_notify, the server's TLS.

Empty on purpose: importing a helper (`appliance.server.composition`) must not import the
supervisor and everything it serves.
"""
