"""The README opens with the two set-up commands, and CI runs the second."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```sh\n(.*?)```", text, re.S)
    assert block is not None, "README must open with a ```sh block"
    assert text.index("```sh") < text.index("\n## "), "the commands come first"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_exactly_two_setup_commands() -> None:
    cmds = _commands()
    assert len(cmds) == 2
    assert cmds[0].startswith("pip install -e . && mpvfio ")
    assert "pytest" in cmds[1]


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert _commands()[1] in ci


def test_main_job_parses() -> None:
    from mpvfio.cli.main import build_parser

    argv = _commands()[0].split(" && ")[1].split()[1:]
    args = build_parser().parse_args(argv)
    assert args.func is not None
