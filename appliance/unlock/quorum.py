"""M-of-N quorum unlock with SLIP-39 shares (shamir-mnemonic).

At init the issuer token's PIN is random and never shown. It is kept only encrypted
(AES-256-GCM) under a key derived (HKDF-SHA256) from a random 256-bit master secret, and that
secret is split M-of-N into SLIP-39 mnemonics, one per custodian. Each mnemonic carries an
RS1024 checksum (a mistyped share is named and refused on its own) and the set's identifier
(a share of another set is refused on its own). When M shares are in, the master secret is
recombined and the GCM tag proves it is the right one, before the token ever sees a PIN.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import shamir_mnemonic
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from shamir_mnemonic.share import Share

from appliance.config import write_json_atomic
from appliance.errors import ApplianceError, BadRequest, ConfigError

PROGRESS_TTL = 600.0  # partial progress is forgotten after 10 minutes
_INFO = b"appliance issuer token PIN v1"


class ShareRefused(BadRequest):
    """A share was refused on its own (mistyped, another set, duplicate)."""


def _key(master_secret: bytes, salt: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt, _INFO).derive(master_secret)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@dataclass(frozen=True)
class SealedPin:
    """What is on disk: the encrypted PIN and the public parameters of the share set."""

    identifier: int
    threshold: int
    count: int
    salt: bytes
    nonce: bytes
    ciphertext: bytes

    def to_json(self) -> dict[str, Any]:
        return {"version": 1, "shareSetId": self.identifier, "threshold": self.threshold,
                "shares": self.count, "salt": _b64(self.salt), "nonce": _b64(self.nonce),
                "ciphertext": _b64(self.ciphertext)}

    @classmethod
    def load(cls, path: Path) -> SealedPin:
        try:
            data = json.loads(path.read_text())
            return cls(int(data["shareSetId"]), int(data["threshold"]), int(data["shares"]),
                       base64.b64decode(data["salt"]), base64.b64decode(data["nonce"]),
                       base64.b64decode(data["ciphertext"]))
        except FileNotFoundError:
            raise ConfigError(f"{path} does not exist: this CA was not set up for quorum "
                              "unlock") from None
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f"{path} is not a sealed-PIN file") from None

    def save(self, path: Path) -> None:
        write_json_atomic(path, self.to_json(), mode=0o600)

    def open(self, master_secret: bytes) -> str:
        try:
            pin = AESGCM(_key(master_secret, self.salt)).decrypt(self.nonce, self.ciphertext,
                                                                  _aad(self))
        except InvalidTag:
            raise ShareRefused("the shares do not combine to this CA's unseal key") from None
        return pin.decode()


def _aad(sealed: SealedPin) -> bytes:
    return f"{sealed.identifier}/{sealed.threshold}/{sealed.count}".encode()


def parse_quorum(text: str) -> tuple[int, int]:
    """'3/5' -> (3, 5); M of N with 1 <= M <= N <= 16 (SLIP-39's limit)."""
    try:
        m_text, n_text = text.split("/")
        m, n = int(m_text), int(n_text)
    except ValueError:
        raise BadRequest(f"--quorum {text!r} must be M/N, e.g. 3/5") from None
    if not 1 <= m <= n <= 16:
        raise BadRequest("--quorum needs 1 <= M <= N <= 16")
    if m == 1 and n > 1:
        raise BadRequest("a quorum of 1 gives every custodian the key alone; use M >= 2")
    return m, n


def seal_pin(pin: str, threshold: int, count: int) -> tuple[SealedPin, list[str]]:
    """Encrypt `pin` under a fresh master secret split M-of-N; return the file and the shares."""
    master_secret = secrets.token_bytes(32)
    (mnemonics,) = shamir_mnemonic.generate_mnemonics(1, [(threshold, count)], master_secret)
    identifier = Share.from_mnemonic(mnemonics[0]).identifier
    salt, nonce = secrets.token_bytes(16), secrets.token_bytes(12)
    draft = SealedPin(identifier, threshold, count, salt, nonce, b"")
    ciphertext = AESGCM(_key(master_secret, salt)).encrypt(nonce, pin.encode(), _aad(draft))
    return SealedPin(identifier, threshold, count, salt, nonce, ciphertext), mnemonics


def write_shares(share_dir: Path, mnemonics: list[str], threshold: int) -> list[Path]:
    """One file per custodian, 0600, in a directory only the owner can enter."""
    share_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(share_dir, 0o700)
    paths = []
    for i, mnemonic in enumerate(mnemonics, 1):
        path = share_dir / f"share-{i}-of-{len(mnemonics)}.txt"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"# Appliance CA unseal share {i} of {len(mnemonics)} "
                    f"(any {threshold} unlock the CA). Keep it secret.\n{mnemonic}\n")
        paths.append(path)
    return paths


def read_share_text(text: str) -> str:
    """The mnemonic of a share file or typed input (comment lines and spacing ignored)."""
    words = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    return " ".join(" ".join(words).lower().split())


class ShareCollector:
    """Shares handed in, one at a time, until M of them open the sealed PIN."""

    def __init__(self, sealed: SealedPin, clock: Any = time.monotonic) -> None:
        self.sealed = sealed
        self._clock = clock
        self._shares: dict[int, str] = {}
        self._started: float | None = None

    @property
    def progress(self) -> tuple[int, int]:
        self._expire()
        return len(self._shares), self.sealed.threshold

    def reset(self) -> None:
        self._shares.clear()
        self._started = None

    def _expire(self) -> None:
        if self._started is not None and self._clock() - self._started > PROGRESS_TTL:
            self.reset()

    def add(self, untrusted_mnemonic: str) -> str | None:
        """Take one share; return the PIN once M valid shares are in, else None.

        A share that is mistyped, of another set, or already given is refused and changes
        nothing; a complete set that does not open the PIN discards the progress.
        """
        self._expire()
        mnemonic = read_share_text(untrusted_mnemonic)
        try:
            share = Share.from_mnemonic(mnemonic)
        except shamir_mnemonic.MnemonicError as e:
            first = " ".join(mnemonic.split()[:2])
            reason = "its checksum is wrong (a word is mistyped?)" if "checksum" in str(e) \
                else "it is not a valid SLIP-39 share"
            raise ShareRefused(f"share starting {first!r} refused: {reason}") from None
        first = " ".join(mnemonic.split()[:2])
        if share.identifier != self.sealed.identifier or \
                share.member_threshold != self.sealed.threshold:
            raise ShareRefused(f"share starting {first!r} refused: it belongs to another share "
                               "set")
        if share.index in self._shares:
            raise ShareRefused(f"share starting {first!r} was already handed in")
        if self._started is None:
            self._started = self._clock()
        self._shares[share.index] = mnemonic
        if len(self._shares) < self.sealed.threshold:
            return None
        try:
            master = shamir_mnemonic.combine_mnemonics(list(self._shares.values()))
            return self.sealed.open(master)
        except (shamir_mnemonic.MnemonicError, ShareRefused) as e:
            self.reset()
            raise ShareRefused(f"the {self.sealed.threshold} shares do not open this CA's "
                               f"sealed PIN ({e}); start again") from None


def recover_pin(sealed: SealedPin, mnemonics: list[str]) -> str:
    """Offline use (rekey-shares): all shares at once; raises on the first bad one."""
    collector = ShareCollector(sealed)
    pin = None
    for m in mnemonics:
        pin = collector.add(m)
    if pin is None:
        have, need = collector.progress
        raise ApplianceError(f"{have} shares given; {need} are needed")
    return pin
