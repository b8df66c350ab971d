"""Who may get what: provisioners, claims, CSR and key policy."""
