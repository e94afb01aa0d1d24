"""Operating-system limits that bound how many device workers a run can start.

This module owns the pre-flight check done before forking workers: POSIX
semaphores (``SC_SEM_NSEMS_MAX``), open files of the parent
(``RLIMIT_NOFILE``), processes of the user (``RLIMIT_NPROC``) and free space
in ``/dev/shm`` (where every semaphore and shared-memory object lives, one
page each at least).  A failed check raises :class:`~mpvfio.errors.UsageError`
naming the limit and how to raise it, instead of a confusing ``EMFILE`` or
``EAGAIN`` from the middle of a fork loop.
"""

from __future__ import annotations

import os
import resource

import psutil

from mpvfio.errors import UsageError

__all__ = ["BASE_FDS", "BASE_SEMS", "check_limits", "limits_report"]

#: Semaphores the run needs besides the workers' own (one ProcessBarrier).
BASE_SEMS = 4
#: Descriptors the parent keeps for itself beyond those it holds now.
BASE_FDS = 16
#: Bytes of ``/dev/shm`` a run needs besides one page per object.
_SHM_SLACK = 1 << 20
_SHM_DIR = "/dev/shm"


def _rlim(value: int) -> int | None:
    return None if value == resource.RLIM_INFINITY else int(value)


def _sem_nsems_max() -> int | None:
    try:
        value = os.sysconf("SC_SEM_NSEMS_MAX")
    except (ValueError, OSError):
        return None
    return None if value < 0 else value


def _open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return psutil.Process().num_fds()


def _user_tasks() -> int:
    """Tasks (threads count: Linux's RLIMIT_NPROC counts them) of our uid."""
    uid = os.getuid()
    total = 0
    for proc in psutil.process_iter(["uids", "num_threads"]):
        info = proc.info
        uids = info.get("uids")
        if uids is not None and uids.real == uid:
            total += int(info.get("num_threads") or 1)
    return total


def _shm_free() -> int | None:
    try:
        st = os.statvfs(_SHM_DIR)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def limits_report() -> dict[str, int | None]:
    """The limits :func:`check_limits` looks at (``None``: unlimited/unknown)."""
    nofile_soft, nofile_hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    nproc_soft, nproc_hard = resource.getrlimit(resource.RLIMIT_NPROC)
    return {
        "sem_nsems_max": _sem_nsems_max(),
        "nofile_soft": _rlim(nofile_soft),
        "nofile_hard": _rlim(nofile_hard),
        "open_fds": _open_fds(),
        "nproc_soft": _rlim(nproc_soft),
        "nproc_hard": _rlim(nproc_hard),
        "user_tasks": _user_tasks(),
        "shm_free_bytes": _shm_free(),
        "page_size": os.sysconf("SC_PAGE_SIZE"),
        "cpu_count": os.cpu_count(),
    }


def _how_to_raise(ulimit: str, hard: int, need: int, conf: str, unit: str) -> str:
    """The command that lifts a soft limit, or the hard limit first."""
    if hard != resource.RLIM_INFINITY and need > hard:
        return (
            f"raise the hard limit ({conf} in /etc/security/limits.conf, "
            f"or {unit} for a service), then {ulimit}"
        )
    return ulimit


def check_limits(
    n_workers: int, sems_per_worker: int = 0, fds_per_worker: int = 4
) -> None:
    """Check that the OS lets this process run ``n_workers`` workers.

    :param n_workers: worker processes the run will fork.
    :param sems_per_worker: named semaphores created per worker (besides the
        barrier's :data:`BASE_SEMS`).
    :param fds_per_worker: descriptors the parent holds per worker (pipes,
        sentinels ...).
    :raises UsageError: a limit is too low; the message names it and the
        command that raises it.
    """
    for label, value in (
        ("n_workers", n_workers),
        ("sems_per_worker", sems_per_worker),
        ("fds_per_worker", fds_per_worker),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise UsageError(f"{label} must be an int >= 0, got {value!r}")

    sems = BASE_SEMS + n_workers * sems_per_worker
    nsems_max = _sem_nsems_max()
    if nsems_max is not None and sems > nsems_max:
        raise UsageError(
            f"{n_workers} workers need {sems} POSIX semaphores but "
            f"SEM_NSEMS_MAX (sysconf SC_SEM_NSEMS_MAX) is {nsems_max}: "
            f"use fewer workers"
        )

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fds = _open_fds() + BASE_FDS + n_workers * fds_per_worker
    if soft != resource.RLIM_INFINITY and fds > soft:
        how = _how_to_raise(
            f"ulimit -n {max(fds, 4096)}", hard, fds, "nofile", "LimitNOFILE="
        )
        raise UsageError(
            f"{n_workers} workers need about {fds} open files in the parent but "
            f"RLIMIT_NOFILE (soft) is {soft}: {how}"
        )

    soft, hard = resource.getrlimit(resource.RLIMIT_NPROC)
    if soft != resource.RLIM_INFINITY and os.geteuid() != 0:
        # root (CAP_SYS_RESOURCE/CAP_SYS_ADMIN) is not held to RLIMIT_NPROC
        tasks = _user_tasks() + n_workers
        if tasks > soft:
            how = _how_to_raise(
                f"ulimit -u {max(tasks * 2, 4096)}",
                hard,
                tasks,
                "nproc",
                "TasksMax=/LimitNPROC=",
            )
            raise UsageError(
                f"{n_workers} workers would bring this user to {tasks} tasks but "
                f"RLIMIT_NPROC (soft) is {soft}: {how}"
            )

    free = _shm_free()
    if free is not None:
        page = os.sysconf("SC_PAGE_SIZE")
        need = _SHM_SLACK + page * (sems + 1 + n_workers)
        if free < need:
            raise UsageError(
                f"{_SHM_DIR} has {free} bytes free, {n_workers} workers need "
                f"about {need}: free space there (stale objects: "
                f"mpvfio.ipc.sweep_stale()) or enlarge it "
                f"(mount -o remount,size=256M {_SHM_DIR})"
            )
