"""The local admin socket: a Unix socket (0600, the service user's) for unseal and seal.

One JSON object per line in each direction. The peer's uid and pid (SO_PEERCRED) name the
actor in the logs; a share's content is never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger("appliance.admin")

MAX_LINE = 65536
Handler = Callable[[dict[str, Any], str], Awaitable[dict[str, Any]]]


def peer_actor(sock: socket.socket | None) -> str:
    if sock is None:
        return "admin-socket:unknown"
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, _gid = struct.unpack("3i", creds)
        return f"admin-socket:uid={uid},pid={pid}"
    except OSError:
        return "admin-socket:unknown"


class AdminServer:
    def __init__(self, path: Path, handler: Handler) -> None:
        self.path = path
        self._handler = handler
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # a stale socket of a previous run
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._client, path=str(self.path),
                                                           limit=MAX_LINE)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        actor = peer_actor(writer.get_extra_info("socket"))
        try:
            while line := await reader.readline():
                try:
                    request = json.loads(line)
                    if not isinstance(request, dict):
                        raise ValueError
                    response = await self._handler(request, actor)
                except ValueError:
                    response = {"ok": False, "error": "requests are one JSON object per line"}
                writer.write(json.dumps(response).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def admin_request(path: Path, request: dict[str, Any], timeout: float = 90.0) -> dict[str, Any]:
    """Client side (applianctl unlock / seal): one request, one answer."""
    from appliance.errors import ApplianceError

    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(json.dumps(request).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
    except FileNotFoundError:
        raise ApplianceError(f"no admin socket at {path}: is the CA running (in quorum mode)?"
                             ) from None
    except PermissionError:
        raise ApplianceError(f"not allowed to use {path}: run as the CA's service user"
                             ) from None
    except OSError as e:
        raise ApplianceError(f"cannot talk to the CA over {path}: {e.strerror or e}") from None
    try:
        answer: dict[str, Any] = json.loads(data)
    except ValueError:
        raise ApplianceError("the CA's admin socket gave no answer") from None
    return answer
