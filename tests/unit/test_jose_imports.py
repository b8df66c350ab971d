"""appliance.jose is a leaf, and the only JOSE code: no other module imports a JOSE library."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
JOSE_LIBRARIES = ("jwt", "jwcrypto", "josepy", "authlib", "jose")


def imports_of(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def test_jose_imports_only_the_errors_and_strict_json_of_the_appliance() -> None:
    allowed = ("appliance.errors", "appliance.strict_json", "appliance.jose")
    wrong = [f"{path.name}:{line}: {name}" for path in (ROOT / "appliance/jose").glob("*.py")
             for line, name in imports_of(path)
             if name.startswith("appliance") and not name.startswith(allowed)]
    assert not wrong, "appliance.jose imports more of the appliance than its errors:\n" + \
        "\n".join(wrong)


def test_no_module_outside_jose_uses_a_jose_library() -> None:
    outside = [path for package in ("appliance", "hsm") for path in (ROOT / package).rglob("*.py")
               if "jose" not in path.relative_to(ROOT).parts]
    wrong = [f"{path.relative_to(ROOT)}:{line}: {name}" for path in outside
             for line, name in imports_of(path) if name.split(".")[0] in JOSE_LIBRARIES]
    assert not wrong, "JOSE outside appliance.jose:\n" + "\n".join(wrong)
