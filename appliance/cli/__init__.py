"""applianctl: the administration and client command line."""
