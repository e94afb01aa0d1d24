"""check_limits names the limit to raise and how."""

from __future__ import annotations

import resource

import pytest

from mpvfio.errors import UsageError
from mpvfio.ipc import limits


def _rlimits(nofile: tuple[int, int], nproc: tuple[int, int]) -> object:
    def getrlimit(which: int) -> tuple[int, int]:
        return nofile if which == resource.RLIMIT_NOFILE else nproc

    return getrlimit


def test_enough_of_everything_passes() -> None:
    limits.check_limits(4, sems_per_worker=4, fds_per_worker=4)


def test_too_few_files_names_ulimit_n(monkeypatch: pytest.MonkeyPatch) -> None:
    inf = resource.RLIM_INFINITY
    monkeypatch.setattr(limits.resource, "getrlimit", _rlimits((64, inf), (inf, inf)))
    with pytest.raises(UsageError, match=r"RLIMIT_NOFILE \(soft\) is 64: ulimit -n"):
        limits.check_limits(256, fds_per_worker=4)


def test_a_hard_limit_says_raise_it_first(monkeypatch: pytest.MonkeyPatch) -> None:
    inf = resource.RLIM_INFINITY
    monkeypatch.setattr(limits.resource, "getrlimit", _rlimits((64, 128), (inf, inf)))
    with pytest.raises(UsageError, match="raise the hard limit \\(nofile in"):
        limits.check_limits(256, fds_per_worker=4)


def test_bad_arguments() -> None:
    with pytest.raises(UsageError, match="n_workers"):
        limits.check_limits(-1)
