"""The parts of bench/issuance.py and bench/acme.py, one concern each.

common: paths, constants and small helpers; ca: the throwaway CA and its server; cpu: where the
CPU goes (/proc accounting and py-spy); raw_sign: the token's raw signing rate; tokens: request
bodies with one-time tokens; load_python and load_wrk: the two load generators; report: the
table, the target verdict and the database check.
"""
