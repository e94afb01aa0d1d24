#!/usr/bin/env python3
"""Check that mpvfio's imports only go down the layers.

    L0 constants      mpvfio, errors, events, uapi.*
    L1 devices        devices.*, ipc.*, vmstate, qdev, vfiomig, and the pure
                      migration codecs/transports (migration, .stream,
                      .multifd, .transport): workers use the packet codec
    L2 workers        workers/ (installed as mpvfio.workers.*)
    L3 orchestration  machine
    L4 migration      switchover, bench, stress, seedtable, arcreport,
                      migration.engine/.local
    L5 QMP / CLI      cli, __main__, api, qmp.*

A module may import from its own layer or any lower one.  Every module must
be assigned a layer (a new module fails the check until it is placed here).
Imports inside functions count too: a lazy import is still a dependency.

Usage: ``python tools/check_layers.py [ROOT]``; exit 0 when clean, 1 with one
line per violation otherwise.  ``tests/unit/test_layers.py`` runs it.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

LAYER_NAMES = [
    "constants",
    "devices",
    "workers",
    "orchestration",
    "migration",
    "QMP/CLI",
]

#: Module-name prefixes and their layer; the longest matching prefix wins.
LAYERS: dict[str, int] = {
    "mpvfio": 0,
    "mpvfio.errors": 0,
    "mpvfio.argtypes": 0,
    "mpvfio.events": 0,
    "mpvfio.uapi": 0,
    "mpvfio.devices": 1,
    "mpvfio.ipc": 1,
    "mpvfio.vmstate": 1,
    "mpvfio.qdev": 1,
    "mpvfio.vfiomig": 1,
    "mpvfio.workers": 2,
    "mpvfio.machine": 3,
    "mpvfio.switchover": 4,
    "mpvfio.bench": 4,
    "mpvfio.stress": 4,
    "mpvfio.seedtable": 4,
    "mpvfio.arcreport": 4,
    "mpvfio.migration": 1,
    "mpvfio.migration.stream": 1,
    "mpvfio.migration.multifd": 1,
    "mpvfio.migration.transport": 1,
    "mpvfio.migration.engine": 4,
    "mpvfio.migration.local": 4,
    "mpvfio.cli": 5,
    "mpvfio.__main__": 5,
    "mpvfio.api": 5,
    "mpvfio.qmp": 5,
}


def layer_of(module: str) -> int | None:
    """The layer of a module name, or ``None`` if it is not assigned."""
    best: tuple[int, int] | None = None
    for prefix, layer in LAYERS.items():
        if module == prefix or module.startswith(prefix + "."):
            if prefix in ("mpvfio", "mpvfio.migration") and module != prefix:
                continue  # a bare package entry only covers its __init__.py
            if best is None or len(prefix) > best[0]:
                best = (len(prefix), layer)
    return None if best is None else best[1]


def module_name(path: Path, root: Path) -> str:
    """``workers/pool.py`` -> ``mpvfio.workers.pool`` (the installed name)."""
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "workers":
        parts = ["mpvfio", *parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path, module: str) -> list[tuple[int, str]]:
    """Every (line, imported module) of a file, relative imports resolved."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.append((node.lineno, name))
            # "from mpvfio import machine" imports the submodule mpvfio.machine
            for alias in node.names:
                sub = f"{name}.{alias.name}"
                if layer_of(sub) is not None and sub in LAYERS:
                    out.append((node.lineno, sub))
    return out


def check(root: Path) -> list[str]:
    """All violations under ``root`` (the repository top)."""
    problems: list[str] = []
    files = sorted((root / "mpvfio").rglob("*.py")) + sorted(
        (root / "workers").rglob("*.py")
    )
    for path in files:
        module = module_name(path, root)
        mine = layer_of(module)
        rel = path.relative_to(root)
        if mine is None:
            problems.append(
                f"{rel}: module {module} has no layer in tools/check_layers.py"
            )
            continue
        for line, target in imports_of(path, module):
            if target == "workers" or target.startswith("workers."):
                problems.append(
                    f"{rel}:{line}: import {target}: use the installed "
                    "name mpvfio.workers"
                )
                continue
            if not (target == "mpvfio" or target.startswith("mpvfio.")):
                continue
            theirs = layer_of(target)
            if theirs is None:
                problems.append(f"{rel}:{line}: {target} has no layer")
            elif theirs > mine:
                problems.append(
                    f"{rel}:{line}: {module} (L{mine} {LAYER_NAMES[mine]}) imports "
                    f"{target} (L{theirs} {LAYER_NAMES[theirs]}): imports must go "
                    "down the layers"
                )
    return problems


def main(argv: list[str]) -> int:
    root = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parents[1]
    problems = check(root)
    for p in problems:
        print(p)
    if not problems:
        print("layers: ok")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
