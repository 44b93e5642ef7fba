"""Import contracts from docs/architecture.md, checked on the source with ``ast``."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("daemon", "elastic", "model", "ops")
FORBIDDEN = {
    "elastic": {"daemon", "model", "ops"},
    "daemon": {"model", "ops"},
    "model": {"daemon", "ops"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def test_packages_import_only_in_the_allowed_direction() -> None:
    bad = []
    for package, forbidden in FORBIDDEN.items():
        for path in _modules(package):
            for name in _imports(path):
                if name.split(".")[0] in forbidden:
                    bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert bad == []


def test_guard_is_pure() -> None:
    impure = {"torch", "fsspec", "etcd3", "os", "socket", "subprocess", "requests"}
    bad = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in _modules("elastic/guard")
        for name in _imports(path)
        if name.split(".")[0] in impure
    ]
    assert bad == []


def _importers_of(top: str) -> set[str]:
    return {
        str(path.relative_to(ROOT))
        for package in PACKAGES
        for path in _modules(package)
        if any(name.split(".")[0] == top for name in _imports(path))
    }


def test_etcd_client_is_imported_in_one_rendezvous_module() -> None:
    importers = _importers_of("etcd3")
    assert len(importers) <= 1
    assert all(p.startswith("elastic/rendezvous/") for p in importers)


def test_fsspec_is_imported_in_one_checkpoint_module() -> None:
    importers = _importers_of("fsspec")
    assert len(importers) <= 1
    assert all(p.startswith("elastic/checkpoint/") for p in importers)
