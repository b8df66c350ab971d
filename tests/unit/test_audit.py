"""The audit log against real files and real signatures: one chain from many writers, every
kind of tampering found and named, secrets kept out, and no record means no action."""

import asyncio
import base64
import hashlib
import json
import multiprocessing
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from appliance.audit import (
    AuditError,
    AuditEvent,
    AuditLog,
    Signer,
    VerifyResult,
    checkpoint_message,
    sign_message,
    tail,
    verify,
)

SigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def self_signed(key: SigningKey, cn: str = "audit test issuer") -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.now(UTC)
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=1)).not_valid_after(now + timedelta(days=1))
            .sign(key, hashes.SHA256()))


def signer_for(key: SigningKey) -> Signer:
    """A software stand-in for the token: signs off the event loop, as the PKCS#11 thread does."""
    async def sign(message: bytes) -> bytes:
        return await asyncio.to_thread(sign_message, key, message)
    return sign


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def ec_cert(ec_key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    return self_signed(ec_key)


def issued(i: int, **extra: Any) -> AuditEvent:
    return AuditEvent("cert.issue", "success", "provisioner:admin",
                      {"serial": f"{0x7f00 + i:x}", "names": [f"host{i}.test"], **extra})


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- format ----------------------------------------------------------------------------------
async def test_records_have_the_documented_format(tmp_path: Path) -> None:
    path = tmp_path / "audit" / "audit.jsonl"
    log = AuditLog(path)
    init = AuditEvent("ca.init", "success", "cli:root", {"name": "Test CA"})
    assert await asyncio.to_thread(log.append_sync, init) == 1  # as a CLI command would
    assert await log.append(issued(1)) == 2
    assert await log.append(AuditEvent("request.refused", "failure", "acme-account:abc",
                                       {"reason": "name not allowed"})) == 3
    await log.close()

    assert oct(path.stat().st_mode & 0o777) == "0o600", "the log must be private to the CA"
    lines = lines_of(path)
    records = [json.loads(line) for line in lines]
    assert [list(r) for r in records] == [
        ["seq", "time", "actor", "event", "outcome", "details", "prev"]] * 3
    assert [r["seq"] for r in records] == [1, 2, 3]
    assert records[0]["prev"] == "0" * 64
    assert records[1]["prev"] == sha256_hex(lines[0]), "prev is the SHA-256 of the line + newline"
    assert records[2]["prev"] == sha256_hex(lines[1])
    assert records[1]["details"] == {"serial": "7f01", "names": ["host1.test"]}
    assert records[2]["outcome"] == "failure" and records[2]["actor"] == "acme-account:abc"
    stamp = datetime.strptime(records[0]["time"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert abs(datetime.now(UTC) - stamp) < timedelta(minutes=1)
    for line, record in zip(lines, records, strict=True):  # compact, ASCII, one per line
        assert json.dumps(record, separators=(",", ":")).encode() + b"\n" == line
    assert tail(path, 2) == records[1:]
    assert tail(path, 10) == records


def test_events_are_checked_when_made() -> None:
    with pytest.raises(ValueError, match="success' or 'failure"):
        AuditEvent("cert.issue", "ok", "cli:root", {})
    with pytest.raises(ValueError, match="reserved|checkpoint"):
        AuditEvent("checkpoint", "success", "cli:root", {})
    with pytest.raises(ValueError, match="lowercase dotted"):
        AuditEvent("Cert Issue", "success", "cli:root", {})
    with pytest.raises(ValueError, match="actor"):
        AuditEvent("cert.issue", "success", "cli:\nroot", {})


async def test_names_from_requesters_cannot_smuggle_control_characters(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    await log.append(issued(1, cn="evil\u202e\x1b[2Jname\n"))
    await log.close()
    raw = (tmp_path / "audit.jsonl").read_bytes()
    assert raw.isascii() and raw.count(b"\n") == 1
    assert tail(tmp_path / "audit.jsonl", 1)[0]["details"]["cn"] == "evil\u202e\x1b[2Jname\n"


# -- one chain from many writers ---------------------------------------------------------------
async def test_concurrent_async_appends_share_batches(tmp_path: Path) -> None:
    ticks = iter(range(10**9))

    def clock() -> datetime:  # every batch reads the clock once: distinct times = batches
        return datetime(2026, 1, 1, tzinfo=UTC) + timedelta(microseconds=next(ticks))

    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, clock=clock)
    seqs = await asyncio.gather(*(log.append(issued(i)) for i in range(500)))
    await log.close()
    assert sorted(seqs) == list(range(1, 501))
    records = [json.loads(line) for line in lines_of(path)]
    assert [r["details"]["serial"] for r in records] == [f"{0x7f00 + i:x}" for i in range(500)], \
        "records must be written in the order they were appended"
    batches = len({r["time"] for r in records})
    assert batches < 100, f"500 concurrent appends took {batches} flock+fsync rounds"
    assert verify(path, []).ok


def _append_from_another_process(path: str, worker: int, count: int, start: Any) -> None:
    """Runs in a spawned process: half the records async (batched), half with append_sync."""
    start.wait(60)
    log = AuditLog(Path(path))

    async def run() -> None:
        half = count // 2
        for chunk in range(0, half, 20):
            await asyncio.gather(*(
                log.append(AuditEvent("cert.issue", "success", f"worker:{worker}",
                                      {"worker": worker, "n": n}))
                for n in range(chunk, min(half, chunk + 20))))
        await log.close()

    asyncio.run(run())
    log = AuditLog(Path(path))
    for n in range(count // 2, count):
        log.append_sync(AuditEvent("cert.renew", "success", f"worker:{worker}",
                                   {"worker": worker, "n": n}))


async def test_processes_and_threads_write_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit" / "audit.jsonl"
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(4)
    procs = [ctx.Process(target=_append_from_another_process, args=(str(path), w, 200, start))
             for w in range(3)]
    for p in procs:
        p.start()
    # Meanwhile, in this process: two threads on one AuditLog, one on its own, plus async.
    shared = AuditLog(path)
    own = AuditLog(path)

    def thread_appends(log: AuditLog, worker: int) -> None:
        for n in range(100):
            log.append_sync(AuditEvent("crl.generate", "success", f"thread:{worker}",
                                       {"worker": worker, "n": n}))

    threads = [threading.Thread(target=thread_appends, args=(log, 10 + i))
               for i, log in enumerate([shared, shared, own])]
    await asyncio.to_thread(start.wait, 60)
    for t in threads:
        t.start()
    await asyncio.gather(*(shared.append(AuditEvent("cert.issue", "success", "async",
                                                    {"worker": 20, "n": n}))
                           for n in range(100)))
    for t in threads:
        await asyncio.to_thread(t.join)
    for p in procs:
        await asyncio.to_thread(p.join, 120)
        assert p.exitcode == 0, f"writer process {p.pid} failed"
    await shared.close()
    await own.close()

    records = [json.loads(line) for line in lines_of(path)]
    total = 3 * 200 + 3 * 100 + 100
    assert [r["seq"] for r in records] == list(range(1, total + 1)), "seq must run 1..N, no gaps"
    seen = sorted((r["details"]["worker"], r["details"]["n"]) for r in records)
    expected = sorted([(w, n) for w in range(3) for n in range(200)]
                      + [(w, n) for w in (10, 11, 12, 20) for n in range(100)])
    assert seen == expected, "every append must appear exactly once"
    result = verify(path, [])
    assert result.ok and result.records == total, result.reason


# -- checkpoints -------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["ec-p256", "ec-p384", "rsa-2048"])
async def test_checkpoint_signature_verifies(tmp_path: Path, kind: str) -> None:
    key: SigningKey = (rsa.generate_private_key(65537, 2048) if kind.startswith("rsa") else
                       ec.generate_private_key(ec.SECP384R1() if kind == "ec-p384"
                                               else ec.SECP256R1()))
    cert = self_signed(key)
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    for i in range(5):
        await log.append(issued(i))
    assert await log.checkpoint(signer_for(key), cert, "server") == 6
    await log.close()

    lines = lines_of(path)
    checkpoint = json.loads(lines[-1])
    assert checkpoint["event"] == "checkpoint" and checkpoint["actor"] == "server"
    details = checkpoint["details"]
    assert details["head"] == sha256_hex(lines[4]) == checkpoint["prev"]
    assert details["seq"] == 5
    assert details["alg"] == ("rsa-pss-sha256" if kind.startswith("rsa") else "ecdsa-with-SHA256")
    assert details["certificate_sha256"] == cert.fingerprint(hashes.SHA256()).hex()
    result = verify(path, [cert])
    assert (result.ok, result.records, result.checkpoints, result.last_checkpoint_seq,
            result.reason) == (True, 6, 1, 6, None)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
async def test_checkpoint_verifies_with_openssl_as_documented(
        tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey, ec_cert: x509.Certificate) -> None:
    """docs/audit.md shows how to check a checkpoint without the appliance: that must work."""
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    await log.append(issued(1))
    await log.checkpoint(signer_for(ec_key), ec_cert, "server")
    await log.close()
    details = tail(path, 1)[0]["details"]
    (tmp_path / "msg").write_bytes(
        b"appliance-audit-checkpoint/v1 seq=%d head=%s" % (details["seq"],
                                                           details["head"].encode()))
    assert (tmp_path / "msg").read_bytes() == checkpoint_message(details["seq"], details["head"])
    (tmp_path / "sig").write_bytes(base64.b64decode(details["signature"]))
    (tmp_path / "cert.pem").write_bytes(ec_cert.public_bytes(serialization.Encoding.PEM))
    pub = subprocess.run(["openssl", "x509", "-in", tmp_path / "cert.pem", "-noout", "-pubkey"],
                         check=True, capture_output=True).stdout
    (tmp_path / "pub.pem").write_bytes(pub)
    out = subprocess.run(["openssl", "dgst", "-sha256", "-verify", tmp_path / "pub.pem",
                          "-signature", tmp_path / "sig", tmp_path / "msg"],
                         capture_output=True, text=True)
    assert out.stdout.strip() == "Verified OK", out.stdout + out.stderr


async def test_checkpoint_from_a_mismatched_signer_is_refused(
        tmp_path: Path, ec_cert: x509.Certificate) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    await log.append(issued(1))
    other = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(AuditError, match="does not verify with the given certificate"):
        await log.checkpoint(signer_for(other), ec_cert, "server")

    async def broken(message: bytes) -> bytes:
        raise RuntimeError("CKR_DEVICE_ERROR")
    with pytest.raises(AuditError, match="signing failed") as refused:
        await log.checkpoint(broken, ec_cert, "server")
    assert "CKR_" not in str(refused.value), "token internals must not leak into the error"
    assert await log.append(issued(2)) == 2, "a refused checkpoint leaves nothing behind"
    await log.close()


async def test_checkpoint_directly_follows_its_head_under_load(
        tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey, ec_cert: x509.Certificate) -> None:
    path = tmp_path / "audit.jsonl"
    log, other = AuditLog(path), AuditLog(path)  # two writers, as two worker processes

    async def flood(log: AuditLog, base: int) -> None:
        for chunk in range(5):
            await asyncio.gather(*(log.append(issued(base + chunk * 40 + i)) for i in range(40)))

    sign = signer_for(ec_key)
    await asyncio.gather(flood(log, 0), flood(other, 1000),
                         *(log.checkpoint(sign, ec_cert, "server") for _ in range(3)),
                         other.checkpoint(sign, ec_cert, "server"))
    await log.close()
    await other.close()
    result = verify(path, [ec_cert])
    assert result.ok and result.records == 404 and result.checkpoints == 4, result.reason


async def test_verify_says_which_records_no_checkpoint_covers_yet(
        tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey, ec_cert: x509.Certificate) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    await log.append(issued(1))
    result = verify(path, [ec_cert])
    assert result.ok and result.reason == (
        "record 1 (line 1) is not yet covered by a checkpoint (there is no checkpoint yet)")
    await log.checkpoint(signer_for(ec_key), ec_cert, "server")
    for i in range(3):
        await log.append(issued(i))
    await log.close()
    result = verify(path, [ec_cert])
    assert result.ok and result.last_checkpoint_seq == 2
    assert result.reason == ("records 3..5 (lines 3..5) are not yet covered by a checkpoint "
                             "(the last is record 2)")
    (tmp_path / "empty").touch()
    assert verify(tmp_path / "empty", []) == VerifyResult(True, 0, 0, None, None, None, None)


# -- tampering -----------------------------------------------------------------------------------
async def write_sample(path: Path, key: ec.EllipticCurvePrivateKey,
                       cert: x509.Certificate) -> None:
    """Records 1..9, a checkpoint as record 10, records 11..19, a checkpoint as record 20."""
    log = AuditLog(path)
    for i in range(1, 10):
        await log.append(issued(i))
    await log.checkpoint(signer_for(key), cert, "server")
    for i in range(11, 20):
        await log.append(issued(i))
    await log.checkpoint(signer_for(key), cert, "server")
    await log.close()


def edit_byte(lines: list[bytes]) -> list[bytes]:
    lines[4] = lines[4].replace(b"host5.test", b"host5.tesT")
    return lines


def delete_line(lines: list[bytes]) -> list[bytes]:
    del lines[4]
    return lines


def delete_first_line(lines: list[bytes]) -> list[bytes]:
    del lines[0]
    return lines


def swap_lines(lines: list[bytes]) -> list[bytes]:
    lines[4], lines[5] = lines[5], lines[4]
    return lines


def truncate_last_line(lines: list[bytes]) -> list[bytes]:
    lines[-1] = lines[-1][:-20]
    return lines


def insert_forged_line(lines: list[bytes]) -> list[bytes]:
    """A well-formed record with the right seq and prev, slipped in after record 7."""
    forged = json.loads(lines[6])
    forged.update(seq=8, prev=sha256_hex(lines[6]), details={"serial": "dead", "names": []})
    lines.insert(7, json.dumps(forged, separators=(",", ":")).encode() + b"\n")
    return lines


def tamper_signature(lines: list[bytes]) -> list[bytes]:
    record = json.loads(lines[9])
    sig = bytearray(base64.b64decode(record["details"]["signature"]))
    sig[-1] ^= 1
    record["details"]["signature"] = base64.b64encode(bytes(sig)).decode()
    lines[9] = json.dumps(record, separators=(",", ":")).encode() + b"\n"
    return lines


def rewrite_chain(lines: list[bytes]) -> list[bytes]:
    """Edit record 3 and recompute every prev after it: only the checkpoint can tell."""
    return relink(edit_line(lines, 2, lambda r: r["details"].update(serial="beef")), 3,
                  move_heads=False)


def rewrite_chain_and_head(lines: list[bytes]) -> list[bytes]:
    """As rewrite_chain, and also set the checkpoint's head: now its signature is wrong."""
    return relink(edit_line(lines, 2, lambda r: r["details"].update(serial="beef")), 3,
                  move_heads=True)


def relink(lines: list[bytes], start: int, *, move_heads: bool) -> list[bytes]:
    """What a forger without the key does: make every prev from `start` on match again."""
    for i in range(start, len(lines)):
        record = json.loads(lines[i])
        record["prev"] = sha256_hex(lines[i - 1])
        if move_heads and record["event"] == "checkpoint":
            record["details"]["head"] = record["prev"]
        lines[i] = json.dumps(record, separators=(",", ":")).encode() + b"\n"
    return lines


def edit_line(lines: list[bytes], index: int,
              change: Callable[[dict[str, Any]], Any]) -> list[bytes]:
    record = json.loads(lines[index])
    change(record)
    lines[index] = json.dumps(record, separators=(",", ":")).encode() + b"\n"
    return lines


@pytest.mark.parametrize(("tamper", "bad_seq", "bad_line", "says"), [
    (edit_byte, 6, 6, "record 6 (line 6): prev does not match the SHA-256 of line 5 — a record "
                      "was edited, deleted or reordered"),
    (delete_line, 6, 5, "record 6 (line 5): prev does not match the SHA-256 of line 4 — a record "
                        "was edited, deleted or reordered (seq 6 where 5 was expected)"),
    (delete_first_line, 2, 1, "record 2 (line 1): the first record's prev is not 00000000…: "
                              "the log does not start here"),
    (swap_lines, 6, 5, "record 6 (line 5): prev does not match the SHA-256 of line 4"),
    (truncate_last_line, 20, 20, "record 20 (line 20): the last line is incomplete"),
    (insert_forged_line, 8, 9, "record 8 (line 9): prev does not match the SHA-256 of line 8"),
    (tamper_signature, 10, 10, "record 10 (line 10): checkpoint signature does not verify"),
    (rewrite_chain, 10, 10, "record 10 (line 10): checkpoint head is not the SHA-256 of the line "
                            "before it"),
    (rewrite_chain_and_head, 10, 10, "record 10 (line 10): checkpoint signature does not verify"),
])
async def test_verify_finds_and_names_tampering(
        tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey, ec_cert: x509.Certificate,
        tamper: Callable[[list[bytes]], list[bytes]], bad_seq: int | None, bad_line: int,
        says: str) -> None:
    path = tmp_path / "audit.jsonl"
    await write_sample(path, ec_key, ec_cert)
    clean = verify(path, [ec_cert])
    assert (clean.ok, clean.records, clean.checkpoints, clean.reason) == (True, 20, 2, None)

    path.write_bytes(b"".join(tamper(lines_of(path))))
    result = verify(path, [ec_cert])
    assert not result.ok, f"{tamper.__name__} went unnoticed"
    assert result.reason is not None and result.reason.startswith(says), result.reason
    assert (result.first_bad_seq, result.first_bad_line) == (bad_seq, bad_line), result.reason
    assert "\n" not in result.reason


async def test_checkpoint_by_an_unknown_certificate_fails(
        tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey, ec_cert: x509.Certificate) -> None:
    path = tmp_path / "audit.jsonl"
    await write_sample(path, ec_key, ec_cert)
    result = verify(path, [])
    assert not result.ok and result.first_bad_seq == 10
    assert result.reason is not None and "not among the certificates" in result.reason
    assert verify(path, [self_signed(ec.generate_private_key(ec.SECP256R1())), ec_cert]).ok


# -- secrets -------------------------------------------------------------------------------------
async def test_secrets_never_reach_the_file(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    jwt = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJhIn0.c2lnbmF0dXJl"
    await log.append(AuditEvent("token.login", "success", "admin-socket:uid=0", {
        "pin": "SECRET-1", "issuerPin": "SECRET-2", "password": "SECRET-3",
        "token": "SECRET-4", "ott": "SECRET-5", "share": "SECRET-6", "private_key": "SECRET-7",
        "key_pem": "SECRET-8", "key": "SECRET-9", "client_secret": "SECRET-10",
        "provisioner": {"name": "admin", "password": "SECRET-11", "kid": "kid-1"},
        "custodians": [{"index": 1, "mnemonic": "SECRET-12"}], "shares": ["SECRET-14"],
        "note": f"bearer {jwt}",
        "csr_key": "-----BEGIN EC PRIVATE KEY-----\nSECRET-13\n-----END EC PRIVATE KEY-----",
        "serial": "7f01", "names": ["a.test"], "key_id": "kid-2", "public_key_sha256": "ab",
        "label": "appliance-issuer",
    }))
    await log.close()
    raw = path.read_text()
    assert "SECRET" not in raw and jwt not in raw, raw
    assert tail(path, 1)[0]["details"] == {
        "provisioner": {"name": "admin", "kid": "kid-1"}, "custodians": [{"index": 1}],
        "note": "bearer [redacted-jwt]", "csr_key": "[redacted]", "serial": "7f01",
        "names": ["a.test"], "key_id": "kid-2", "public_key_sha256": "ab",
        "label": "appliance-issuer"}


async def test_details_that_are_not_json_are_refused(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    with pytest.raises(AuditError, match="bytes is not JSON"):
        await log.append(issued(1, der=b"\x30\x00"))
    with pytest.raises(AuditError, match="cannot be recorded"):
        await log.append(issued(1, ratio=float("nan")))
    assert await log.append(issued(1, at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC))) == 1
    await log.close()
    assert tail(tmp_path / "audit.jsonl", 1)[0]["details"]["at"] == "2026-01-02T03:04:05.000000Z"


# -- fail closed ---------------------------------------------------------------------------------
async def test_unwritable_log_refuses_appends(tmp_path: Path) -> None:
    (tmp_path / "is-a-dir").mkdir()
    (tmp_path / "a-file").write_text("")
    for path in (tmp_path / "is-a-dir", tmp_path / "a-file" / "audit.jsonl"):
        log = AuditLog(path)
        with pytest.raises(AuditError, match=f"cannot open the audit log {path}"):
            await log.append(issued(1))
        with pytest.raises(AuditError, match="cannot open"):
            await asyncio.to_thread(log.append_sync, issued(2))
        await log.close()


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
async def test_full_disk_refuses_appends(tmp_path: Path) -> None:
    """/dev/full fails every write with ENOSPC, as a full file system does."""
    (tmp_path / "audit.jsonl").symlink_to("/dev/full")
    log = AuditLog(tmp_path / "audit.jsonl")
    with pytest.raises(AuditError, match="No space left on device"):
        await log.append(issued(1))
    with pytest.raises(AuditError, match="No space left on device"):
        await asyncio.to_thread(log.append_sync, issued(2))
    await log.close()


def _append_as_nobody(path: Path, conn: Any) -> None:
    if os.geteuid() == 0:
        os.setuid(65534)  # root would write to a read-only directory anyway
    async def main() -> str:
        log = AuditLog(path)
        try:
            await log.append(issued(1))
            return "written"
        except AuditError as e:
            return f"refused: {e}"
        finally:
            await log.close()
    conn.send(asyncio.run(main()))


def test_read_only_directory_refuses_appends(tmp_path: Path) -> None:
    """A directory the writer may not write to: append raises AuditError (fail closed).

    The writer runs in a forked child that gives up root, so this holds on CI as root too."""
    import multiprocessing

    audit_dir = tmp_path / "audit"
    audit_dir.mkdir(mode=0o555)
    tmp_path.chmod(0o755)
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=_append_as_nobody, args=(audit_dir / "audit.jsonl", child))
    process.start()
    outcome = parent.recv() if parent.poll(60) else "no answer"
    process.join(10)
    assert outcome.startswith("refused:") and "Permission denied" in outcome, outcome
    assert not (audit_dir / "audit.jsonl").exists()


# -- a torn last record: cut off, kept aside, recorded -------------------------------------------
TORN = b'{"seq":4,"time":"2026-12-08T10:11:12.000000Z","actor":"provisioner:admin","ev'


def repairs_in(path: Path) -> list[dict[str, Any]]:
    return [r for r in map(json.loads, lines_of(path)) if r["event"] == "audit.repair"]


def kept_files(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f"{path.name}.torn-*"))


async def log_with_records(path: Path, count: int) -> AuditLog:
    log = AuditLog(path)
    for i in range(count):
        await log.append(issued(i))
    return log


async def test_a_torn_last_record_is_kept_aside_cut_off_and_recorded(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = await log_with_records(path, 3)
    await log.close()
    complete = path.read_bytes()
    with path.open("ab") as f:
        f.write(TORN)

    log = AuditLog(path)
    assert await log.append(issued(3)) == 5, "the repair record takes seq 4, the new one 5"
    await log.close()
    (kept,) = kept_files(path)
    assert kept.read_bytes() == TORN, "the fragment's bytes must be kept, unchanged"
    assert kept.stat().st_mode & 0o777 == 0o600
    lines = lines_of(path)
    assert b"".join(lines[:3]) == complete, "the complete records must stay as they were"
    repair = json.loads(lines[3])
    assert (repair["seq"], repair["event"], repair["outcome"]) == (4, "audit.repair", "success")
    assert repair["details"] == {"torn_bytes": len(TORN), "torn_sha256": sha256_hex(TORN),
                                 "kept_in": kept.name, "offset": len(complete)}
    assert repair["prev"] == sha256_hex(lines[2]), "the repair chains onto the last whole line"
    assert json.loads(lines[4])["details"]["serial"] == f"{0x7f03:x}"
    result = verify(path, [])
    assert result.ok, result.reason
    ((seq, line, size, digest, name),) = [
        (r.seq, r.line, r.torn_bytes, r.torn_sha256, r.kept_in) for r in result.repairs]
    assert (seq, line, size, digest, name) == (4, 4, len(TORN), sha256_hex(TORN), kept.name)

    # A second tear later on, with the same clock second: its own file, its own record.
    with path.open("ab") as f:
        f.write(b'{"seq":6,"ti')
    log = AuditLog(path, clock=lambda: datetime(2026, 12, 8, 10, 0, tzinfo=UTC))
    await log.append(issued(4))
    with path.open("ab") as f:
        f.write(b'{"s')  # another process tore a record after this one's last write
    await log.append(issued(5))
    await log.close()
    assert len(kept_files(path)) == 3
    result = verify(path, [])
    assert result.ok, result.reason
    assert [(tmp_path / r.kept_in).read_bytes() for r in result.repairs] == [
        TORN, b'{"seq":6,"ti', b'{"s']
    assert result.repairs[2].kept_in == result.repairs[1].kept_in + "-2"
    assert [r["seq"] for r in map(json.loads, lines_of(path))] == list(range(1, 10))


async def test_a_log_that_is_only_a_fragment_starts_its_chain_after_the_repair(
        tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b'{"seq":1,"time":"2026-')
    log = AuditLog(path)
    assert await log.append(issued(1)) == 2
    await log.close()
    result = verify(path, [])
    assert result.ok and result.records == 2 and result.repairs[0].offset == 0, result


def _die_mid_record(path: str, fragment: bytes, ready: Any) -> None:
    """Runs in a spawned process: a writer that holds the lock and has written half a record."""
    import fcntl

    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, fragment)
    ready.set()
    time.sleep(120)  # killed by the test long before


def _append_one(path: str, worker: int) -> None:
    AuditLog(Path(path)).append_sync(AuditEvent("cert.issue", "success", f"worker:{worker}",
                                                {"worker": worker}))


async def test_a_write_in_progress_is_not_torn_and_one_writer_repairs_after_a_kill(
        tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = await log_with_records(path, 3)
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    dying = ctx.Process(target=_die_mid_record, args=(str(path), TORN, ready))
    dying.start()
    try:
        assert await asyncio.to_thread(ready.wait, 60), "the dying writer never got the lock"
        others = [ctx.Process(target=_append_one, args=(str(path), w)) for w in range(3)]
        for p in others:
            p.start()
        mine = asyncio.ensure_future(log.append(issued(9)))
        await asyncio.sleep(1.5)  # every other writer is now waiting for the lock
        assert not mine.done(), "a writer went ahead while another held the lock"
        assert path.read_bytes().endswith(TORN) and not kept_files(path), \
            "a fragment still being written (its writer holds the lock) was treated as torn"
    finally:
        dying.kill()  # the kill -9 of a worker in the middle of its audit write
        await asyncio.to_thread(dying.join, 30)
    await asyncio.wait_for(mine, 30)
    for p in others:
        await asyncio.to_thread(p.join, 60)
        assert p.exitcode == 0, f"writer process {p.pid} failed after the repair"
    await log.close()
    assert len(repairs_in(path)) == 1, "exactly one writer must repair"
    assert [p.read_bytes() for p in kept_files(path)] == [TORN]
    result = verify(path, [])
    assert result.ok and result.records == 3 + 1 + 3 + 1, result.reason
    assert [r["seq"] for r in map(json.loads, lines_of(path))] == list(range(1, 9))


async def test_check_at_start_repairs_a_torn_tail_and_refuses_a_mid_file_edit(
        tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = await log_with_records(path, 5)
    await log.close()
    with path.open("ab") as f:
        f.write(TORN)
    AuditLog(path).check_chain_sync()
    assert path.read_bytes().endswith(b"\n") and len(kept_files(path)) == 1
    assert verify(path, []).ok

    lines = lines_of(path)
    lines[2] = lines[2].replace(b'"success"', b'"failure"')
    edited = b"".join(lines) + b'{"seq":7,'
    path.write_bytes(edited)
    with pytest.raises(AuditError) as refused:
        AuditLog(path).check_chain_sync()
    assert ("is broken at record 4 (line 4): prev does not match the SHA-256 of line 3 — a "
            "record was edited") in str(refused.value), refused.value
    assert path.read_bytes() == edited and len(kept_files(path)) == 1, \
        "a log refused at start must be left as it was"


def test_repair_records_are_the_writers_own() -> None:
    with pytest.raises(ValueError, match="audit.repair records are written by AuditLog"):
        AuditEvent("audit.repair", "success", "someone", {"torn_bytes": 1})


async def test_verify_refuses_a_repair_record_with_bad_details(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b'{"seq":1,"ti')
    log = AuditLog(path)
    await log.append(issued(1))
    await log.close()
    lines = edit_line(lines_of(path), 0, lambda r: r["details"].update(torn_bytes="12"))
    path.write_bytes(b"".join(lines))
    result = verify(path, [])
    assert not result.ok and result.reason is not None
    assert result.reason.startswith("record 1 (line 1): audit.repair torn_bytes is not"), result


async def test_log_that_shrinks_under_a_writer_stops_it(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    for i in range(3):
        await log.append(issued(i))
    lines = lines_of(path)
    with path.open("r+b") as f:  # someone removes the last record in place
        f.truncate(len(lines[0]) + len(lines[1]))
    with pytest.raises(AuditError, match="shrank .* records were removed"):
        await log.append(issued(4))
    with pytest.raises(AuditError, match="shrank"):
        await log.append(issued(5))
    await log.close()


async def test_a_deleted_log_continues_the_chain_instead_of_restarting_it(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    for i in range(3):
        await log.append(issued(i))
    head = sha256_hex(lines_of(path)[-1])
    path.unlink()
    assert await log.append(issued(4)) == 4
    await log.close()
    alone = verify(path, [])
    assert not alone.ok and alone.reason is not None and "does not start here" in alone.reason
    assert verify(path, [], previous_head=head).ok


async def test_closed_log_refuses_appends(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    pending = [asyncio.ensure_future(log.append(issued(i))) for i in range(50)]
    await asyncio.sleep(0)
    await log.close()
    assert sorted(await asyncio.gather(*pending)) == list(range(1, 51)), \
        "records queued before close must be written"
    with pytest.raises(AuditError, match="closed"):
        await log.append(issued(99))


def test_append_sync_inside_an_event_loop_is_a_bug(tmp_path: Path) -> None:
    async def misuse() -> None:
        AuditLog(tmp_path / "audit.jsonl").append_sync(issued(1))
    with pytest.raises(RuntimeError, match="use await append"):
        asyncio.run(misuse())


# -- throughput (printed, not asserted) ------------------------------------------------------------
def _throughput_worker(path: str, count: int, start: Any) -> None:
    start.wait(60)  # all interpreters imported and ready: the clock starts now
    log = AuditLog(Path(path))

    async def run() -> None:
        sem = asyncio.Semaphore(200)  # about as many requests in flight as a busy worker has

        async def one(i: int) -> None:
            async with sem:
                await log.append(issued(i))
        await asyncio.gather(*(one(i) for i in range(count)))
        await log.close()
    asyncio.run(run())


async def test_throughput(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rates: list[str] = []

    for fsync in (True, False):
        log = AuditLog(tmp_path / f"async-{fsync}.jsonl", fsync=fsync)
        t0 = time.perf_counter()
        for chunk in range(0, 10000, 500):
            await asyncio.gather(*(log.append(issued(i)) for i in range(chunk, chunk + 500)))
        rate = 10000 / (time.perf_counter() - t0)
        await log.close()
        rates.append(f"async batched, fsync={fsync}: {rate:,.0f} appends/s")

    log = AuditLog(tmp_path / "sync.jsonl")
    t0 = time.perf_counter()
    for i in range(300):
        await asyncio.to_thread(log.append_sync, issued(i))
    rates.append(f"append_sync, fsync=True, one at a time: "
                 f"{300 / (time.perf_counter() - t0):,.0f} appends/s")
    await log.close()

    path = tmp_path / "procs.jsonl"
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(4)
    procs = [ctx.Process(target=_throughput_worker, args=(str(path), 5000, start))
             for _ in range(3)]
    for p in procs:
        p.start()
    await asyncio.to_thread(start.wait, 60)
    t0 = time.perf_counter()
    for p in procs:
        await asyncio.to_thread(p.join, 120)
        assert p.exitcode == 0
    rate = 15000 / (time.perf_counter() - t0)
    result = verify(path, [])
    assert result.ok and result.records == 15000, result.reason
    rates.append(f"3 processes x 200 in flight, fsync=True: {rate:,.0f} appends/s")
    t0 = time.perf_counter()
    verify(path, [])
    rates.append(f"verify: {15000 / (time.perf_counter() - t0):,.0f} records/s")
    with capsys.disabled():
        print("\naudit throughput:\n  " + "\n  ".join(rates))
