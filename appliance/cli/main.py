"""applianctl: `step ca`-style commands. Errors are one line on stderr and a non-zero exit.

This module only assembles the command modules on the group of cli/app.py; `main` is the
console script's entry point.
"""

from __future__ import annotations

from appliance.cli import (
    acme_admin,
    audit_cmd,
    ca_admin,
    client_cmds,
    kms,
    lifecycle,
    provisioners,
    unlock,
)
from appliance.cli.app import cli

for command in (
    ca_admin.init, ca_admin.serve,
    client_cmds.bootstrap, client_cmds.root, client_cmds.health, client_cmds.token,
    client_cmds.certificate, client_cmds.sign,
    lifecycle.renew, lifecycle.rekey, lifecycle.revoke, lifecycle.crl,
    provisioners.provisioner, acme_admin.acme, audit_cmd.audit, kms.kms,
    unlock.unlock, unlock.seal, unlock.rekey_shares_cmd,
):
    cli.add_command(command)


def main() -> None:
    cli(prog_name="applianctl")


if __name__ == "__main__":
    main()
