"""An ACME CA for the end-to-end tests: `applianctl init --acme`, validation ports of its own,
and `serve --resolver` pointing at a LocalDnsServer that maps the test's names to 127.0.0.1.

    with running_acme_ca() as ca:                    # its own LocalDnsServer, in a thread
        ca.add_name("www.example.test")             # A 127.0.0.1, as the CA's resolver sees it
        ca.directory                                # https://localhost:PORT/acme/acme/directory

The CA validates http-01 on `ca.http_port` and tls-alpn-01 on `ca.tls_port` of whatever the
names resolve to; the tests (or certbot, lego) listen there. Nothing here touches /etc/hosts.
Helpers shared by the ACME modules live here too: openssl checks and the CRL.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from e2e_support import (
    APPLIANCTL,
    SERVE_TIMEOUT,
    SOFTHSM_MODULE,
    WORKERS,
    CaServer,
    clean_env,
    free_port,
    load_chain,
    write_secret,
)

from tests.support.dns_server import LocalDnsServer

ZONE = "example.test"
ACME_PROVISIONER = "acme"
LOCALHOST = "127.0.0.1"
# The CA denies validating loopback by default; the tests' responders are all on 127.0.0.1.
TEST_ALLOW_RANGES = ("127.0.0.0/8",)


def base_records() -> dict[tuple[str, str], list[str]]:
    """The zone's SOA and NS (lego looks for the zone); names are added per test."""
    return {(ZONE, "SOA"): ["ns.example.test. hostmaster.example.test. 1 3600 600 86400 60"],
            (ZONE, "NS"): ["ns.example.test."],
            ("ns.example.test", "A"): [LOCALHOST]}


@dataclass
class AcmeCa(CaServer):
    """A CaServer whose `serve` resolves names through `resolver` and validates on its ports."""

    resolver: str = ""
    http_port: int = 0
    tls_port: int = 0
    dns: LocalDnsServer | None = None

    def directory_of(self, provisioner: str = ACME_PROVISIONER) -> str:
        return f"{self.url}/acme/{provisioner}/directory"

    @property
    def directory(self) -> str:
        return self.directory_of()

    def add_name(self, name: str, address: str = LOCALHOST) -> str:
        assert self.dns is not None
        self.dns.set(name, "A", [address])
        return name

    def start(self) -> None:
        """As CaServer.start, with `--resolver`."""
        assert self.process is None or self.process.poll() is not None, "already running"
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._stderr = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [APPLIANCTL, "serve", str(self.config_path),
             "--issuer-password-file", str(self.issuer_pin_file),
             "--pidfile", str(self.pidfile), "--workers", str(WORKERS),
             "--resolver", self.resolver],
            env=clean_env(self.ca_home), cwd=self.base, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=self._stderr, start_new_session=True)
        try:
            self.wait_for_event("serving", timeout=SERVE_TIMEOUT)
        except BaseException:
            self.stop(check=False)
            raise

    # -- checks on what the CA issued ----------------------------------------------------------
    def verify_issued(self, crt_file: Path, names: list[str]) -> x509.Certificate:
        """openssl verify (root + the chain's intermediate) and the SANs are exactly `names`."""
        chain = self.openssl_verify(crt_file)
        leaf = chain[0]
        sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert sorted(sans.get_values_for_type(x509.DNSName)) == sorted(names), (
            f"{crt_file}: SANs {sans} are not {names}")
        assert not sans.get_values_for_type(x509.IPAddress)
        return leaf

    def write_crl(self, name: str) -> tuple[Path, x509.CertificateRevocationList]:
        """`applianctl crl FILE` (PEM, fetched from the server); the file and the parsed CRL."""
        path = self.work / f"{name}.crl.pem"
        path.unlink(missing_ok=True)
        self.run_cli("crl", path, "--ca-url", self.url, "--root", self.root_path)
        return path, x509.load_pem_x509_crl(path.read_bytes())

    def openssl_crl_check(self, crt_file: Path, crl_file: Path
                          ) -> subprocess.CompletedProcess[str]:
        """`openssl verify -crl_check` of the leaf of CRT_FILE (leaf + intermediate)."""
        chain = load_chain(crt_file)
        stem = crt_file.with_suffix("")
        leaf_pem, inter_pem = Path(f"{stem}.leaf.pem"), Path(f"{stem}.intermediate.pem")
        leaf_pem.write_bytes(chain[0].public_bytes(serialization.Encoding.PEM))
        inter_pem.write_bytes(chain[1].public_bytes(serialization.Encoding.PEM))
        return subprocess.run(
            ["openssl", "verify", "-crl_check", "-CAfile", str(self.root_path), "-untrusted",
             str(inter_pem), "-CRLfile", str(crl_file), str(leaf_pem)],
            capture_output=True, text=True, timeout=30, check=False)


@contextlib.contextmanager
def running_acme_ca(name: str = "e2e-acme", *,
                    allow_ranges: tuple[str, ...] = TEST_ALLOW_RANGES) -> Iterator[AcmeCa]:
    """A LocalDnsServer (in a thread); `init --acme` in a fresh home; free validation ports and
    `acme.validationAllowRanges` ALLOW_RANGES in ca.json; `serve --resolver` pointing at the
    DNS server. Everything is stopped on exit.

    The home is a directory of its own under the system temp dir, not pytest's basetemp:
    pytest keeps only the three newest basetemps, so on a machine where other pytest sessions
    start meanwhile, a long module's CA home (its SoftHSM2 tokens included) was deleted under
    the running server, and the next start failed with TokenNotFound. It is removed on exit.
    """
    base = Path(tempfile.mkdtemp(prefix=f"{name}-"))
    try:
        with LocalDnsServer(base_records()) as dns:
            yield from _running_acme_ca(base, dns, allow_ranges)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _running_acme_ca(base: Path, dns: LocalDnsServer, allow_ranges: tuple[str, ...]
                     ) -> Iterator[AcmeCa]:
    if not Path(SOFTHSM_MODULE).exists():
        pytest.fail("SoftHSM2 is not installed: apt-get install softhsm2", pytrace=False)
    (base / "work").mkdir()
    root_pin, issuer_pin, password = (secrets.token_urlsafe(12) for _ in range(3))
    ports: set[int] = set()
    while len(ports) < 3:  # the API, http-01 and tls-alpn-01 ports: three different ones
        ports.add(free_port())
    api_port, http_port, tls_port = ports
    server = AcmeCa(
        base=base, port=api_port,
        root_pin_file=write_secret(base / "root.pin", root_pin),
        issuer_pin_file=write_secret(base / "issuer.pin", issuer_pin),
        provisioner_password_file=write_secret(base / "provisioner.pass", password),
        root_pin=root_pin, issuer_pin=issuer_pin, provisioner_password=password,
        resolver=dns.address, http_port=http_port, tls_port=tls_port, dns=dns)
    server.init_stdout = server.init("--acme").stdout
    config = json.loads(server.config_path.read_text())
    config["acme"] = {**config.get("acme", {}), "httpPort": server.http_port,
                      "tlsPort": server.tls_port, "validationTimeout": "5s",
                      "validationAllowRanges": list(allow_ranges)}
    server.config_path.write_text(json.dumps(config, indent=2))
    server.start()
    try:
        yield server
    finally:
        server.stop()
