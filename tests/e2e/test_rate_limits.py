"""Per-client rate limits: a burst over the limit gets 429 + Retry-After; traffic then resumes."""

from __future__ import annotations

import asyncio
import ssl

import aiohttp
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from e2e_support import CaServer, Tokens, reconfigured

from appliance.client import make_csr

pytestmark = pytest.mark.e2e


def csr_pem(subject: str) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    return make_csr(key, subject, [subject]).public_bytes(serialization.Encoding.PEM).decode()


async def test_issuance_burst_is_limited_then_resumes(ca: CaServer, tokens: Tokens) -> None:
    with reconfigured(ca, rateLimits={"issuance": {"perSecond": 1, "burst": 3}}):
        csr = csr_pem("limited.test")
        ssl_ctx = ssl.create_default_context(cafile=str(ca.root_path))
        # One keep-alive connection: every request reaches the same worker (limits are per worker).
        connector = aiohttp.TCPConnector(limit=1, ssl=ssl_ctx)
        async with aiohttp.ClientSession(connector=connector) as session:
            statuses, retry_after = [], []
            for _ in range(6):
                async with session.post(f"{ca.url}/1.0/sign", json={
                        "csr": csr, "ott": tokens.mint("limited.test")}) as resp:
                    statuses.append(resp.status)
                    if resp.status == 429:
                        body = await resp.json()
                        assert "too many issuance requests" in body["message"], body
                        retry_after.append(int(resp.headers["Retry-After"]))
            assert statuses[:3] == [201, 201, 201], statuses
            assert 429 in statuses[3:], f"no 429 after the burst: {statuses}"
            assert retry_after and all(1 <= r <= 2 for r in retry_after), retry_after
            async with session.get(f"{ca.url}/health") as resp:
                assert resp.status == 200  # only issuance is limited
            await asyncio.sleep(max(retry_after) + 0.2)
            async with session.post(f"{ca.url}/1.0/sign", json={
                    "csr": csr, "ott": tokens.mint("limited.test")}) as resp:
                assert resp.status == 201, await resp.text()


async def test_repeated_failed_authentication_is_limited(ca: CaServer, tokens: Tokens) -> None:
    with reconfigured(ca, rateLimits={"failedAuth": {"perSecond": 1, "burst": 2}}):
        ssl_ctx = ssl.create_default_context(cafile=str(ca.root_path))
        connector = aiohttp.TCPConnector(limit=1, ssl=ssl_ctx)
        async with aiohttp.ClientSession(connector=connector) as session:
            statuses = []
            for _ in range(5):
                async with session.post(f"{ca.url}/1.0/sign", json={
                        "csr": csr_pem("x.test"), "ott": "not-a-token"}) as resp:
                    statuses.append(resp.status)
            assert statuses[:2] == [401, 401], statuses
            assert statuses[-1] == 429, statuses
            await asyncio.sleep(2.2)
            async with session.post(f"{ca.url}/1.0/sign", json={
                    "csr": csr_pem("ok.test"), "ott": tokens.mint("ok.test")}) as resp:
                assert resp.status == 201, await resp.text()


def test_pin_file_readable_by_others_is_refused(ca: CaServer) -> None:
    loose = ca.base / "loose-pin"
    loose.write_text(ca.issuer_pin + "\n")
    loose.chmod(0o644)
    code, err = ca.serve_once(loose)
    assert code == 1, err
    assert "readable or writable by others (mode 0644)" in err and "chmod 600" in err, err
    assert ca.issuer_pin not in err


def test_group_writable_ca_home_is_refused(ca: CaServer) -> None:
    config_dir = ca.config_path.parent
    mode = config_dir.stat().st_mode & 0o777
    config_dir.chmod(mode | 0o020)
    try:
        code, err = ca.serve_once(ca.issuer_pin_file)
    finally:
        config_dir.chmod(mode)
    assert code == 1, err
    assert f"{config_dir} is writable by group or others" in err, err
