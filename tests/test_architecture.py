"""The layout is a contract: import-linter's rules in pyproject.toml hold, no
module takes part in an import cycle, and both checks fail on a tree that
breaks them (docs/architecture.md)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("recsys_cli", "services", "training", "recsys_core")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """import-linter over the packages under `root`, with root's pyproject.toml."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
                               "sys.exit(lint_imports_command())", "--no-cache"],
        cwd=root, env=env, capture_output=True, text=True, timeout=300,
    )


def import_cycles(root: Path, packages: tuple[str, ...]) -> list[list[str]]:
    """Every group of modules that import each other, directly or through
    others (strongly connected components of the import graph, Tarjan)."""
    sys.path.insert(0, str(root))
    try:
        graph = grimp.build_graph(*packages, cache_dir=None)
    finally:
        sys.path.remove(str(root))
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in graph.find_modules_directly_imported_by(module):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return cycles


def copy_of_the_code(tmp_path: Path) -> Path:
    for package in PACKAGES:
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_the_import_contracts_hold():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 kept, 0 broken" in result.stdout


@pytest.mark.parametrize(("module", "bad_import", "contract"), [
    # Training reaching into a service: what the layout was made to stop.
    ("training/crosscat.py", "from services.ranking import config", "The CLI over the services and training"),
    # One service importing another instead of calling it.
    ("services/gateway/composer.py", "from services.profile import profiles", "Services talk to each other only"),
    # A lower layer of the library importing a higher one, inside a function too.
    ("recsys_core/data/paths.py", "def late():\n    from recsys_core.signals import interests",
     "The library's layers"),
    ("recsys_core/signals/copurchase.py", "import grpc", "Below rpc the library and training are gRPC-free"),
])
def test_each_contract_catches_the_import_it_forbids(tmp_path, module, bad_import, contract):
    root = copy_of_the_code(tmp_path)
    with open(root / module, "a") as source:
        source.write(f"\n{bad_import}\n")
    result = lint_imports(root)
    assert result.returncode != 0, result.stdout
    assert f"{contract}" in result.stdout and "BROKEN" in result.stdout, result.stdout


def test_no_module_takes_part_in_an_import_cycle():
    assert import_cycles(REPO, PACKAGES) == []


def test_the_cycle_check_finds_a_cycle(tmp_path):
    package = tmp_path / "cyclic"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from cyclic import b\n")
    (package / "b.py").write_text("def later():\n    from cyclic import c\n")
    (package / "c.py").write_text("import cyclic.a\n")
    (package / "d.py").write_text("from cyclic import a\n")
    assert import_cycles(tmp_path, ("cyclic",)) == [["cyclic.a", "cyclic.b", "cyclic.c"]]

