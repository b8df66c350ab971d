"""Provisioners: each authenticates a request and returns what it may be issued."""
