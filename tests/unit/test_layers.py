"""The design's import direction, checked: cli, server -> api, acme -> authority -> issuance -> hsm.

storage and audit are reached through protocols and import none of the layers above them; hsm
imports nothing from appliance; the shared foundation (errors, config, jose, ...) imports no
layer at all. Imports inside functions count as much as those at the top of a module.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

FOUNDATION = "foundation"
# Which package each module belongs to; the first matching prefix wins.
LAYER_OF_PREFIX = [
    ("appliance.cli", "cli"),
    ("appliance.client", "cli"),
    ("appliance.server", "server"),
    ("appliance.ceremony", "ceremony"),
    ("appliance.api", "api"),
    ("appliance.acme", "acme"),
    ("appliance.authority", "authority"),
    ("appliance.unlock", "unlock"),
    ("appliance.issuance", "issuance"),
    ("appliance.storage", "storage"),
    ("appliance.audit", "audit"),
    ("hsm", "hsm"),
    ("appliance", FOUNDATION),
]
# What each layer may import (besides itself and third-party code).
MAY_IMPORT = {
    FOUNDATION: {FOUNDATION},
    "hsm": set(),
    "storage": {FOUNDATION},
    "audit": {FOUNDATION},
    "issuance": {FOUNDATION, "storage", "audit", "hsm"},
    "authority": {FOUNDATION, "issuance", "storage", "audit"},
    "unlock": {FOUNDATION, "hsm"},
    "acme": {FOUNDATION, "authority", "issuance", "storage"},
    "api": {FOUNDATION, "authority", "issuance", "storage", "audit"},
    "ceremony": {FOUNDATION, "authority", "issuance", "storage", "audit", "unlock", "hsm",
                 "server"},
    "server": {FOUNDATION, "api", "acme", "authority", "issuance", "storage", "audit",
               "unlock", "hsm"},
    "cli": {FOUNDATION, "server", "ceremony", "api", "acme", "authority", "issuance",
            "storage", "audit", "unlock", "hsm"},
}


def layer(module: str) -> str | None:
    for prefix, name in LAYER_OF_PREFIX:
        if module == prefix or module.startswith(prefix + "."):
            return name
    return None


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, module: str) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            found.append((node.lineno, target))
    return found


def sources() -> list[Path]:
    return sorted([*ROOT.glob("appliance/**/*.py"), *ROOT.glob("hsm/**/*.py")])


def violations_in(path: Path, module: str) -> list[str]:
    own = layer(module)
    assert own is not None, path
    out: list[str] = []
    for line, target in imports_of(path, module):
        theirs = layer(target)
        if theirs is not None and theirs != own and theirs not in MAY_IMPORT[own]:
            out.append(f"{path.name}:{line}: {own} imports {target} ({theirs})")
    return out


def test_every_import_follows_the_layer_order() -> None:
    violations = [v for path in sources() for v in violations_in(path, module_name(path))]
    assert not violations, "imports against the layer order:\n" + "\n".join(violations)


def test_the_checker_finds_an_upward_import_even_inside_a_function(tmp_path: Path) -> None:
    fake = tmp_path / "fake.py"
    fake.write_text("from . import names\n\ndef f():\n    from ..authority import plan\n")
    assert violations_in(fake, "appliance.issuance.fake") == [
        "fake.py:4: issuance imports appliance.authority (authority)"]


def test_only_the_authority_builds_an_issuance_request() -> None:
    """Boulder's rule: the issuer signs only what the one pipeline prepared."""
    builders: list[str] = []
    for path in sources():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id == "IssuanceRequest"):
                builders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert builders and all(b.startswith("appliance/authority/authority.py:")
                            for b in builders), builders
