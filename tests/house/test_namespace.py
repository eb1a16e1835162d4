"""One namespace: every package installs as ``lifelong.<folder>`` (pyproject's package-dir), the
list of packages misses none, and the installed project imports from any working directory."""

import os
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SETUPTOOLS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def folder_of(package: str) -> Path:
    mapped = SETUPTOOLS["package-dir"]
    parts = package.split(".")
    for n in range(len(parts), 0, -1):
        if (head := ".".join(parts[:n])) in mapped:
            return ROOT / mapped[head] / Path(*parts[n:])
    raise AssertionError(f"{package} is not under a mapped folder")


def test_every_package_folder_is_installed():
    listed = set(SETUPTOOLS["packages"])
    on_disk = set()
    for package, top in SETUPTOOLS["package-dir"].items():
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / top).parts
            on_disk.add(".".join((package, *rel)))
    assert on_disk == listed, f"folders not listed: {sorted(on_disk - listed)}; listed, no folder: {sorted(listed - on_disk)}"
    for package in listed:
        assert (folder_of(package) / "__init__.py").exists(), package


def test_no_generic_top_level_package_is_installed():
    assert all(p == "lifelong" or p.startswith("lifelong.") for p in SETUPTOOLS["packages"])


def test_the_installed_project_imports_from_anywhere(tmp_path):
    code = ("import lifelong.tasks.data, lifelong.privacy.clipping, lifelong.strategies.regularizers.l2;"
            "import importlib.util as u; s = u.find_spec('tasks'); print(s and s.origin)")
    # A user's environment: no PYTHONPATH (a library under test may have set one in this process).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "None", f"a generic top-level 'tasks' is importable: {out.stdout.strip()}"


def test_the_flower_app_components_name_the_namespaced_apps():
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

    components = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["components"]
    loaded = {}
    for key, ref in components.items():
        module, attr = ref.split(":")
        assert module.startswith("lifelong."), ref
        loaded[key] = getattr(__import__(module, fromlist=[attr]), attr)
    assert isinstance(loaded["serverapp"], ServerApp) and isinstance(loaded["clientapp"], ClientApp)


def test_a_source_tree_imports_as_the_package_it_holds(tmp_path):
    """Where a source tree comes first on sys.path — a Flower app folder a SuperNode unpacked, a
    Docker image's working directory, any checkout — ``lifelong`` and every ``lifelong.<folder>``
    come from that tree, with or without the editable install's finder (a wheel install has none)."""
    import shutil

    app = tmp_path / "app"
    for folder in set(SETUPTOOLS["package-dir"].values()):
        shutil.copytree(ROOT / folder, app / folder, ignore=shutil.ignore_patterns("__pycache__"))
    code = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f)];"
            "import lifelong.tasks.data, lifelong.privacy.clipping, lifelong.bridges.flower.protocol as p;"
            "print(lifelong.__file__, lifelong.tasks.data.__file__, p.__file__)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=app, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    files = out.stdout.split()
    assert len(files) == 3 and all(f.startswith(str(app)) for f in files), files
