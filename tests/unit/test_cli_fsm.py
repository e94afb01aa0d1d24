"""Tests of ``mpvfio fsm``: exit codes, text and JSON output, usage errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mpvfio.cli.main import build_parser, main

FLAG_SETS = {
    "STOP_COPY": 0x1,
    "STOP_COPY,P2P": 0x3,
    "STOP_COPY|PRE_COPY": 0x5,
    "STOP_COPY,P2P,PRE_COPY": 0x7,
}

# Expected outcomes typed in from VFIO_FSM.md (None = EINVAL).
EXPECTED: dict[tuple[int, str, str], list[str] | None] = {
    (0x1, "RUNNING", "STOP_COPY"): ["RUNNING", "STOP", "STOP_COPY"],
    (0x3, "RUNNING", "STOP_COPY"): ["RUNNING", "RUNNING_P2P", "STOP", "STOP_COPY"],
    (0x3, "STOP", "RUNNING"): ["STOP", "RUNNING_P2P", "RUNNING"],
    (0x3, "PRE_COPY", "PRE_COPY"): ["PRE_COPY"],
    (0x3, "PRE_COPY", "STOP"): None,
    (0x5, "PRE_COPY", "STOP_COPY"): ["PRE_COPY", "STOP_COPY"],
    (0x5, "STOP_COPY", "PRE_COPY"): None,
    (0x7, "PRE_COPY", "STOP"): ["PRE_COPY", "RUNNING", "RUNNING_P2P", "STOP"],
    (0x7, "STOP", "PRE_COPY"): ["STOP", "RUNNING_P2P", "RUNNING", "PRE_COPY"],
    (0x7, "STOP_COPY", "PRE_COPY_P2P"): None,
    (0x7, "ERROR", "ERROR"): ["ERROR"],
    (0x7, "ERROR", "RUNNING"): None,
    (0x7, "RUNNING", "ERROR"): None,
    (0x1, "RUNNING_P2P", "RUNNING_P2P"): ["RUNNING_P2P"],
    (0x1, "STOP", "RUNNING_P2P"): None,
}
SUCCESS = {0x1: 20, 0x3: 28, 0x5: 27, 0x7: 48}


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("text", list(FLAG_SETS))
def test_table_json(capsys: pytest.CaptureFixture[str], text: str) -> None:
    flags = FLAG_SETS[text]
    rc, out, _ = run(capsys, "fsm", "--flags", text, "--table", "--json")
    assert rc == 0
    rows = json.loads(out)
    assert len(rows) == 64
    assert all(set(r) == {"cur", "new", "path", "error"} for r in rows)
    assert sum(r["error"] is None for r in rows) == SUCCESS[flags]
    assert all((r["path"] is None) == (r["error"] == "EINVAL") for r in rows)
    by_pair = {(r["cur"], r["new"]): r["path"] for r in rows}
    assert [k[0] for k in by_pair][::8] == [
        "ERROR",
        "STOP",
        "RUNNING",
        "STOP_COPY",
        "RESUMING",
        "RUNNING_P2P",
        "PRE_COPY",
        "PRE_COPY_P2P",
    ]
    checked = 0
    for (f, cur, new), path in EXPECTED.items():
        if f == flags:
            assert by_pair[cur, new] == path, (cur, new)
            checked += 1
    assert checked >= 2


def test_table_text(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "fsm", "--table")
    assert rc == 0
    lines = out.splitlines()
    assert lines[0] == "flags STOP_COPY,P2P,PRE_COPY (0x7)"
    assert lines[1].split() == ["CUR", "NEW", "RESULT"]
    body = lines[2:-1]
    assert len(body) == 64
    col = lines[1].index("RESULT")
    for line in body:  # aligned: CUR and NEW fill exactly the first columns
        assert len(line[:col].split()) == 2
        assert line[col - 1] == " " != line[col]
    assert "48 succeed, 16 EINVAL, 18 return a data_fd" in lines[-1]


@pytest.mark.parametrize(("key", "path"), list(EXPECTED.items()))
def test_single_pair(
    capsys: pytest.CaptureFixture[str],
    key: tuple[int, str, str],
    path: list[str] | None,
) -> None:
    flags, cur, new = key
    rc, out, _ = run(capsys, "fsm", "--flags", hex(flags), "--json", cur, new)
    assert rc == (0 if path else 1)
    assert json.loads(out) == {
        "cur": cur,
        "new": new,
        "path": path,
        "error": None if path else "EINVAL",
    }
    rc, out, _ = run(capsys, "fsm", "--flags", hex(flags), cur, new)
    assert rc == (0 if path else 1)
    if path:
        assert out.startswith(" -> ".join(path) + " (")
    else:
        assert out.startswith("EINVAL: ")


def test_text_path_and_data_fd(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "fsm", "running", "stop")
    assert (rc, out) == (0, "RUNNING -> RUNNING_P2P -> STOP (2 arcs)\n")
    rc, out, _ = run(capsys, "fsm", "--flags", "STOP_COPY", "running", "stop-copy")
    assert rc == 0
    assert out == "RUNNING -> STOP -> STOP_COPY (2 arcs, data_fd returned)\n"


@pytest.mark.timeout(5)
def test_blocked_arc(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "fsm", "STOP_COPY", "PRE_COPY")
    assert rc == 1
    assert out == "EINVAL: STOP_COPY -> PRE_COPY is a blocked arc\n"


@pytest.mark.parametrize(
    ("argv", "token"),
    [
        (["fsm", "--flags", "STOP_COPY,BOGUS", "STOP", "RUNNING"], "BOGUS"),
        (["fsm", "--flags", "P2P", "STOP", "RUNNING"], "STOP_COPY is mandatory"),
        (["fsm", "STOP", "RUNING"], "RUNING"),
        (["fsm", "STOOP", "RUNNING"], "STOOP"),
        (["fsm", "STOP", "8"], "'8'"),
        (["fsm", "STOP"], "CUR and NEW"),
        (["fsm", "--table", "STOP", "RUNNING"], "--table"),
    ],
)
def test_usage_errors(
    capsys: pytest.CaptureFixture[str], argv: list[str], token: str
) -> None:
    rc, out, err = run(capsys, *argv)
    assert rc == 2
    assert out == ""
    assert err.startswith("mpvfio: error: ")
    assert token in err


def test_argparse_errors_return_2(capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run(capsys, "nosuchcommand")
    assert rc == 2
    assert "nosuchcommand" in err
    rc, _, _ = run(capsys)
    assert rc == 2


def test_help_texts(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "fsm", "--help")
    assert rc == 0
    assert "examples:" in out
    assert "--table" in out
    assert "STOP_COPY,P2P,PRE_COPY" in out
    assert build_parser().prog == "mpvfio"


def test_python_m_help() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mpvfio", "fsm", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "usage: mpvfio fsm" in proc.stdout
