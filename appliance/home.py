"""Where the CA home is, and the client's config/defaults.json in it (CA URL, root, fingerprint).

Apart from config.py, whose pydantic schema of ca.json takes a fifth of a second to build: the
client commands read only defaults.json and must start without it. This module imports nothing
from the appliance but fileio.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from appliance.fileio import write_atomic

DEFAULT_HOME_ENV = "APPLIANCE_HOME"


def default_home() -> Path:
    """The CA home: $APPLIANCE_HOME, else ~/.appliance."""
    env = os.environ.get(DEFAULT_HOME_ENV)
    return Path(env) if env else Path.home() / ".appliance"


@dataclass(frozen=True)
class Defaults:
    """What `applianctl bootstrap` (or init) pinned: the CA's URL and the root to trust."""

    ca_url: str
    fingerprint: str
    root: Path

    @classmethod
    def load(cls, home: Path | None = None) -> Defaults | None:
        path = (home or default_home()) / "config" / "defaults.json"
        try:
            data = json.loads(path.read_text())
            return cls(data["ca-url"], data["fingerprint"], Path(data["root"]))
        except (FileNotFoundError, KeyError, ValueError):
            return None

    def write(self, home: Path) -> None:
        path = home / "config" / "defaults.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {"ca-url": self.ca_url, "fingerprint": self.fingerprint, "root": str(self.root)}
        write_atomic(path, (json.dumps(data, indent=2) + "\n").encode(), 0o644, keep_owner=True)
