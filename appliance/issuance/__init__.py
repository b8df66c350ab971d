"""How a certificate is made: request -> intent recorded -> token signature -> record -> return."""
