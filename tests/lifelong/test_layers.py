"""Imports run one way (README, Layout): `lifelong.cli` → `flows` → `clients` → `strategies`,
`tasks` → `lifelong.config`. A lower package importing a higher one, even inside a function,
is a cycle waiting to happen; this reads every module's imports and refuses one."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: What each package may not import (nor anything under it).
ABOVE = {
    "clients": ("flows", "lifelong.cli"),
    "strategies": ("flows", "clients", "lifelong.cli"),
    "tasks": ("flows", "clients", "lifelong.cli"),
}


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("package", sorted(ABOVE))
def test_a_package_imports_nothing_above_it(package):
    wrong = sorted(f"{path.relative_to(ROOT)} imports {name}"
                   for path in (ROOT / package).rglob("*.py")
                   for name in imported_modules(path)
                   if any(name == top or name.startswith(top + ".") for top in ABOVE[package]))
    assert not wrong, "\n".join(wrong)


def test_the_check_sees_an_import_inside_a_function(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from flows.federated import serve\n")
    assert "flows.federated" in imported_modules(module)
