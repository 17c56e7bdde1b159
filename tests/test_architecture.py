"""The house, checked by tools: no import cycle, import-linter's layer contracts (pyproject.toml), no module over
600 lines, and every package installed.

import-linter and grimp read the package as users install it: under an editable install with package-dir
mappings they see no modules, so the test lays out a regular copy (pyproject's package-dir mapping, the way
setuptools installs it) in a temporary folder and reads that.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 600


def _setuptools() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def _package_dir(package: str, mapping: dict[str, str]) -> Path:
    """Where a package's modules are in the repository (setuptools' package-dir rule: the longest mapped prefix)."""
    parts = package.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in mapping:
            return ROOT / mapping[prefix] / Path(*parts[n:])
    return ROOT / Path(*parts)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package laid out as a regular install: each listed package's modules under its dotted path."""
    cfg = _setuptools()
    target = tmp_path_factory.mktemp("site")
    for package in cfg["packages"]:
        dest = target / Path(*package.split("."))
        dest.mkdir(parents=True, exist_ok=True)
        for module in _package_dir(package, cfg["package-dir"]).glob("*.py"):
            shutil.copy(module, dest / module.name)
    return target


def test_every_package_in_the_repository_is_installed():
    cfg = _setuptools()
    listed = {_package_dir(p, cfg["package-dir"]).resolve() for p in cfg["packages"]}
    found = {init.parent.resolve() for top in ("client", "worker", "tasks")
             for init in (ROOT / top).rglob("__init__.py")}
    assert sorted(map(str, found - listed)) == [], "add these to [tool.setuptools] packages in pyproject.toml"


def test_no_import_cycle(installed):
    """Function-level (lazy) imports count: a module that needs a name from its importer has it in the wrong place."""
    assert _cycles(installed) == []


def _cycles(installed: Path) -> list[list[str]]:
    code = r"""
import grimp, json, sys
sys.setrecursionlimit(10000)
g = grimp.build_graph("portq")
adj = {m: g.find_modules_directly_imported_by(m) for m in g.modules}
index, low, stack, on, found = {}, {}, [], set(), []
def visit(v):
    index[v] = low[v] = len(index); stack.append(v); on.add(v)
    for w in adj[v]:
        if w not in index:
            visit(w); low[v] = min(low[v], low[w])
        elif w in on:
            low[v] = min(low[v], index[w])
    if low[v] == index[v]:
        component = []
        while True:
            w = stack.pop(); on.discard(w); component.append(w)
            if w == v:
                break
        if len(component) > 1:
            found.append(sorted(component))
for m in sorted(adj):
    if m not in index:
        visit(m)
print(json.dumps(found))
"""
    import json

    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(installed)},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_import_linter_contracts_hold(installed):
    lint = shutil.which("lint-imports", path=os.path.dirname(sys.executable)) or shutil.which("lint-imports")
    assert lint, "import-linter is a test dependency (pip install -e '.[test]')"
    done = subprocess.run([lint, "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
                          env={**os.environ, "PYTHONPATH": str(installed)}, capture_output=True, text=True,
                          timeout=600, cwd=installed)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def test_no_module_over_600_lines():
    long = {str(p.relative_to(ROOT)): n for top in ("client", "worker", "tasks") for p in (ROOT / top).rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}
