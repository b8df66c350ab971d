"""The HTTP API: step-ca routes and JSON shapes, mounted at / and /1.0."""
