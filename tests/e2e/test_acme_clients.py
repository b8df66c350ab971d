"""Real ACME clients against a real `applianctl serve`: Debian's certbot 2.1 and lego 4.9.1.

The CA resolves the test's names (under example.test) through a LocalDnsServer given to
`serve --resolver`; the clients reach the CA at https://localhost:PORT and listen for http-01
and tls-alpn-01 on the ports the CA's ca.json names. For dns-01, lego's `exec` provider runs a
small script that adds and removes the TXT record in the running DNS server with RFC 2136
UPDATE messages. Every certificate is checked with `openssl verify` against the root and the
chain the client saved, and for its SANs.

Besides the default `acme` provisioner, this module's CA has:
- eab:    --require-eab;
- policy: --x509-allow-dns '*.ok.example.test'.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from acme_support import ZONE, AcmeCa, running_acme_ca
from cryptography import x509
from e2e_support import describe, sighup_and_wait

pytestmark = pytest.mark.e2e

EMAIL = "e2e@example.test"
CLIENT_TIMEOUT = 120.0
TIMED_RUNS = 3

DNS_HOOK = """#!{python}
# lego `--dns exec` hook: present|cleanup FQDN VALUE -> RFC 2136 UPDATE to the test's DNS server.
import sys

import dns.query
import dns.rcode
import dns.update

action, fqdn, value = sys.argv[1:4]
update = dns.update.UpdateMessage("{zone}.")
if action == "present":
    update.add(fqdn, 60, "TXT", '"' + value + '"')
elif action == "cleanup":
    update.delete(fqdn, "TXT", '"' + value + '"')
else:
    sys.exit("unknown action " + action)
reply = dns.query.tcp(update, "127.0.0.1", port={port}, timeout=10)
if reply.rcode() != dns.rcode.NOERROR:
    sys.exit(action + " " + fqdn + ": " + dns.rcode.to_text(reply.rcode()))
"""


# -- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def acme_ca() -> Iterator[AcmeCa]:
    with running_acme_ca("e2e-acme-clients") as ca:
        ca.run_cli("provisioner", "add", "eab", "--type", "ACME", "--require-eab",
                   home=ca.ca_home)
        ca.run_cli("provisioner", "add", "policy", "--type", "ACME",
                   "--x509-allow-dns", "*.ok.example.test", home=ca.ca_home)
        sighup_and_wait(ca)
        yield ca


@pytest.fixture(scope="module")
def dns_hook(acme_ca: AcmeCa) -> Path:
    assert acme_ca.dns is not None
    path = acme_ca.work / "lego-dns-hook.py"
    path.write_text(DNS_HOOK.format(python=sys.executable, zone=ZONE, port=acme_ca.dns.port))
    path.chmod(0o700)
    return path


def lego(ca: AcmeCa, home: str, domains: list[str], *args: str, provisioner: str = "acme",
         hook: Path | None = None, command: tuple[str, ...] = ("run",),
         check: bool = True) -> subprocess.CompletedProcess[str]:
    """`lego --path WORK/HOME -s DIRECTORY -a -m EMAIL -d ... ARGS COMMAND`."""
    env = dict(os.environ, LEGO_CA_CERTIFICATES=str(ca.root_path))
    if hook is not None:
        env.update(EXEC_PATH=str(hook), EXEC_POLLING_INTERVAL="1",
                   EXEC_PROPAGATION_TIMEOUT="30", EXEC_SEQUENCE_INTERVAL="1")
    argv = ["lego", "--path", str(ca.work / home), "--server", ca.directory_of(provisioner),
            "--accept-tos", "--email", EMAIL]
    for domain in domains:
        argv += ["--domains", domain]
    result = subprocess.run([*argv, *args, *command], env=env, capture_output=True, text=True,
                            timeout=CLIENT_TIMEOUT, check=False, cwd=ca.work)
    if check and result.returncode != 0:
        pytest.fail(describe(result), pytrace=False)
    return result


def lego_http(ca: AcmeCa) -> tuple[str, ...]:
    return ("--http", "--http.port", f"127.0.0.1:{ca.http_port}")


def lego_dns(ca: AcmeCa) -> tuple[str, ...]:
    assert ca.dns is not None
    return ("--dns", "exec", "--dns.resolvers", ca.dns.address, "--dns.disable-cp")


def lego_cert(ca: AcmeCa, home: str, domain: str) -> Path:
    return ca.work / home / "certificates" / f"{domain.replace('*', '_')}.crt"


def certbot(ca: AcmeCa, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """certbot with its own config/work/logs dirs under the CA's work dir, trusting the root."""
    env = dict(os.environ, REQUESTS_CA_BUNDLE=str(ca.root_path))
    base = ca.work / "certbot"
    argv = ["certbot", *args, "--config-dir", str(base / "config"),
            "--work-dir", str(base / "work"), "--logs-dir", str(base / "logs"),
            "--non-interactive", "--server", ca.directory]
    result = subprocess.run(argv, env=env, capture_output=True, text=True,
                            timeout=CLIENT_TIMEOUT, check=False, cwd=ca.work)
    if check and result.returncode != 0:
        log = base / "logs" / "letsencrypt.log"
        tail = "\n".join(log.read_text().splitlines()[-60:]) if log.exists() else ""
        pytest.fail(f"{describe(result)}--- certbot log ---\n{tail}", pytrace=False)
    return result


def no_challenge_records_left(ca: AcmeCa) -> None:
    assert ca.dns is not None
    left = [key for key in ca.dns.records() if key[0].startswith("_acme-challenge.")]
    assert not left, f"lego's cleanup left {left}"


# -- certbot ------------------------------------------------------------------------------------
CERTBOT_NAME = "certbot.example.test"


@pytest.fixture(scope="module")
def certbot_live(acme_ca: AcmeCa) -> Path:
    """`certbot certonly --standalone` (http-01) for CERTBOT_NAME; its live directory."""
    acme_ca.add_name(CERTBOT_NAME)
    result = certbot(acme_ca, "certonly", "--standalone", "--preferred-challenges", "http",
                     "--http-01-port", str(acme_ca.http_port), "--agree-tos", "-m", EMAIL,
                     "-d", CERTBOT_NAME)
    assert "Successfully received certificate" in result.stdout, describe(result)
    return acme_ca.work / "certbot" / "config" / "live" / CERTBOT_NAME


def test_certbot_certonly_standalone(acme_ca: AcmeCa, certbot_live: Path) -> None:
    leaf = acme_ca.verify_issued(certbot_live / "fullchain.pem", [CERTBOT_NAME])
    assert leaf == x509.load_pem_x509_certificate((certbot_live / "cert.pem").read_bytes())


def test_certbot_renew(acme_ca: AcmeCa, certbot_live: Path) -> None:
    before = x509.load_pem_x509_certificate((certbot_live / "cert.pem").read_bytes())
    certbot(acme_ca, "renew", "--force-renewal", "--no-random-sleep-on-renew")
    after = acme_ca.verify_issued(certbot_live / "fullchain.pem", [CERTBOT_NAME])
    assert after.serial_number != before.serial_number
    assert after.not_valid_before_utc >= before.not_valid_before_utc


def test_certbot_revoke_puts_the_serial_on_the_crl(acme_ca: AcmeCa, certbot_live: Path) -> None:
    cert_path = certbot_live / "cert.pem"
    leaf = x509.load_pem_x509_certificate(cert_path.read_bytes())
    crl_file, crl = acme_ca.write_crl("before-certbot-revoke")
    assert crl.get_revoked_certificate_by_serial_number(leaf.serial_number) is None
    assert acme_ca.openssl_crl_check(certbot_live / "fullchain.pem", crl_file).returncode == 0
    certbot(acme_ca, "revoke", "--cert-path", str(cert_path), "--reason", "keycompromise",
            "--no-delete-after-revoke")
    crl_file, crl = acme_ca.write_crl("after-certbot-revoke")
    entry = crl.get_revoked_certificate_by_serial_number(leaf.serial_number)
    assert entry is not None, f"serial {leaf.serial_number:x} is not on the CRL"
    reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    assert reason == x509.ReasonFlags.key_compromise
    text = subprocess.run(["openssl", "crl", "-in", str(crl_file), "-noout", "-text"],
                          capture_output=True, text=True, timeout=30, check=True).stdout
    assert f"{leaf.serial_number:X}".lstrip("0") in text.replace(" ", "").upper()
    result = acme_ca.openssl_crl_check(certbot_live / "fullchain.pem", crl_file)
    assert result.returncode != 0, f"the revoked certificate passed -crl_check:\n{result.stdout}"
    assert "revoked" in result.stdout + result.stderr, result.stdout + result.stderr


# -- lego ---------------------------------------------------------------------------------------
def test_lego_http01_and_renew(acme_ca: AcmeCa) -> None:
    name = acme_ca.add_name("lego-http.example.test")
    lego(acme_ca, "lego-http", [name], *lego_http(acme_ca))
    crt = lego_cert(acme_ca, "lego-http", name)
    first = acme_ca.verify_issued(crt, [name])
    lego(acme_ca, "lego-http", [name], *lego_http(acme_ca),
         command=("renew", "--days", "90", "--no-random-sleep"))
    renewed = acme_ca.verify_issued(crt, [name])
    assert renewed.serial_number != first.serial_number


def test_lego_tls_alpn01(acme_ca: AcmeCa) -> None:
    names = [acme_ca.add_name("lego-tls.example.test"), acme_ca.add_name("alt-tls.example.test")]
    lego(acme_ca, "lego-tls", names, "--tls", "--tls.port", f"127.0.0.1:{acme_ca.tls_port}")
    acme_ca.verify_issued(lego_cert(acme_ca, "lego-tls", names[0]), names)


def test_lego_dns01_exec(acme_ca: AcmeCa, dns_hook: Path) -> None:
    name = "lego-dns.example.test"  # no address needed: the CA only looks up the TXT record
    lego(acme_ca, "lego-dns", [name], *lego_dns(acme_ca), hook=dns_hook)
    acme_ca.verify_issued(lego_cert(acme_ca, "lego-dns", name), [name])
    no_challenge_records_left(acme_ca)


def test_lego_wildcard_with_dns01(acme_ca: AcmeCa, dns_hook: Path) -> None:
    names = ["*.wild.example.test", "wild.example.test"]
    lego(acme_ca, "lego-wild", names, *lego_dns(acme_ca), hook=dns_hook)
    acme_ca.verify_issued(lego_cert(acme_ca, "lego-wild", names[0]), names)
    no_challenge_records_left(acme_ca)


# -- external account binding -------------------------------------------------------------------
def test_eab_is_required_and_binds_one_account(acme_ca: AcmeCa) -> None:
    name = acme_ca.add_name("eab.example.test")
    refused = lego(acme_ca, "lego-eab-none", [name], *lego_http(acme_ca), provisioner="eab",
                   check=False)
    # lego reads meta.externalAccountRequired from the directory and stops before newAccount
    # (the server's own externalAccountRequired problem is checked in test_acme_protocol.py).
    assert refused.returncode != 0, describe(refused)
    assert "Server requires External Account Binding" in refused.stderr, describe(refused)

    created = acme_ca.run_cli("acme", "eab", "add", "eab", "--reference", "lego-e2e",
                              home=acme_ca.ca_home)
    key = json.loads(created.stdout)
    assert set(key) >= {"kid", "hmacKey"}, key
    eab = ("--eab", "--kid", key["kid"], "--hmac", key["hmacKey"])
    lego(acme_ca, "lego-eab", [name], *eab, *lego_http(acme_ca), provisioner="eab")
    acme_ca.verify_issued(lego_cert(acme_ca, "lego-eab", name), [name])

    listed = json.loads(acme_ca.run_cli("acme", "eab", "list", "eab",
                                        home=acme_ca.ca_home).stdout)
    (entry,) = [k for k in listed if k["kid"] == key["kid"]]
    assert entry["reference"] == "lego-e2e" and entry["boundAccount"], entry
    assert "hmacKey" not in entry

    # A second account (another lego home: another account key) may not reuse the binding.
    reused = lego(acme_ca, "lego-eab-reuse", [name], *eab, *lego_http(acme_ca),
                  provisioner="eab", check=False)
    assert reused.returncode != 0, describe(reused)
    assert "urn:ietf:params:acme:error:unauthorized" in reused.stderr, describe(reused)
    assert "already bound" in reused.stderr, describe(reused)
    assert not lego_cert(acme_ca, "lego-eab-reuse", name).exists()


# -- policy -------------------------------------------------------------------------------------
def test_provisioner_policy_rejects_an_identifier(acme_ca: AcmeCa) -> None:
    refused = lego(acme_ca, "lego-policy-bad", ["bad.other.test"], *lego_http(acme_ca),
                   provisioner="policy", check=False)
    assert refused.returncode != 0, describe(refused)
    assert "urn:ietf:params:acme:error:rejectedIdentifier" in refused.stderr, describe(refused)
    assert "bad.other.test" in refused.stderr
    good = acme_ca.add_name("www.ok.example.test")
    lego(acme_ca, "lego-policy-good", [good], *lego_http(acme_ca), provisioner="policy")
    acme_ca.verify_issued(lego_cert(acme_ca, "lego-policy-good", good), [good])


# -- timing -------------------------------------------------------------------------------------
def test_lego_issuance_time(acme_ca: AcmeCa, capsys: pytest.CaptureFixture[str]) -> None:
    """One full lego issuance (new account, order, http-01, finalize, download), timed.

    No assertion on the time: the figures are printed for the performance requirement.
    """
    timings = []
    for i in range(TIMED_RUNS):
        name = acme_ca.add_name(f"timed-{i}.example.test")
        start = time.perf_counter()
        lego(acme_ca, f"lego-timed-{i}", [name], *lego_http(acme_ca))
        timings.append(time.perf_counter() - start)
        acme_ca.verify_issued(lego_cert(acme_ca, f"lego-timed-{i}", name), [name])
    with capsys.disabled():
        print(f"\nlego http-01 full issuance, {TIMED_RUNS} runs: "
              + ", ".join(f"{t * 1000:.0f} ms" for t in timings)
              + f" (median {statistics.median(timings) * 1000:.0f} ms)")
