# The two commands of the README: `make run` and `make test`. Both install what is missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
APPLIANCE_HOME ?= $(HOME)/.appliance
export APPLIANCE_HOME
# Debian packages: the token (softhsm2), pkcs11-tool (opensc) and openssl for the tests.
APT_PACKAGES := softhsm2 opensc openssl ca-certificates python3-venv systemd procps certbot lego

.PHONY: run test deps venv lint bench clean-venv

deps:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	@touch $@

venv: $(VENV)/.installed

# Initialise a CA in a SoftHSM2 token under $(APPLIANCE_HOME) if there is none, then serve it.
run: deps venv
	@set -euo pipefail; umask 077; \
	secrets="$(APPLIANCE_HOME)/secrets"; \
	if [ ! -f "$(APPLIANCE_HOME)/config/ca.json" ]; then \
	  mkdir -p "$$secrets"; chmod 700 "$(APPLIANCE_HOME)" "$$secrets"; \
	  for f in root-pin issuer-pin provisioner-password; do \
	    [ -s "$$secrets/$$f" ] || $(PY) -c 'import secrets; print(secrets.token_urlsafe(24))' > "$$secrets/$$f"; \
	  done; \
	  $(VENV)/bin/applianctl init --name "Appliance" --dns localhost --dns 127.0.0.1 \
	    --address 127.0.0.1:9000 --provisioner admin \
	    --password-file "$$secrets/root-pin" --issuer-password-file "$$secrets/issuer-pin" \
	    --provisioner-password-file "$$secrets/provisioner-password"; \
	fi; \
	fp=$$($(PY) -c 'import json,sys; print(json.load(open(sys.argv[1]))["fingerprint"])' "$(APPLIANCE_HOME)/config/defaults.json"); \
	echo; \
	echo "The CA serves on https://127.0.0.1:9000 (root fingerprint $$fp)."; \
	echo "Get a first certificate from another shell:"; \
	echo "  export APPLIANCE_HOME=$(APPLIANCE_HOME)"; \
	echo "  $(CURDIR)/$(VENV)/bin/applianctl certificate myhost.internal myhost.crt myhost.key \\"; \
	echo "      --password-file $$secrets/provisioner-password"; \
	echo "  openssl verify -CAfile $(APPLIANCE_HOME)/certs/root_ca.crt -untrusted myhost.crt myhost.crt"; \
	echo "(on another machine: applianctl bootstrap --ca-url https://<this host>:9000 --fingerprint $$fp)"; \
	echo; \
	exec $(VENV)/bin/applianctl serve --issuer-password-file "$$secrets/issuer-pin"

test: deps venv
	$(PY) -m pytest -q
	$(MAKE) --no-print-directory lint

lint: venv
	$(VENV)/bin/ruff check appliance hsm tests bench
	$(VENV)/bin/mypy

# wrk is the benchmark's load generator: in C, so it leaves the 2 cores to the server.
bench: deps venv
	@dpkg -s wrk >/dev/null 2>&1 || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk; }
	$(PY) bench/issuance.py

clean-venv:
	rm -rf $(VENV)

# Install the CA as a hardened systemd service, as root (docs/systemd.md): the `appliance` user,
# a venv in /opt/appliance/venv, the issuer PIN in /etc/appliance, the unit, enabled.
.PHONY: install
install: deps
	systemd/install.sh
