"""SoftHSM2 configuration rendering and the checks init_token makes before starting its child."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from hsm import softhsm
from hsm.errors import HsmError, PinInvalid


def test_write_softhsm_conf_creates_private_token_dir_and_conf(tmp_path: Path) -> None:
    home = tmp_path / "hsm"
    conf = softhsm.write_softhsm_conf(home)
    assert conf == (home / "softhsm2.conf").resolve()
    tokens = home / "tokens"
    assert stat.S_IMODE(tokens.stat().st_mode) == 0o700
    assert stat.S_IMODE(conf.stat().st_mode) == 0o600
    lines = conf.read_text().splitlines()
    assert f"directories.tokendir = {tokens.resolve()}" in lines
    assert "objectstore.backend = file" in lines
    assert "log.level = ERROR" in lines
    # Writing again keeps what is there and leaves no temporary files behind.
    (tokens / "marker").write_text("x")
    assert softhsm.write_softhsm_conf(home) == conf
    assert (tokens / "marker").exists()
    assert sorted(p.name for p in home.iterdir()) == ["softhsm2.conf", "tokens"]


def test_embedded_template_matches_the_one_in_softhsm_config() -> None:
    assert softhsm.CONF_TEMPLATE_PATH.is_file(), "softhsm-config/softhsm2.conf.in is missing"
    assert softhsm.CONF_TEMPLATE_PATH.read_text() == softhsm._DEFAULT_CONF_TEMPLATE


@pytest.mark.parametrize(
    ("so_pin", "user_pin", "reason"),
    [
        ("123", "12345678", "security officer PIN must be 4 to 255 bytes"),
        ("12345678", "", "user PIN must be 4 to 255 bytes"),
        ("12345678", "x" * 256, "user PIN must be 4 to 255 bytes"),
        ("1234\n5678", "12345678", "line breaks"),
    ],
)
def test_init_token_checks_pins_before_starting_the_child(
    so_pin: str, user_pin: str, reason: str, tmp_path: Path
) -> None:
    with pytest.raises(PinInvalid, match=reason) as caught:
        softhsm.init_token("/nonexistent.so", "T", so_pin, user_pin, conf=tmp_path / "c")
    for pin in (so_pin, user_pin):
        assert not pin or pin not in str(caught.value)


@pytest.mark.parametrize("label", ["", " padded", "x" * 33, "é" * 17])
def test_init_token_checks_the_label(label: str, tmp_path: Path) -> None:
    with pytest.raises(HsmError, match="label"):
        softhsm.init_token("/nonexistent.so", label, "12345678", "12345678", conf=None)
