#!/usr/bin/env bash
# Install the appliance as a hardened systemd service (`make install`; as root; idempotent).
#
#   1. the `appliance` system user and group (systemd-sysusers, appliance.sysusers.conf);
#   2. /etc/appliance (0700 root) and /var/lib/appliance (0700 appliance) (systemd-tmpfiles);
#   3. a virtualenv in /opt/appliance/venv with the appliance from this checkout in it, and
#      /usr/local/bin/applianctl pointing at it;
#   4. the issuer PIN file /etc/appliance/issuer-pin (0600 root): a random one if there is none
#      and no CA yet;
#   5. the unit and the docs; the unit enabled (restarted too if the CA is already initialised).
#
# Environment: APPLIANCE_PYTHON (default /usr/bin/python3): a Python >= 3.11 outside /root and
# /home, since the unit hides those (ProtectHome=yes) and the venv's interpreter lives there.
set -euo pipefail
umask 022

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
src=$(dirname "$here")
PYTHON=${APPLIANCE_PYTHON:-/usr/bin/python3}
PREFIX=/opt/appliance
VENV=$PREFIX/venv
ETC=/etc/appliance
PIN=$ETC/issuer-pin
STATE=/var/lib/appliance
LIB=/usr/local/lib
DOC=/usr/local/share/doc/appliance

say() { printf 'install: %s\n' "$*"; }
die() { printf 'install: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root"
for tool in systemd-sysusers systemd-tmpfiles systemctl; do
    command -v "$tool" >/dev/null || die "$tool is missing: apt-get install systemd"
done
[ -x /bin/kill ] || die "/bin/kill (the unit's ExecReload=) is missing: apt-get install procps"
[ -e /usr/lib/softhsm/libsofthsm2.so ] \
    || say "warning: no SoftHSM2 (apt-get install softhsm2); fine if ca.json names a real HSM"
[ -x "$PYTHON" ] || die "no Python at $PYTHON (set APPLIANCE_PYTHON=)"
# Python >= 3.11 whose installation the unit can see (not under /root or /home).
usable_python() {
    "$1" -c 'import os, sys
base = os.path.realpath(sys.base_prefix)
sys.exit(sys.version_info < (3, 11) or base.startswith(("/root/", "/home/")))' 2>/dev/null
}
usable_python "$PYTHON" || die "$PYTHON must be Python >= 3.11 installed outside /root and /home"
"$PYTHON" -c 'import ensurepip, venv' 2>/dev/null \
    || die "$PYTHON cannot make a virtualenv: apt-get install python3-venv"

# 1, 2: user, group and directories.
install -D -m 0644 "$here/appliance.sysusers.conf" "$LIB/sysusers.d/appliance.conf"
install -D -m 0644 "$here/appliance.tmpfiles.conf" "$LIB/tmpfiles.d/appliance.conf"
systemd-sysusers "$LIB/sysusers.d/appliance.conf"
systemd-tmpfiles --create "$LIB/tmpfiles.d/appliance.conf"
say "user $(id appliance)"

# 3: the virtualenv. Built from a copy of the sources, so that the checkout gets no build/ dir.
# When the checkout has its development venv, its versions are the constraints: the service runs
# what the tests ran against.
if [ -e "$VENV" ] && ! usable_python "$VENV/bin/python"; then
    die "$VENV is broken, older than Python 3.11 or made from a Python under /root or /home: \
remove it and run again"
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir "$work/src"
cp -r "$src/pyproject.toml" "$src/appliance" "$src/hsm" "$work/src/"
[ -f "$src/README.md" ] && cp "$src/README.md" "$work/src/"
find "$work/src" -name __pycache__ -prune -exec rm -rf {} +
constraints=()
if [ -x "$src/.venv/bin/python" ]; then
    "$src/.venv/bin/python" -m pip freeze --exclude-editable --disable-pip-version-check \
        | grep -v '^appliance[= @]' > "$work/constraints.txt" || true
    constraints=(--constraint "$work/constraints.txt")
fi
PIP_DISABLE_PIP_VERSION_CHECK=1 "$VENV/bin/python" -m pip install -q "${constraints[@]}" \
    --upgrade --force-reinstall --no-deps "$work/src"
PIP_DISABLE_PIP_VERSION_CHECK=1 "$VENV/bin/python" -m pip install -q "${constraints[@]}" "$work/src"
"$VENV/bin/python" -m compileall -q "$VENV/lib" >/dev/null || true  # the unit's /opt is read-only
ln -sfn "$VENV/bin/applianctl" /usr/local/bin/applianctl
say "$("$VENV/bin/applianctl" --version 2>/dev/null || echo appliance) in $VENV"

# 4: the issuer PIN, readable by root only; systemd hands the service a copy (LoadCredential=).
# A new one only before the CA exists (init puts it on the token) and when it is not kept
# encrypted instead (LoadCredentialEncrypted=, $PIN.cred).
install -d -m 0700 -o root -g root "$ETC"
if [ ! -s "$PIN" ] && [ ! -e "$PIN.cred" ] && [ ! -e "$STATE/config/ca.json" ]; then
    (umask 077; "$PYTHON" -c 'import secrets; print(secrets.token_urlsafe(24))' > "$PIN")
    say "wrote a new random issuer PIN to $PIN"
fi
if [ -e "$PIN" ]; then
    chown root:root "$PIN"
    chmod 0600 "$PIN"
fi

# 5: unit and docs.
install -D -m 0644 "$here/appliance.service" "$LIB/systemd/system/appliance.service"
install -d -m 0755 "$DOC"
install -m 0644 "$src"/docs/*.md "$DOC/"

if [ ! -d /run/systemd/system ]; then
    # Not booted with systemd (a container, a chroot): enable works offline, nothing can start.
    systemctl enable appliance.service
    say "installed and enabled; systemd is not running here, so nothing was started"
    exit 0
fi
systemctl daemon-reload
systemctl enable appliance.service
if [ -f "$STATE/config/ca.json" ]; then
    systemctl restart appliance.service
    say "appliance.service (re)started: systemctl status appliance"
else
    say "appliance.service is enabled; it starts once the CA exists in $STATE:"
    say "  see $DOC/systemd.md (Initialise the CA), then: systemctl start appliance"
fi
