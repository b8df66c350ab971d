from pathlib import Path

import pytest

from appliance.errors import BadRequest
from appliance.unlock.quorum import (
    SealedPin,
    ShareCollector,
    ShareRefused,
    parse_quorum,
    read_share_text,
    recover_pin,
    seal_pin,
    write_shares,
)


@pytest.fixture(scope="module")
def sealed_set() -> tuple[SealedPin, list[str]]:
    return seal_pin("issuer-pin-0123456789", 3, 5)


def mistype(mnemonic: str) -> str:
    words = mnemonic.split()
    words[6] = "academic" if words[6] != "academic" else "acid"
    return " ".join(words)


def test_any_three_of_five_open_the_pin(sealed_set: tuple[SealedPin, list[str]]) -> None:
    sealed, shares = sealed_set
    for chosen in ([0, 1, 2], [4, 2, 0], [1, 3, 4]):
        collector = ShareCollector(sealed)
        assert collector.add(shares[chosen[0]]) is None
        assert collector.progress == (1, 3)
        assert collector.add(shares[chosen[1]]) is None
        assert collector.add(shares[chosen[2]]) == "issuer-pin-0123456789"


def test_refusals_name_the_share_and_change_nothing(sealed_set: tuple[SealedPin, list[str]]
                                                     ) -> None:
    sealed, shares = sealed_set
    collector = ShareCollector(sealed)
    collector.add(shares[0])
    first_two = " ".join(shares[1].split()[:2])
    with pytest.raises(ShareRefused, match=f"share starting '{first_two}' refused: its checksum"):
        collector.add(mistype(shares[1]))
    _, other = seal_pin("another", 3, 5)
    with pytest.raises(ShareRefused, match="belongs to another share set"):
        collector.add(other[1])
    with pytest.raises(ShareRefused, match="already handed in"):
        collector.add(shares[0])
    with pytest.raises(ShareRefused, match="not a valid SLIP-39 share"):
        collector.add("hello world")
    assert collector.progress == (1, 3)
    collector.add(shares[1])
    assert collector.add(shares[2]) == "issuer-pin-0123456789"


def test_progress_expires_after_ten_minutes(sealed_set: tuple[SealedPin, list[str]]) -> None:
    sealed, shares = sealed_set
    now = [1000.0]
    collector = ShareCollector(sealed, clock=lambda: now[0])
    collector.add(shares[0])
    collector.add(shares[1])
    now[0] += 601
    assert collector.progress == (0, 3)
    collector.add(shares[2])
    assert collector.progress == (1, 3)


def test_wrong_combination_detected_before_login(tmp_path: Path,
                                                 sealed_set: tuple[SealedPin, list[str]]) -> None:
    sealed, shares = sealed_set
    # Same share set, but the ciphertext is not the one these shares sealed: GCM refuses.
    forged = SealedPin(sealed.identifier, 3, 5, sealed.salt, sealed.nonce,
                       bytes(b ^ 1 for b in sealed.ciphertext))
    collector = ShareCollector(forged)
    collector.add(shares[0])
    collector.add(shares[1])
    with pytest.raises(ShareRefused, match="do not open this CA's sealed PIN"):
        collector.add(shares[2])
    assert collector.progress == (0, 3)


def test_files_round_trip(tmp_path: Path, sealed_set: tuple[SealedPin, list[str]]) -> None:
    sealed, shares = sealed_set
    sealed.save(tmp_path / "sealed-pin.json")
    assert (tmp_path / "sealed-pin.json").stat().st_mode & 0o777 == 0o600
    loaded = SealedPin.load(tmp_path / "sealed-pin.json")
    paths = write_shares(tmp_path / "shares", shares, 3)
    assert [p.stat().st_mode & 0o777 for p in paths] == [0o600] * 5
    texts = [read_share_text(p.read_text()) for p in paths[:3]]
    assert recover_pin(loaded, texts) == "issuer-pin-0123456789"
    assert "issuer-pin" not in (tmp_path / "sealed-pin.json").read_text()


def test_parse_quorum() -> None:
    assert parse_quorum("3/5") == (3, 5)
    for bad in ("3", "5/3", "0/2", "1/3", "2/17", "a/b"):
        with pytest.raises(BadRequest):
            parse_quorum(bad)
