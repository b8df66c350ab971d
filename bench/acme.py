"""ACME issuance benchmark: full RFC 8555 flows against a real server on 127.0.0.1.

Each certificate is a whole ACME issuance by an in-process client (new order -> authorization
-> http-01 challenge answered by a responder in this process and validated by the CA over HTTP
-> finalize -> certificate download), at a given concurrency. It prints certificates/s and
p50/p99 per certificate, checks that every certificate is in the CA's database, and then times
the real lego binary issuing one certificate after another.

    .venv/bin/python bench/acme.py [--duration 10] [--concurrency 8] [--workers 2] [--no-pin]
        [--lego 5] [--raw-seconds 1] [--profile 6] [--keep]

It also prints the issuer key's raw signing rate (the machine's yardstick), the server's CPU per
certificate by thread, and how many HTTP requests one issuance took; --profile runs py-spy on
the workers during the timed phase.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import ipaddress
import json
import math
import multiprocessing
import os
import shutil
import sqlite3
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/harness
from harness.ca import Ca, Server, create_ca, key_access  # noqa: E402
from harness.common import APPLIANCTL, free_port, percentile, say  # noqa: E402
from harness.cpu import Profiler  # noqa: E402
from harness.raw_sign import measure_raw  # noqa: E402

from appliance.acme import jws  # noqa: E402

# IP identifiers are validated over HTTP without name resolution; each load-generator process
# uses its own loopback address (127.0.0.1, 127.0.0.2, ...) so each gets its own challenges.


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sign_es256(key: ec.EllipticCurvePrivateKey, header: dict[str, Any],
               payload: dict[str, Any] | None) -> bytes:
    """A flattened ES256 JWS (RFC 7515) made with cryptography directly.

    A JOSE library (the tests sign with jwcrypto, independently of the server's verifier)
    costs the load generator several times more CPU, which it takes from the server on this
    shared machine.
    """
    protected = b64url(json.dumps(header, separators=(",", ":")).encode())
    body = b64url(b"" if payload is None else json.dumps(payload, separators=(",", ":")).encode())
    r, s = decode_dss_signature(key.sign(f"{protected}.{body}".encode(), ec.ECDSA(hashes.SHA256())))
    signature = b64url(r.to_bytes(32, "big") + s.to_bytes(32, "big"))
    return json.dumps({"protected": protected, "payload": body, "signature": signature}).encode()


def setup_acme(ca: Ca, http_port: int, tls_port: int) -> str:
    subprocess.run([str(APPLIANCTL), "provisioner", "add", "acme", "--type", "ACME"],
                   env=ca.env(), check=True, capture_output=True, timeout=60)
    path = ca.home / "config" / "ca.json"
    config = json.loads(path.read_text())
    # The responders are on 127.0.0.1, which validation denies unless ca.json allows it.
    config["acme"] = {"httpPort": http_port, "tlsPort": tls_port,
                      "validationAllowRanges": ["127.0.0.0/8"]}
    path.write_text(json.dumps(config, indent=2))
    return f"https://localhost:{ca.port}/acme/acme/directory"


class Client:
    """One ACME account; requests carry the nonce the previous answer gave."""

    def __init__(self, session: aiohttp.ClientSession, directory: dict[str, str]) -> None:
        self.session = session
        self.directory = directory
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.jwk = jws.public_jwk(self.key.public_key())
        self.kid: str | None = None
        self.nonce: str | None = None
        self.requests = 0

    async def fresh_nonce(self) -> None:
        self.requests += 1
        async with self.session.head(self.directory["newNonce"]) as resp:
            self.nonce = resp.headers["Replay-Nonce"]

    async def post(self, url: str, payload: dict[str, Any] | None) -> tuple[int, Any, Any]:
        for _ in range(3):
            if self.nonce is None:
                await self.fresh_nonce()
            self.requests += 1
            header: dict[str, Any] = {"alg": "ES256"}
            if self.kid:
                header["kid"] = self.kid
            else:
                header["jwk"] = self.jwk
            header.update(nonce=self.nonce, url=url)
            body = sign_es256(self.key, header, payload)
            async with self.session.post(url, data=body, headers={
                    "Content-Type": "application/jose+json"}) as resp:
                self.nonce = resp.headers.get("Replay-Nonce")
                text = await resp.read()
                if resp.status == 400 and b"badNonce" in text:
                    continue
                ctype = resp.headers.get("Content-Type", "")
                data = json.loads(text) if "json" in ctype else text
                return resp.status, data, resp.headers
        raise RuntimeError("badNonce three times in a row")

    async def register(self) -> None:
        status, _, headers = await self.post(self.directory["newAccount"],
                                             {"termsOfServiceAgreed": True})
        if status not in (200, 201):
            raise RuntimeError(f"newAccount failed: {status}")
        self.kid = headers["Location"]


async def issue_one(client: Client, tokens: dict[str, str], csr_b64: str, ip: str) -> bytes:
    status, order, headers = await client.post(
        client.directory["newOrder"], {"identifiers": [{"type": "ip", "value": ip}]})
    if status != 201:
        raise RuntimeError(f"newOrder {status}: {order}")
    order_url = headers["Location"]
    (authz_url,) = order["authorizations"]
    _, authz, _ = await client.post(authz_url, None)
    chal = next(c for c in authz["challenges"] if c["type"] == "http-01")
    tokens[chal["token"]] = jws.key_authorization(chal["token"], client.jwk)
    _, chal, _ = await client.post(chal["url"], {})
    # The server answers the challenge POST once its validation is done (if that is quick), so
    # like lego the client polls the authorization only while the challenge is still in progress.
    if chal.get("status") != "valid":
        for _ in range(1000):
            _, authz, _ = await client.post(authz_url, None)
            if authz["status"] != "pending":
                break
            await asyncio.sleep(0.005)
        if authz["status"] != "valid":
            raise RuntimeError(f"authorization {authz['status']}: {authz['challenges']}")
    tokens.pop(chal["token"], None)
    status, order, _ = await client.post(order["finalize"], {"csr": csr_b64})
    while order.get("status") == "processing":
        await asyncio.sleep(0.01)
        _, order, _ = await client.post(order_url, None)
    if order.get("status") != "valid":
        raise RuntimeError(f"finalize: {status} {order}")
    status, pem, _ = await client.post(order["certificate"], None)
    if status != 200 or not pem.startswith(b"-----BEGIN CERTIFICATE"):
        raise RuntimeError(f"download {status}")
    return bytes(pem)


async def responder(ip: str, port: int, tokens: dict[str, str]) -> web.AppRunner:
    async def answer(request: web.Request) -> web.Response:
        key_auth = tokens.get(request.match_info["token"])
        if key_auth is None:
            return web.Response(status=404)
        return web.Response(text=key_auth)

    app = web.Application()
    app.router.add_get("/.well-known/acme-challenge/{token}", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, ip, port).start()
    return runner


async def drive(url: str, root: Path, http_port: int, concurrency: int, duration: float,
                start_at: float, ip: str) -> dict[str, Any]:
    tokens: dict[str, str] = {}
    runner = await responder(ip, http_port, tokens)
    ssl_ctx = ssl.create_default_context(cafile=str(root))
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
           .add_extension(x509.SubjectAlternativeName(
               [x509.IPAddress(ipaddress.ip_address(ip))]), critical=True)
           .sign(key, hashes.SHA256()))
    csr_b64 = b64url(csr.public_bytes(serialization.Encoding.DER))
    connector = aiohttp.TCPConnector(limit=concurrency * 2, ssl=ssl_ctx)
    latencies: list[float] = []
    errors: list[str] = []
    requests = 0
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.get(url) as resp:
            directory = await resp.json()
        clients = [Client(session, directory) for _ in range(concurrency)]
        await asyncio.gather(*(c.register() for c in clients))
        await issue_one(clients[0], tokens, csr_b64, ip)  # warm up
        await asyncio.sleep(max(start_at - time.time(), 0))
        deadline = time.monotonic() + duration
        began = time.monotonic()
        before = sum(c.requests for c in clients)
        cpu_before = time.process_time()

        async def loop(client: Client) -> None:
            while time.monotonic() < deadline:
                t = time.perf_counter()
                try:
                    await issue_one(client, tokens, csr_b64, ip)
                    latencies.append(time.perf_counter() - t)
                except Exception as e:  # noqa: BLE001 - counted and shown
                    errors.append(f"{type(e).__name__}: {e}"[:300])

        await asyncio.gather(*(loop(c) for c in clients))
        elapsed = time.monotonic() - began
        requests = sum(c.requests for c in clients) - before
        cpu = time.process_time() - cpu_before
    await runner.cleanup()
    return {"latencies": latencies, "errors": errors, "elapsed": elapsed, "requests": requests,
            "cpu": cpu}


def child(args: tuple[Any, ...], results: Any) -> None:
    results.put(asyncio.run(drive(*args)))


def count_acme_certs(db: Path) -> int:
    conn = sqlite3.connect(db)
    try:
        row = conn.execute("SELECT count(*) FROM acme_orders WHERE status = 'valid'").fetchone()
        return int(row[0])
    finally:
        conn.close()


def time_lego(url: str, root: Path, http_port: int, count: int, work: Path) -> list[float]:
    if shutil.which("lego") is None:
        say("lego is not installed: skipping the lego timing")
        return []
    env = dict(os.environ, LEGO_CA_CERTIFICATES=str(root))
    times = []
    for i in range(count):
        path = work / f"lego-{i}"
        cmd = ["lego", "--accept-tos", "--email", "bench@example.test", "--server", url,
               "--path", str(path), "--http", "--http.port", f":{http_port}",
               "-d", "localhost", "run"]
        t = time.perf_counter()
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120,
                             check=False)
        elapsed = time.perf_counter() - t
        if out.returncode != 0:
            say(f"lego failed: {out.stderr[-500:]}")
            return times
        times.append(elapsed)
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--processes", type=int, default=2, help="load-generator processes")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--no-pin", action="store_true",
                   help="let the workers run on any CPU (ca.json pinWorkers: false)")
    p.add_argument("--lego", type=int, default=5, help="lego issuances to time (0: none)")
    p.add_argument("--raw-seconds", type=float, default=1.0,
                   help="seconds per raw token signing measurement (0: skip)")
    p.add_argument("--profile", type=float, default=0.0, metavar="SECONDS",
                   help="py-spy record every server worker for SECONDS of the timed phase")
    p.add_argument("--native", action="store_true", help="with --profile: native frames too")
    p.add_argument("--keep", action="store_true",
                   help="keep the temporary CA directory and py-spy output (holds PIN files!)")
    args = p.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="acme-bench-"))
    http_port, tls_port = free_port(), free_port()
    ca = create_ca(work, free_port(), pin_workers=not args.no_pin)
    url = setup_acme(ca, http_port, tls_port)
    server = Server(ca, args.workers)
    server.start()
    code = 0
    try:
        say(f"load average before start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        if args.raw_seconds > 0:
            raw = measure_raw(key_access(ca), args.raw_seconds)
            say(f"raw token signing ({raw.key}, key.sign() on the PKCS#11 thread): "
                f"{raw.on_thread_1:,.0f}/s 1 process, {raw.on_thread_2:,.0f}/s 2 processes; "
                f"build + sign a leaf: {raw.build_1:,.0f}/s 1 process")
        profiler = Profiler(work, args.profile, args.native) if args.profile > 0 else None
        procs = min(args.processes, args.concurrency)
        per = [args.concurrency // procs + (1 if i < args.concurrency % procs else 0)
               for i in range(procs)]
        mp = multiprocessing.get_context("spawn")
        results = mp.Queue()
        start_at = time.time() + 3.0
        children = [mp.Process(target=child, args=((url, ca.root_path, http_port, n,
                                                    args.duration, start_at, f"127.0.0.{i + 1}"),
                                                   results))
                    for i, n in enumerate(per)]
        server.label_threads()
        cpu0 = server.cpu_seconds()
        threads0 = server.thread_cpu()
        for c in children:
            c.start()
        spies = None
        if profiler is not None:
            time.sleep(max(start_at - time.time(), 0) + 0.5)
            spies = profiler.start(server, args.duration, args.concurrency)
        outs = [results.get(timeout=args.duration + 180) for _ in children]
        for c in children:
            c.join(30)
        server_cpu = server.cpu_seconds() - cpu0
        server.label_threads()
        threads = {k: v - threads0.get(k, 0.0) for k, v in server.thread_cpu().items()}
        if profiler is not None and spies:
            profiler.finish(spies)
        latencies = sorted(x for o in outs for x in o["latencies"])
        errors = [e for o in outs for e in o["errors"]]
        elapsed = max(o["elapsed"] for o in outs)
        rate = len(latencies) / elapsed if elapsed else 0.0
        say(f"ACME issuance, concurrency {args.concurrency} ({procs} client processes x "
            f"{per}), {args.workers} server workers, {args.duration:.0f} s:")
        say(f"  certificates/s: {rate:.1f}   p50: {percentile(latencies, 50) * 1000:.0f} ms   "
            f"p99: {percentile(latencies, 99) * 1000:.0f} ms   max: "
            f"{(latencies[-1] if latencies else math.nan) * 1000:.0f} ms   errors: {len(errors)}")
        if latencies:
            n = len(latencies)
            say(f"  server CPU per certificate: {server_cpu / n * 1000:.2f} ms ("
                + ", ".join(f"{role} {cpu / n * 1000:.2f}" for role, cpu in
                            sorted(threads.items(), key=lambda kv: -kv[1]) if cpu > 0)
                + f"); server cores used: {server_cpu / elapsed:.2f}")
            say(f"  HTTP requests per certificate (client side): "
                f"{sum(o['requests'] for o in outs) / n:.2f}; load generator CPU per "
                f"certificate: {sum(o['cpu'] for o in outs) / n * 1000:.2f} ms")
        for e in errors[:5]:
            say(f"  error: {e}")
        issued = count_acme_certs(ca.db_path)
        expected = len(latencies) + procs  # + one warm-up certificate per client process
        say(f"  valid orders in the database: {issued} (expected {expected})")
        if errors or issued != expected:
            code = 1
        say(f"  target >= 300 certificates/s: {'met' if rate >= 300 else 'NOT met'}")
        if profiler is not None:
            say("py-spy on the server workers during the timed phase:")
            say(profiler.summary())
        if args.lego:
            times = time_lego(url, ca.root_path, http_port, args.lego, work)
            if times:
                say(f"lego {len(times)} issuances one after another: "
                    f"{', '.join(f'{t * 1000:.0f}' for t in times)} ms; median "
                    f"{sorted(times)[len(times) // 2] * 1000:.0f} ms (target <= 170 ms)")
    finally:
        stop = server.stop()
        say(f"server exit code on SIGTERM: {stop}")
        if stop != 0:
            code = 1
        if args.keep:
            say(f"kept {work} (holds PIN files; delete it when done)")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
