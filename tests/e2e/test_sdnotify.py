"""Type=notify: the real server tells a notify socket READY, RELOADING and STOPPING."""

from __future__ import annotations

import signal
import socket
import subprocess
from pathlib import Path

import pytest
from e2e_support import APPLIANCTL, CaServer, clean_env, receive_until

pytestmark = pytest.mark.e2e


def test_server_notifies_systemd(ca: CaServer, tmp_path: Path) -> None:
    ca.stop()
    notify_path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(notify_path))
        env = dict(clean_env(ca.ca_home), NOTIFY_SOCKET=str(notify_path))
        process = subprocess.Popen(
            [APPLIANCTL, "serve", str(ca.config_path), "--issuer-password-file",
             str(ca.issuer_pin_file), "--workers", "1"],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            ready = receive_until(sock, "READY=1", 60)
            assert any(line.startswith("STATUS=serving") for m in ready for line in m.split("\n"))
            assert any(f"MAINPID={process.pid}" in m for m in ready)
            process.send_signal(signal.SIGHUP)
            reload_msgs = receive_until(sock, "READY=1", 20)
            assert any("RELOADING=1" in m for m in reload_msgs), reload_msgs
            process.send_signal(signal.SIGTERM)
            receive_until(sock, "STOPPING=1", 20)
            assert process.wait(timeout=45) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    ca.start()
