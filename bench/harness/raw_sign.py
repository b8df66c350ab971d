"""(a) The issuer key's raw signing rate through the KeyStore, the reference for the ratio.

In one process and in two at once: a key.sign() loop on the PKCS#11 thread, the same calls from
another thread (each hops to the PKCS#11 thread), and building + token-signing a leaf in process
(the ceiling of issuance without HTTP, TLS, token checks and the database).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from harness.ca import KeyAccess
from harness.common import say


def _timed_loop(fn: Any, seconds: float) -> tuple[int, float]:
    n = 0
    start = time.perf_counter()
    end = start + seconds
    while True:
        fn()
        n += 1
        if n % 32 == 0 and time.perf_counter() >= end:
            return n, time.perf_counter() - start


BARRIER_TIMEOUT = 120.0


def raw_sign_child(access: KeyAccess, seconds: float, barrier: Any, results: Any) -> None:
    try:
        results.put(_raw_sign_child(access, seconds, barrier))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which retries or fails
        with contextlib.suppress(Exception):
            barrier.abort()  # do not leave the sibling waiting
        results.put({"fatal": f"{type(e).__name__}: {e}"})


def _raw_sign_child(access: KeyAccess, seconds: float, barrier: Any) -> dict[str, Any]:
    """One process: log in, then time signatures on the PKCS#11 thread, hopped, and leaf builds."""
    os.environ["SOFTHSM2_CONF"] = access.softhsm_conf  # before the module is loaded
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from hsm.pkcs11_store import Pkcs11KeyStore

    out: dict[str, Any] = {}
    ks = Pkcs11KeyStore.open(access.module, access.token, access.pin)
    try:
        key = ks.private_key(ks.find_uri(access.key_uri))
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise SystemExit("the benchmark's raw loop expects an EC issuer key")
        out["key"] = f"EC {key.curve.name} ({type(key).__name__})"
        algorithm = ec.ECDSA(hashes.SHA256())
        tbs = secrets.token_bytes(420)  # about the size of a leaf's to-be-signed part

        def sign() -> None:
            key.sign(tbs, algorithm)

        intermediate = x509.load_pem_x509_certificate(access.intermediate_pem)
        leaf_public = ec.generate_private_key(ec.SECP256R1()).public_key()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "raw.bench.test")])
        now = datetime.now(UTC)

        def build() -> None:
            (x509.CertificateBuilder().subject_name(name).issuer_name(intermediate.subject)
             .public_key(leaf_public).serial_number(x509.random_serial_number())
             .not_valid_before(now).not_valid_after(now.replace(year=now.year + 1))
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.SubjectAlternativeName([x509.DNSName("raw.bench.test")]),
                            critical=False)
             .sign(key, hashes.SHA256()))

        ks.run(_timed_loop, sign, 0.3)  # warm up
        barrier.wait(BARRIER_TIMEOUT)
        out["on_thread"] = ks.run(_timed_loop, sign, seconds)
        barrier.wait(BARRIER_TIMEOUT)
        out["hopped"] = _timed_loop(sign, seconds)
        barrier.wait(BARRIER_TIMEOUT)
        out["build"] = ks.run(_timed_loop, build, seconds)
    finally:
        ks.close()
    return out


@dataclass
class RawRates:
    key: str
    on_thread_1: float
    hopped_1: float
    build_1: float
    on_thread_2: float
    hopped_2: float
    build_2: float


def measure_raw(access: KeyAccess, seconds: float) -> RawRates:
    rates = {procs: _raw_round(access, seconds, procs) for procs in (1, 2)}

    def rate(procs: int, what: str) -> float:
        return float(sum(r[what][0] / r[what][1] for r in rates[procs]))

    return RawRates(rates[1][0]["key"], rate(1, "on_thread"), rate(1, "hopped"), rate(1, "build"),
                    rate(2, "on_thread"), rate(2, "hopped"), rate(2, "build"))


def _raw_round(access: KeyAccess, seconds: float, procs: int, attempts: int = 3
               ) -> list[dict[str, Any]]:
    """Run `procs` raw-signing processes side by side; retry when one of them fails.

    SoftHSM2 2.6.1 sometimes reports the token as absent to a process that opens it while other
    processes use it ("Token integrity check failed", SoftHSMv2 issue #757), so a failed login
    is retried with fresh processes and reported.
    """
    ctx = multiprocessing.get_context("spawn")
    failures: list[str] = []
    for _ in range(attempts):
        barrier = ctx.Barrier(procs)
        results = ctx.Queue()
        children = [ctx.Process(target=raw_sign_child, args=(access, seconds, barrier, results),
                                daemon=True) for _ in range(procs)]
        for c in children:
            c.start()
        try:
            outs = [results.get(timeout=BARRIER_TIMEOUT + 4 * seconds + 60) for _ in children]
        except queue.Empty:
            outs = [{"fatal": "no result from a raw signing process"}]
        for c in children:
            c.join(30)
            if c.is_alive():
                c.kill()
        fatal = [o["fatal"] for o in outs if "fatal" in o]
        if not fatal:
            return outs
        failures += fatal
        say(f"  raw signing with {procs} process(es) failed ({'; '.join(fatal)}); retrying")
    raise SystemExit(f"raw signing failed {attempts} times: {failures}")
