"""`applianctl --help` and the client commands start without the server's libraries.

They used to take 1.1 s because importing the CLI imported SQLAlchemy, aiohttp, python-pkcs11,
Jinja2 and the pydantic schema of ca.json; now about 0.15 s. What is asserted is which modules a
run imports, not how long it takes: a timing assertion would fail on a busy shared machine.
"""

from __future__ import annotations

import datetime
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from e2e_support import clean_env

pytestmark = pytest.mark.e2e

# What only serve, init, kms, audit and the ACME administration need (pydantic: ca.json).
SERVER_LIBRARIES = ("sqlalchemy", "aiohttp", "pkcs11", "jinja2", "pydantic")

# Runs the console script's entry point, then writes the exit code and the top-level names of
# every module imported to the file named by the first argument.
PROBE = """
import json, sys
report, args = sys.argv[1], json.loads(sys.argv[2])
sys.argv = ["applianctl", *args]
from appliance.cli.main import main
try:
    main()
    code = 0
except SystemExit as e:
    code = e.code
with open(report, "w") as f:
    json.dump({"code": code, "modules": sorted({m.partition(".")[0] for m in sys.modules})}, f)
"""


def run_probe(tmp_path: Path, *args: str) -> tuple[int, set[str], subprocess.CompletedProcess[str]]:
    report = tmp_path / "imported.json"
    result = subprocess.run(
        [sys.executable, "-c", PROBE, str(report), json.dumps(args)],
        env=clean_env(tmp_path / "home"), cwd=tmp_path, capture_output=True, text=True,
        timeout=60, check=False)
    assert report.exists(), f"applianctl {' '.join(args)} did not finish:\n{result.stderr}"
    data = json.loads(report.read_text())
    return data["code"], set(data["modules"]), result


@pytest.mark.parametrize("args", [
    ("--help",), ("--version",), ("token", "--help"), ("certificate", "--help"),
    ("renew", "--help"), ("provisioner", "list", "--help"), ("serve", "--help"),
])
def test_help_imports_no_server_library(tmp_path: Path, args: tuple[str, ...]) -> None:
    code, modules, result = run_probe(tmp_path, *args)
    assert code == 0, result.stderr
    assert "Usage: applianctl" in result.stdout or "applianctl, version" in result.stdout
    loaded = sorted(modules.intersection(SERVER_LIBRARIES))
    assert not loaded, f"applianctl {' '.join(args)} imported {loaded}"


def self_signed_root(path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "startup test root")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_client_command_imports_no_server_library(tmp_path: Path) -> None:
    """`health` all the way to the connection attempt (which a closed port refuses)."""
    root = tmp_path / "root_ca.crt"
    self_signed_root(root)
    url = f"https://127.0.0.1:{closed_port()}"
    code, modules, result = run_probe(tmp_path, "health", "--ca-url", url, "--root", str(root))
    assert code == 1, result.stdout + result.stderr
    assert result.stderr.startswith(f"error: cannot reach the CA at {url}: "), result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert "ssl" in modules and "http" in modules, "the probe did not reach the HTTPS client"
    loaded = sorted(modules.intersection(SERVER_LIBRARIES))
    assert not loaded, f"applianctl health imported {loaded}"
