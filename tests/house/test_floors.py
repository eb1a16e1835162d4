"""The floors of the house (DESIGN.md), read from the real import graph: every import of every
module of the project, including imports inside functions, runs down a floor, never up or across.

import-linter cannot see this house: its graph builder (grimp) walks the folder of a root package,
and ``lifelong.flows`` and the other mapped packages live in folders beside ``lifelong/`` (one
namespace, folders at the top). So this test reads the same graph from the files themselves.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: Floors from the ground up; a package imports only packages on lower floors, and its own modules.
#: Packages on one floor are independent of each other (the two bridges; strategies and privacy).
FLOORS: list[tuple[str, ...]] = [
    ("strategies", "privacy"),              # plain-PyTorch algorithms: import nothing of the project
    ("lifelong",),                          # the ground: config, catalogue, tracking, registry, ...
    ("tasks",),                             # data, streams, partitions, models, metrics, evaluation
    ("bridges.avalanche", "bridges.flower"),  # framework glue
    ("clients",),                           # the Flower ClientApp and one client's round
    ("flows",),                             # Prefect flows, the Flower ServerApp
    ("cli",),                               # the command, the stack, the deployment launcher
]
FLOOR = {package: level for level, packages in enumerate(FLOORS) for package in packages}
#: Above every floor and imported by nothing: side-by-side benchmarks.
BESIDE = ("bench",)
#: The folders that install as ``lifelong.<name>`` (pyproject's package-dir).
MAPPED = ("flows", "clients", "tasks", "strategies", "privacy", "bridges", "cli")

def package_of_file(path: Path) -> str:
    parts = path.relative_to(ROOT).parts
    if parts[0] == "bridges":
        return f"bridges.{parts[1]}"
    return parts[0]


def package_of_module(name: str) -> str | None:
    """The house's package of an imported module name, or None for a library."""
    parts = name.split(".")
    if parts[0] != "lifelong":
        return None
    if len(parts) > 1 and parts[1] in MAPPED:
        if parts[1] == "bridges":
            return f"bridges.{parts[2]}" if len(parts) > 2 else "bridges"
        return parts[1]
    return "lifelong"


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def project_files() -> list[Path]:
    folders = ("lifelong", *MAPPED, *BESIDE)
    return sorted(p for folder in folders if (ROOT / folder).is_dir() for p in (ROOT / folder).rglob("*.py"))


def wrong_way(importer: str, imported: str | None) -> str | None:
    """Why importing ``imported`` from ``importer`` breaks the floors, or None."""
    if imported is None or imported == importer:
        return None
    if importer in BESIDE:
        return None
    if imported == "bridges":
        return "the bridges package as a whole (import bridges.avalanche or bridges.flower)"
    if imported in BESIDE or importer not in FLOOR or imported not in FLOOR:
        return f"{imported} is not below {importer}"
    if FLOOR[importer] == 0:
        return "strategies/ and privacy/ import nothing of the project"
    if FLOOR[imported] > FLOOR[importer]:
        return f"up, from floor {FLOOR[importer] + 1} to floor {FLOOR[imported] + 1}"
    if FLOOR[imported] == FLOOR[importer]:
        return f"across floor {FLOOR[importer] + 1}: {importer} and {imported} are independent"
    return None


def violations() -> dict[tuple[str, str], list[str]]:
    found: dict[tuple[str, str], list[str]] = {}
    for path in project_files():
        importer = package_of_file(path)
        for name in sorted(imported_modules(path)):
            top = name.split(".")[0]
            if top in MAPPED and top != "lifelong":
                found.setdefault((str(path.relative_to(ROOT)), top), []).append(
                    f"imports {name}: the old top-level name (use lifelong.{name})")
                continue
            imported = package_of_module(name)
            why = wrong_way(importer, imported)
            if why:
                found.setdefault((str(path.relative_to(ROOT)), imported), []).append(f"imports {name}: {why}")
    return found


def test_every_import_runs_down_a_floor():
    found = violations()
    assert not found, "\n".join(f"{file} {w}" for (file, _), whys in sorted(found.items()) for w in whys)


#: The frameworks that only floors above the algorithms may use (glue lives in bridges/).
FRAMEWORKS = ("avalanche", "flwr", "flwr_datasets", "prefect", "mlflow", "opacus", "ray", "typer")


def framework_imports() -> set[tuple[str, str]]:
    return {(str(p.relative_to(ROOT)), name.split(".")[0]) for p in project_files()
            if package_of_file(p) in FLOORS[0]
            for name in imported_modules(p) if name.split(".")[0] in FRAMEWORKS}


def test_the_algorithms_use_no_framework():
    found = framework_imports()
    assert not found, "\n".join(f"{file} imports {fw}: plain PyTorch here; glue goes in bridges/"
                                 for file, fw in sorted(found))


def test_nothing_imports_the_command_or_the_benchmarks():
    wrong = [f"{p.relative_to(ROOT)} imports {name}" for p in project_files()
             if package_of_file(p) not in ("cli", *BESIDE)
             for name in imported_modules(p) if package_of_module(name) == "cli"]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("source, importer, why", [
    ("def f():\n    from lifelong.flows.federated import serve\n", "tasks", "up"),
    ("import lifelong.bridges.flower.records\n", "bridges.avalanche", "across"),
    ("from lifelong.config import Config\n", "strategies", "import nothing of the project"),
    ("from tasks.models import build_model\n", "flows", "old top-level name"),
])
def test_the_check_catches_each_kind_of_wrong_import(tmp_path, source, importer, why):
    module = tmp_path / "m.py"
    module.write_text(source)
    reasons = []
    for name in imported_modules(module):
        if name.split(".")[0] in MAPPED:
            reasons.append("old top-level name")
        elif (w := wrong_way(importer, package_of_module(name))):
            reasons.append(w)
    assert any(why in r for r in reasons), reasons


def test_a_downward_import_passes():
    assert wrong_way("flows", "tasks") is None
    assert wrong_way("bridges.flower", "lifelong") is None
    assert wrong_way("lifelong", "strategies") is None
