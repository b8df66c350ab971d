"""The one atomic-write helper: mode, content, no temporary left, the old file kept on failure."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from appliance.fileio import replace_durably, write_atomic, write_temporary


def test_write_atomic_replaces_the_file_with_the_mode_asked_for(tmp_path: Path) -> None:
    path = tmp_path / "ca.json"
    path.write_text("old")
    os.chmod(path, 0o644)
    write_atomic(path, b"new\n", 0o600)
    assert path.read_bytes() == b"new\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ca.json"], "a temporary file was left"


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "server.key"
    path.write_bytes(b"old")
    with pytest.raises(TypeError):
        write_atomic(path, "not bytes", 0o600)  # type: ignore[arg-type]
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["server.key"]


def test_staged_files_appear_only_when_replaced(tmp_path: Path) -> None:
    path = tmp_path / "leaf.crt"
    temporary = write_temporary(path, b"pem", 0o644)
    assert not path.exists() and temporary.parent == tmp_path
    assert stat.S_IMODE(temporary.stat().st_mode) == 0o644
    replace_durably(temporary, path)
    assert path.read_bytes() == b"pem" and not temporary.exists()
