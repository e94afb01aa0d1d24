"""The import-layer rule holds for the tree, and the checker catches breaks."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def _checker() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "check_layers", ROOT / "tools" / "check_layers.py"
    )
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["check_layers"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_tree_imports_only_go_down() -> None:
    assert _checker().check(ROOT) == []


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    (tmp_path / "workers").mkdir(exist_ok=True)
    return tmp_path


def test_upward_import_is_reported(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "mpvfio/__init__.py": "",
            "mpvfio/vmstate.py": "from mpvfio.machine import Machine\n",
            "mpvfio/machine.py": "from mpvfio import vmstate\n",
        },
    )
    problems = _checker().check(root)
    assert len(problems) == 1
    assert "mpvfio/vmstate.py:1" in problems[0]
    assert "imports must go down" in problems[0]


def test_lazy_and_relative_imports_count(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "mpvfio/__init__.py": "",
            "mpvfio/devices/__init__.py": "",
            "mpvfio/devices/emulated.py": (
                "def f():\n    from ..jobs.switchover import run_switchover\n"
            ),
            "mpvfio/jobs/__init__.py": "",
            "mpvfio/jobs/switchover.py": "",
        },
    )
    problems = _checker().check(root)
    assert len(problems) == 1 and "mpvfio.jobs.switchover" in problems[0]


def test_unassigned_module_and_toplevel_workers_import(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "mpvfio/__init__.py": "",
            "mpvfio/newthing.py": "",
            "mpvfio/machine.py": "import workers.device\n",
        },
    )
    problems = _checker().check(root)
    assert any("newthing" in p and "no layer" in p for p in problems)
    assert any("mpvfio.workers" in p and "installed name" in p for p in problems)
