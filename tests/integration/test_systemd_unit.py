"""The hardened systemd packaging in systemd/: the unit, its sysusers.d and tmpfiles.d companions.

Everywhere: `systemd-analyze verify` accepts the unit without a word, `systemd-analyze security
--offline=yes` rates it at most 1.5, and the sysusers/tmpfiles files are applied to a throwaway
root directory. Where systemd is PID 1: systemd/install.sh installs the real unit, the CA is
initialised as docs/systemd.md says, the service starts (so READY=1 reached systemd), issues a
certificate, reloads and stops cleanly. That last test is skipped elsewhere (containers, CI
runners without systemd); docs/systemd.md says how it was run by hand.

The systemd tools come from the Debian package `systemd` (APT_PACKAGES in the Makefile).
"""

from __future__ import annotations

import json
import os
import pwd
import re
import secrets
import shutil
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

REPO = Path(__file__).resolve().parents[2]
SYSTEMD = REPO / "systemd"
UNIT = SYSTEMD / "appliance.service"
SYSUSERS = SYSTEMD / "appliance.sysusers.conf"
TMPFILES = SYSTEMD / "appliance.tmpfiles.conf"
INSTALL = SYSTEMD / "install.sh"
EXEC_START = "/opt/appliance/venv/bin/applianctl"
MAX_EXPOSURE = 1.5

# Where install.sh puts things (kept in step with it and with docs/systemd.md).
STATE = Path("/var/lib/appliance")
ETC = Path("/etc/appliance")
INSTALLED = [Path("/usr/local/lib/systemd/system/appliance.service"),
             Path("/usr/local/lib/sysusers.d/appliance.conf"),
             Path("/usr/local/lib/tmpfiles.d/appliance.conf"),
             Path("/usr/local/bin/applianctl")]


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is missing: apt-get install systemd (the Makefile's APT_PACKAGES "
                    "should list it)", pytrace=False)
    return path


def run(*args: str | Path, check: bool = True, timeout: float = 120,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True,
                            timeout=timeout, env=env, check=False)
    if check and result.returncode != 0:
        pytest.fail(f"`{' '.join(map(str, args))}` exited {result.returncode}\n"
                    f"--- stdout ---\n{result.stdout}--- stderr ---\n{result.stderr}",
                    pytrace=False)
    return result


# -- systemd-analyze verify --------------------------------------------------------------------
def verify_unit(text: str, directory: Path) -> list[str]:
    """`systemd-analyze verify` on a copy of the unit; its complaints about appliance.service.

    verify also checks that ExecStart= names an executable, and on a development machine
    /opt/appliance/venv/bin/applianctl does not exist (install.sh makes it). So when it is
    missing, the copy's ExecStart= names this checkout's own applianctl instead: the same console
    script, with the same arguments, so every other line is verified as written. The copy is
    named appliance.service so that it is the same unit. verify exits 0 even for unknown keys
    and bad values (it only logs them), so any line that mentions the unit is a failure; lines
    about other units (the host's targets) are not this test's business.
    """
    if not os.access(EXEC_START, os.X_OK):
        stand_in = Path(sys.executable).with_name("applianctl")
        assert os.access(stand_in, os.X_OK), f"no {stand_in}: is the package installed?"
        assert text.count(EXEC_START) == 1
        text = text.replace(EXEC_START, str(stand_in))
    copy = directory / "appliance.service"
    copy.write_text(text)
    result = run(tool("systemd-analyze"), "verify", "--man=no", copy, check=False)
    output = (result.stdout + result.stderr).splitlines()
    complaints = [line for line in output if "appliance" in line]
    if result.returncode != 0 and not complaints:
        complaints = output or [f"exit status {result.returncode}"]
    return complaints


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    assert verify_unit(UNIT.read_text(), tmp_path) == []


def test_verify_check_would_see_a_bad_line(tmp_path: Path) -> None:
    """The check above is not vacuous: an unknown key and a bad value are reported."""
    text = UNIT.read_text().replace("[Service]\n", "[Service]\nNoSuchKey=1\nProtectProc=maybe\n")
    complaints = verify_unit(text, tmp_path)
    assert any("NoSuchKey" in line for line in complaints), complaints
    assert any("maybe" in line for line in complaints), complaints


# -- systemd-analyze security ------------------------------------------------------------------
def test_security_exposure_is_at_most_1_5(tmp_path: Path) -> None:
    copy = tmp_path / "appliance.service"  # away from any drop-ins for the installed unit
    shutil.copyfile(UNIT, copy)
    result = run(tool("systemd-analyze"), "security", "--offline=yes", "--no-pager", copy,
                 check=False)
    match = re.search(r"Overall exposure level for appliance\.service:\s*([0-9]+\.[0-9])",
                      result.stdout)
    assert match, f"no overall exposure in:\n{result.stdout}{result.stderr}"
    exposure = float(match.group(1))
    failed = [line for line in result.stdout.splitlines() if line.startswith("✗")]
    assert exposure <= MAX_EXPOSURE, "\n".join([f"exposure {exposure}:"] + failed)
    # systemd's own threshold check agrees (in tenths).
    threshold = run(tool("systemd-analyze"), "security", "--offline=yes", "--no-pager",
                    f"--threshold={int(MAX_EXPOSURE * 10)}", copy, check=False)
    assert threshold.returncode == 0, threshold.stdout + threshold.stderr


def test_unit_keeps_the_required_settings() -> None:
    """What the score alone would not catch: the settings the issue asks for by name."""
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    expected = {
        "Type": "notify", "NotifyAccess": "main", "ExecReload": "/bin/kill -HUP $MAINPID",
        "User": "appliance", "Group": "appliance", "StateDirectory": "appliance",
        "RuntimeDirectory": "appliance", "ProtectSystem": "strict", "PrivateTmp": "yes",
        "PrivateDevices": "yes", "NoNewPrivileges": "yes", "CapabilityBoundingSet": "",
        "ProtectHome": "yes", "ProtectProc": "invisible", "ProcSubset": "pid",
        "MemoryDenyWriteExecute": "yes", "SystemCallArchitectures": "native",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6", "UMask": "0077",
        "LoadCredential": "issuer-pin:/etc/appliance/issuer-pin",
    }
    for key, value in expected.items():
        assert settings.get(key) == [value], (key, settings.get(key))
    assert settings["SystemCallFilter"] == ["@system-service", "~@privileged @resources",
                                            "sched_setaffinity"]
    assert "--issuer-password-file ${CREDENTIALS_DIRECTORY}/issuer-pin" in settings["ExecStart"][0]
    # No IP allow list: the ACME validator must reach clients on 80/443.
    assert "IPAddressDeny" not in settings
    assert "#LoadCredentialEncrypted=issuer-pin:/etc/appliance/issuer-pin.cred" in UNIT.read_text()


# -- sysusers.d and tmpfiles.d -----------------------------------------------------------------
def test_sysusers_and_tmpfiles_apply_to_a_scratch_root(tmp_path: Path) -> None:
    """Both files are applied for real, with --root, to an empty tree (systemd 252's
    systemd-tmpfiles has no --dry-run; systemd-sysusers' is checked too)."""
    dry = run(tool("systemd-sysusers"), "--dry-run", "--root", tmp_path, SYSUSERS.resolve())
    assert "appliance" in dry.stdout + dry.stderr
    assert not (tmp_path / "etc" / "passwd").exists()

    (tmp_path / "etc").mkdir()
    users = run(tool("systemd-sysusers"), "--root", tmp_path, SYSUSERS.resolve())
    assert "Failed" not in users.stderr, users.stderr
    passwd = {line.split(":")[0]: line.split(":") for line in
              (tmp_path / "etc" / "passwd").read_text().splitlines()}
    entry = passwd["appliance"]
    uid, gid, home, shell = int(entry[2]), int(entry[3]), entry[5], entry[6]
    assert uid < 1000, "a system user"
    assert (home, shell) == ("/var/lib/appliance", "/usr/sbin/nologin")
    assert any(line.startswith(f"appliance:x:{gid}:") for line in
               (tmp_path / "etc" / "group").read_text().splitlines())

    # A PIN file someone left readable: the z line closes it again.
    (tmp_path / "etc" / "appliance").mkdir(mode=0o755)
    pin = tmp_path / "etc" / "appliance" / "issuer-pin"
    pin.write_text("1234\n")
    pin.chmod(0o644)
    files = run(tool("systemd-tmpfiles"), "--root", tmp_path, "--create", TMPFILES.resolve(),
                check=os.geteuid() == 0)
    # Not root: everything but the chown to root and to appliance is done (exit status 73).
    complaints = [line for line in files.stderr.splitlines()
                  if os.geteuid() == 0 or "Operation not permitted" not in line]
    assert complaints == [], files.stderr

    def mode_owner(path: Path) -> tuple[int, int, int]:
        st = path.stat()
        return stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid

    root_owned = (0, 0) if os.geteuid() == 0 else (os.geteuid(), os.getegid())
    assert mode_owner(tmp_path / "etc" / "appliance") == (0o700, *root_owned)
    assert mode_owner(pin) == (0o600, *root_owned)
    state = tmp_path / "var" / "lib" / "appliance"
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    if os.geteuid() == 0:
        assert mode_owner(state)[1:] == (uid, gid)


# -- the real unit, under systemd --------------------------------------------------------------
def pid1() -> str:
    try:
        return Path("/proc/1/comm").read_text().strip()
    except OSError as e:
        return f"unreadable: {e.strerror}"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def unit_property(name: str) -> str:
    return run("systemctl", "show", "--value", "-p", name, "appliance.service").stdout.strip()


def journal() -> str:
    return run("journalctl", "--no-pager", "-o", "cat", "-n", "60", "-u", "appliance.service",
               check=False).stdout


def remove_installation() -> None:
    """Undo install.sh and the init (the `appliance` user stays, as sysusers users do)."""
    run("systemctl", "disable", "--now", "appliance.service", check=False)
    for path in INSTALLED:
        path.unlink(missing_ok=True)
    for directory in (STATE, ETC, Path("/opt/appliance"), Path("/usr/local/share/doc/appliance")):
        shutil.rmtree(directory, ignore_errors=True)
    run("systemctl", "daemon-reload", check=False)
    run("systemctl", "reset-failed", "appliance.service", check=False)


@pytest.fixture
def installed() -> Iterator[None]:
    """Install the unit with systemd/install.sh on this machine; remove it all afterwards."""
    comm = pid1()
    if comm != "systemd":
        pytest.skip(f"systemd is not PID 1 on this machine (/proc/1/comm is {comm!r}); "
                    "docs/systemd.md says how this was checked by hand")
    if os.geteuid() != 0:
        pytest.fail("installing the unit needs root", pytrace=False)
    if (STATE / "config").exists() or (ETC / "issuer-pin").exists() or INSTALLED[0].exists():
        pytest.fail("this machine already has an appliance installation "
                    f"({STATE}, {ETC} or {INSTALLED[0]}); the test would replace it. Run it on a "
                    "throwaway machine", pytrace=False)
    try:
        run(INSTALL, timeout=900)
        yield
    finally:
        remove_installation()


def test_the_installed_unit_serves_reloads_and_stops(installed: None, tmp_path: Path) -> None:
    # What install.sh left.
    user = pwd.getpwnam("appliance")
    for path, mode, uid in ((ETC, 0o700, 0), (ETC / "issuer-pin", 0o600, 0),
                            (STATE, 0o700, user.pw_uid)):
        st = path.stat()
        assert (stat.S_IMODE(st.st_mode), st.st_uid) == (mode, uid), path
    assert run("systemctl", "is-enabled", "appliance.service").stdout.strip() == "enabled"
    applianctl = "/usr/local/bin/applianctl"

    # The init of docs/systemd.md: as root with the installed PIN, then hand the home over.
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir(mode=0o700)
    for name in ("root-pin", "provisioner-password"):
        fd = os.open(secrets_dir / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(18) + "\n")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("SOFTHSM2_CONF", "APPLIANCE_HOME")}
    run(applianctl, "init", "--name", "Systemd Test", "--dns", "localhost",
        "--address", f"127.0.0.1:{port}", "--provisioner", "admin",
        "--password-file", secrets_dir / "root-pin", "--issuer-password-file", ETC / "issuer-pin",
        "--provisioner-password-file", secrets_dir / "provisioner-password",
        env={**env, "APPLIANCE_HOME": str(STATE)})
    run("chown", "-R", "appliance:appliance", STATE)

    # Type=notify: `systemctl start` returns once the supervisor sent READY=1.
    started = run("systemctl", "start", "appliance.service", check=False, timeout=200)
    assert started.returncode == 0, started.stderr + journal()
    assert unit_property("ActiveState") == "active", journal()
    assert "serving" in unit_property("StatusText")
    main_pid = int(unit_property("MainPID"))
    status = dict(line.split(":\t", 1) for line in
                  Path(f"/proc/{main_pid}/status").read_text().splitlines() if ":\t" in line)
    assert status["Uid"].split()[0] == str(user.pw_uid)
    assert status["NoNewPrivs"].strip() == "1"
    assert status["Seccomp"].strip() == "2"
    assert int(status["CapEff"], 16) == 0 and int(status["CapBnd"], 16) == 0

    # Under the system call filter each worker still pins itself, threads and all, to its own
    # CPU (the unit allows sched_setaffinity back from @resources for exactly that).
    allowed = os.sched_getaffinity(main_pid)
    children = Path(f"/proc/{main_pid}/task/{main_pid}/children").read_text().split()
    workers = [pid for pid in children
               if b"resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_bytes()]
    cpus = [{(task / "status").read_text().split("Cpus_allowed_list:")[1].split()[0]
             for task in Path(f"/proc/{pid}/task").iterdir()} for pid in workers]
    assert "worker_not_pinned" not in journal()
    if len(allowed) >= 2:
        assert all(len(c) == 1 for c in cpus) and len({next(iter(c)) for c in cpus}) == min(
            len(workers), len(allowed)), cpus

    # A certificate through the sandboxed service (token signing under MemoryDenyWriteExecute).
    client = tmp_path / "client"
    client_env = {**env, "APPLIANCE_HOME": str(client)}
    fingerprint = json.loads((STATE / "config" / "defaults.json").read_text())["fingerprint"]
    run(applianctl, "bootstrap", "--ca-url", f"https://localhost:{port}",
        "--fingerprint", fingerprint, env=client_env)
    crt, key = tmp_path / "host.crt", tmp_path / "host.key"
    run(applianctl, "certificate", "host.systemd.test", crt, key,
        "--password-file", secrets_dir / "provisioner-password", env=client_env)
    leaf, intermediate = x509.load_pem_x509_certificates(crt.read_bytes())[:2]
    root = x509.load_pem_x509_certificate((client / "certs" / "root_ca.crt").read_bytes())
    leaf.verify_directly_issued_by(intermediate)
    intermediate.verify_directly_issued_by(root)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["host.systemd.test"]

    # Reload: SIGHUP to the same main process, which stays up.
    run("systemctl", "reload", "appliance.service")
    time.sleep(1)
    assert unit_property("ActiveState") == "active", journal()
    assert int(unit_property("MainPID")) == main_pid

    # Stop: the supervisor drains and exits 0.
    run("systemctl", "stop", "appliance.service", timeout=90)
    assert unit_property("Result") == "success", journal()
    assert unit_property("ExecMainStatus") == "0", journal()
