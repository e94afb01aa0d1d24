#!/usr/bin/env python3
"""Check that mpvfio's imports only go down the layers.

One package (or top-level module), one layer:

    L0 constants      mpvfio (the package itself), errors, events, argtypes,
                      uapi
    L1 devices        ipc, net, wire, devices, vmstate, qdev, vfiomig
    L2 workers        workers (installed as mpvfio.workers)
    L3 orchestration  machine
    L4 migration      migration, jobs, report
    L5 QMP / CLI      qmp, cli, api, __main__

A module may import from its own layer or any lower one.  Every module must
belong to a package of the table (a new package fails the check until it is
placed here).  Imports inside functions count too: a lazy import is still a
dependency.  A module may not import a private name (``_x``) of another
package, nor a private module of another package.

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

#: Packages and top-level modules of ``mpvfio``, each with its layer.
LAYERS: dict[str, int] = {
    "mpvfio.errors": 0,
    "mpvfio.events": 0,
    "mpvfio.argtypes": 0,
    "mpvfio.uapi": 0,
    "mpvfio.ipc": 1,
    "mpvfio.net": 1,
    "mpvfio.wire": 1,
    "mpvfio.devices": 1,
    "mpvfio.vmstate": 1,
    "mpvfio.qdev": 1,
    "mpvfio.vfiomig": 1,
    "mpvfio.workers": 2,
    "mpvfio.machine": 3,
    "mpvfio.migration": 4,
    "mpvfio.jobs": 4,
    "mpvfio.report": 4,
    "mpvfio.qmp": 5,
    "mpvfio.cli": 5,
    "mpvfio.api": 5,
    "mpvfio.__main__": 5,
}

#: The root package (its ``__init__``: the version) sits below everything.
ROOT = "mpvfio"


def unit_of(module: str) -> str | None:
    """The table entry (package or top-level module) a module belongs to."""
    if module == ROOT:
        return ROOT
    parts = module.split(".")
    if len(parts) < 2 or parts[0] != ROOT:
        return None
    unit = ".".join(parts[:2])
    return unit if unit in LAYERS else None


def layer_of(module: str) -> int | None:
    """The layer of a module name, or ``None`` if it is not assigned."""
    unit = unit_of(module)
    if unit is None:
        return None
    return 0 if unit == ROOT else LAYERS[unit]


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
            # "from mpvfio import machine" imports the submodule mpvfio.machine;
            # "from mpvfio.ipc import _x" names a private module or name
            for alias in node.names:
                sub = f"{name}.{alias.name}"
                dunder = alias.name.startswith("__")
                if sub in LAYERS or (alias.name.startswith("_") and not dunder):
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
            private = next(
                (p for p in target.split(".")[2:] if p.startswith("_")), None
            )
            if (
                private is not None
                and private != "__init__"
                and unit_of(target) != unit_of(module)
            ):
                problems.append(
                    f"{rel}:{line}: import {target}: {private} is private to "
                    f"{unit_of(target)}"
                )
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
