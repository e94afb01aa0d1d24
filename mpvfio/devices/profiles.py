"""Device profiles: how an emulated VF behaves in time and size (layer 1).

A :class:`Profile` gives every VFIO arc a latency (ms, optional jitter), the
size of the device state, the data bandwidth of the saving/resuming fd, the
device's STOP_COPY save rate, the pre-copy initial and dirty byte counts, the
migration flags, a PF concurrency limit (how many VFs of one PF may execute
an arc at once: real PF firmware serialises) and per-arc fault injection.

Built-in profiles:

``instant``  no latency, 64 KiB of state: the tests' device.
``fixed50``  every arc takes exactly 50 ms, 64 KiB of state, no PF limit:
             the benchmarks' reference device (its ideal downtime is known).
``cx7``      a ConnectX-7 VF, calibrated to the seed thread's downtime table
             (../shared/seeds/000; the model and its fit are in
             :mod:`mpvfio.jobs.seedtable`).  See below.

The ``cx7`` model.  The seed's downtimes fit ``F + N x (T + D)`` with serial
transitions and ``F + T + N x D`` with parallel ones (F = 200 ms fixed,
T = 125 ms of stop + start arcs per VF, D = 163 ms of STOP_COPY data per VF,
the data serial in the seed).  The profile supplies T and D:

* **T**: the arcs inside the downtime, PRE_COPY -> PRE_COPY_P2P (15 ms) ->
  STOP_COPY (42) on the source and RESUMING -> STOP (36) -> RUNNING_P2P (15)
  -> RUNNING (10) on the target, 118 ms plus 0-2 ms jitter per arc.  The
  arcs outside it (save_setup, load_setup, save_cleanup, the P2P/STOP arcs
  of a plain switchover) cost 10-42 ms alike.
* **D**: a real CX7 VF saves ~100 MiB in STOP_COPY, and what bounds that is
  the firmware's save rate, not the link.  The emulation keeps the time and
  scales the bytes down by ~30, so that moving the data through Python costs
  little beside D.  The state is 4 MiB; pre-copy offers 768 KiB of it at the
  data fd's 1.2 GB/s, then the running device dirties 64 KiB; STOP_COPY
  streams what pre-copy did not send clean, ~3.3 MiB, at the device's save
  rate ``stopcopy_rate`` = 24.5 MB/s: 142 ms per VF, the data path adding
  ~20 ms.  The rate is per device: VFs read in parallel (multifd) save in
  parallel.  The pre-copy data fits one 1 MiB read, so when the pre-copy
  loop decides it has converged moves at most the 64 dirtied KiB (~3 ms).
* **PF limit 4**: 4 VFs may run an arc at once.  The seed's enabled 4-VF
  figure rules out 2 or 3 (two waves of arcs: +12 %); it cannot tell 4
  from no limit, and 4 is the least value it allows.

Profiles also load from JSON (:func:`load_profile`), e.g.::

    {"name": "slowstop", "base": "fixed50",
     "arc_ms": {"PRE_COPY_P2P>STOP_COPY": 120},
     "faults": {"RUNNING_P2P>STOP": {"kind": "errno", "errno": "EIO"}}}

Arc keys are ``"SRC>DST"`` with uAPI state names; ``"*"`` sets the default.
"""

from __future__ import annotations

import dataclasses
import errno as _errno
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mpvfio.errors import ProfileError
from mpvfio.uapi.vfio import MigFlag, MigState

__all__ = [
    "BUILTIN_PROFILES",
    "Fault",
    "Profile",
    "arc_key",
    "get_profile",
    "load_profile",
    "profile_from_dict",
]

KiB = 1024
MiB = 1024 * KiB

FAULT_KINDS = ("errno", "hang", "slow", "error-state")
_DEFINED_FLAGS = int(MigFlag.STOP_COPY | MigFlag.P2P | MigFlag.PRE_COPY)


def arc_key(src: MigState, dst: MigState) -> str:
    """The profile key of one arc: ``"RUNNING>RUNNING_P2P"``."""
    return f"{src.name}>{dst.name}"


@dataclass(frozen=True)
class Fault:
    """A fault injected on one arc.

    :param kind: ``errno`` (the arc fails, the device stays in the arc's
        source state), ``error-state`` (the arc fails and the device lands in
        ERROR), ``hang`` (the arc blocks for ``ms``, default one hour: only a
        kill ends it), ``slow`` (the arc takes ``ms`` longer).
    :param err: the errno a failing arc reports (default EIO).
    :param ms: duration for ``hang`` / ``slow``.
    :param times: how many times the fault fires (``None``: every time).
    """

    kind: str
    err: int = _errno.EIO
    ms: float = 3_600_000.0
    times: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ProfileError(
                f"unknown fault kind {self.kind!r}; valid: {', '.join(FAULT_KINDS)}"
            )
        if (
            not isinstance(self.ms, int | float)
            or isinstance(self.ms, bool)
            or self.ms < 0
            or not math.isfinite(self.ms)
        ):
            raise ProfileError(f"fault duration 'ms' must be >= 0 ms, got {self.ms!r}")
        if self.times is not None and (
            not isinstance(self.times, int)
            or isinstance(self.times, bool)
            or self.times < 0
        ):
            raise ProfileError(
                f"fault 'times' must be an integer >= 0 or null, got {self.times!r}"
            )
        if not isinstance(self.err, int) or isinstance(self.err, bool) or self.err < 1:
            raise ProfileError(
                f"fault 'errno' must be a positive errno, got {self.err!r}"
            )


@dataclass(frozen=True)
class Profile:
    """How an emulated device behaves (see the module docstring).

    :param name: profile name (shown in reports).
    :param flags: the VFIO_MIGRATION_* bits the device advertises.
    :param default_arc_ms: latency of an arc without its own entry.
    :param arc_ms: per-arc latency overrides, keyed ``"SRC>DST"``.
    :param jitter_ms: uniform extra latency 0..jitter per arc (seeded).
    :param state_size: bytes of device state (what STOP_COPY streams).
    :param bandwidth: bytes/s of the data fd, reads and writes (0: unlimited).
    :param stopcopy_rate: bytes/s at which the device produces its STOP_COPY
        data: the firmware's save rate once the device is stopped.  Reads of
        the saving fd in STOP_COPY are paced at this rate instead of
        ``bandwidth`` (0: ``bandwidth`` applies to them too).
    :param precopy_initial: initial pre-copy bytes (capped at state_size).
    :param precopy_dirty: bytes the device dirties once the initial data
        has been read (they are sent again).
    :param pf_concurrency: VFs of one PF that may run an arc at the same
        time (0: no limit).
    :param faults: per-arc fault injection, keyed ``"SRC>DST"``.
    """

    name: str
    flags: MigFlag = MigFlag.STOP_COPY | MigFlag.P2P | MigFlag.PRE_COPY
    default_arc_ms: float = 0.0
    arc_ms: Mapping[str, float] = field(default_factory=dict)
    jitter_ms: float = 0.0
    state_size: int = 64 * KiB
    bandwidth: float = 0.0
    stopcopy_rate: float = 0.0
    precopy_initial: int = 16 * KiB
    precopy_dirty: int = 4 * KiB
    pf_concurrency: int = 0
    faults: Mapping[str, Fault] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name:
            raise ProfileError("a profile needs a name")
        if (
            not isinstance(self.flags, int)
            or isinstance(self.flags, bool)
            or self.flags < 0
            or self.flags & ~_DEFINED_FLAGS
        ):
            raise ProfileError(
                f"profile {self.name!r}: flags {self.flags!r} set undefined bits "
                f"(defined: {', '.join(MigFlag.__members__)} = {_DEFINED_FLAGS:#x})"
            )
        if not MigFlag(self.flags) & MigFlag.STOP_COPY:
            raise ProfileError(
                f"profile {self.name!r}: flags must include STOP_COPY (mandatory)"
            )
        for what, ms in [
            ("default_arc_ms", self.default_arc_ms),
            ("jitter_ms", self.jitter_ms),
            *self.arc_ms.items(),
        ]:
            if not isinstance(ms, int | float) or ms < 0 or not math.isfinite(ms):
                raise ProfileError(
                    f"profile {self.name!r}: latency {what} must be a finite "
                    f"number >= 0 ms, got {ms!r}"
                )
        for key in [*self.arc_ms, *self.faults]:
            _check_arc_key(self.name, key)
        for what, n in [
            ("state_size", self.state_size),
            ("precopy_initial", self.precopy_initial),
            ("precopy_dirty", self.precopy_dirty),
            ("pf_concurrency", self.pf_concurrency),
        ]:
            if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                raise ProfileError(
                    f"profile {self.name!r}: {what} must be an integer >= 0, got {n!r}"
                )
        if self.state_size < 1:
            raise ProfileError(f"profile {self.name!r}: state_size must be >= 1")
        for what, rate, zero in [
            ("bandwidth", self.bandwidth, "unlimited"),
            ("stopcopy_rate", self.stopcopy_rate, "the bandwidth applies"),
        ]:
            if (
                not isinstance(rate, int | float)
                or isinstance(rate, bool)
                or rate < 0
                or not math.isfinite(rate)
            ):
                raise ProfileError(
                    f"profile {self.name!r}: {what} must be >= 0 bytes/s "
                    f"(0 = {zero}), got {rate!r}"
                )

    def latency_ms(self, src: MigState, dst: MigState) -> float:
        """The configured latency of one arc, without jitter."""
        return float(self.arc_ms.get(arc_key(src, dst), self.default_arc_ms))

    def fault(self, src: MigState, dst: MigState) -> Fault | None:
        """The fault configured on one arc, if any."""
        return self.faults.get(arc_key(src, dst))

    def replace(self, **changes: Any) -> Profile:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (what :func:`profile_from_dict` reads back)."""
        return {
            "name": self.name,
            "flags": [f.name for f in MigFlag if f & self.flags],
            "default_arc_ms": self.default_arc_ms,
            "arc_ms": dict(self.arc_ms),
            "jitter_ms": self.jitter_ms,
            "state_size": self.state_size,
            "bandwidth": self.bandwidth,
            "stopcopy_rate": self.stopcopy_rate,
            "precopy_initial": self.precopy_initial,
            "precopy_dirty": self.precopy_dirty,
            "pf_concurrency": self.pf_concurrency,
            "faults": {
                k: {
                    "kind": f.kind,
                    "errno": _errno.errorcode.get(f.err, f.err),
                    "ms": f.ms,
                    "times": f.times,
                }
                for k, f in self.faults.items()
            },
        }


def _check_arc_key(profile: str, key: str) -> None:
    src, sep, dst = key.partition(">")
    if not sep or src not in MigState.__members__ or dst not in MigState.__members__:
        raise ProfileError(
            f"profile {profile!r}: bad arc key {key!r}; expected 'SRC>DST' with "
            f"state names from {', '.join(MigState.__members__)}"
        )


# The cx7 model: see the module docstring and mpvfio.jobs.seedtable.
_CX7_ARCS = {
    "RUNNING>PRE_COPY": 20.0,
    "PRE_COPY>PRE_COPY_P2P": 15.0,
    "PRE_COPY_P2P>STOP_COPY": 42.0,
    "RUNNING>RUNNING_P2P": 15.0,
    "RUNNING_P2P>STOP": 30.0,
    "STOP>STOP_COPY": 42.0,
    "STOP_COPY>STOP": 15.0,
    "STOP>RESUMING": 10.0,
    "RESUMING>STOP": 36.0,
    "STOP>RUNNING_P2P": 15.0,
    "RUNNING_P2P>RUNNING": 10.0,
}

BUILTIN_PROFILES: dict[str, Profile] = {
    "instant": Profile(name="instant"),
    "fixed50": Profile(name="fixed50", default_arc_ms=50.0),
    "cx7": Profile(
        name="cx7",
        default_arc_ms=20.0,
        arc_ms=_CX7_ARCS,
        jitter_ms=2.0,
        state_size=4 * MiB,
        bandwidth=1.2e9,
        stopcopy_rate=24.5e6,
        precopy_initial=768 * KiB,
        precopy_dirty=64 * KiB,
        pf_concurrency=4,
    ),
}


def get_profile(name: str) -> Profile:
    """A built-in profile by name, or a JSON profile file by path."""
    if name in BUILTIN_PROFILES:
        return BUILTIN_PROFILES[name]
    if name.endswith(".json") or "/" in name:
        return load_profile(name)
    raise ProfileError(
        f"unknown profile {name!r}; built-in: {', '.join(BUILTIN_PROFILES)} "
        f"(or give a path to a .json profile file)"
    )


def load_profile(path: str | Path) -> Profile:
    """Read a profile from a JSON file (see the module docstring)."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ProfileError(f"cannot read profile file {path}: {exc}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProfileError(f"profile file {path} is not valid JSON: {exc}") from exc
    return profile_from_dict(data, source=str(path))


_FIELDS = {f.name for f in dataclasses.fields(Profile)}


def profile_from_dict(data: Any, source: str = "<dict>") -> Profile:
    """Build a profile from a JSON-style dict (optionally ``"base"``-derived)."""
    if not isinstance(data, dict):
        raise ProfileError(f"profile {source}: expected a JSON object")
    data = dict(data)
    base_name = data.pop("base", None)
    unknown = set(data) - _FIELDS
    if unknown:
        raise ProfileError(
            f"profile {source}: unknown field(s) {', '.join(sorted(unknown))}; "
            f"valid: base, {', '.join(sorted(_FIELDS))}"
        )
    kwargs: dict[str, Any] = {}
    if base_name is not None:
        if base_name not in BUILTIN_PROFILES:
            raise ProfileError(
                f"profile {source}: unknown base {base_name!r}; "
                f"built-in: {', '.join(BUILTIN_PROFILES)}"
            )
        base = BUILTIN_PROFILES[base_name]
        kwargs = {f: getattr(base, f) for f in _FIELDS}
    for key, value in data.items():
        if key == "flags":
            kwargs[key] = _parse_flags(value, source)
        elif key == "faults":
            kwargs[key] = _parse_faults(value, source)
        elif key == "arc_ms":
            if not isinstance(value, dict):
                raise ProfileError(f"profile {source}: arc_ms must be an object")
            arcs = dict(kwargs.get("arc_ms", {}))
            for k, v in value.items():
                if k == "*":
                    kwargs["default_arc_ms"] = v
                else:
                    arcs[k] = v
            kwargs["arc_ms"] = arcs
        else:
            kwargs[key] = value
    if "name" not in data:  # not the base's name: a derived profile is not it
        kwargs["name"] = Path(source).stem if source != "<dict>" else "custom"
    try:
        return Profile(**kwargs)
    except TypeError as exc:
        raise ProfileError(f"profile {source}: {exc}") from exc


def _parse_flags(value: Any, source: str) -> MigFlag:
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0 or value & ~_DEFINED_FLAGS:
            raise ProfileError(
                f"profile {source}: flags {value!r} set undefined bits "
                f"(defined: {_DEFINED_FLAGS:#x})"
            )
        return MigFlag(value)
    if isinstance(value, str):
        value = value.replace("|", ",").split(",")
    if not isinstance(value, list):
        raise ProfileError(f"profile {source}: flags must be a list of names")
    flags = MigFlag(0)
    for name in value:
        key = str(name).strip().upper()
        if key not in MigFlag.__members__:
            raise ProfileError(
                f"profile {source}: unknown migration flag {name!r}; "
                f"valid: {', '.join(MigFlag.__members__)}"
            )
        flags |= MigFlag[key]
    return flags


def _parse_faults(value: Any, source: str) -> dict[str, Fault]:
    if not isinstance(value, dict):
        raise ProfileError(f"profile {source}: faults must be an object")
    faults: dict[str, Fault] = {}
    for key, spec in value.items():
        if not isinstance(spec, dict) or "kind" not in spec:
            raise ProfileError(
                f"profile {source}: fault {key!r} must be an object with 'kind'"
            )
        unknown = set(spec) - {"kind", "errno", "ms", "times"}
        if unknown:
            raise ProfileError(
                f"profile {source}: fault {key!r} has unknown field(s) "
                f"{', '.join(sorted(unknown))}"
            )
        err = spec.get("errno", _errno.EIO)
        if isinstance(err, str):
            # Only errno names (aliases such as ENOTSUP too), not other
            # attributes of the errno module such as "errorcode".
            value = getattr(_errno, err, None) if err.startswith("E") else None
            if not isinstance(value, int):
                raise ProfileError(
                    f"profile {source}: fault {key!r}: unknown errno {err!r}"
                )
            err = value
        try:
            faults[key] = Fault(
                kind=spec["kind"],
                err=err,
                ms=spec.get("ms", 3_600_000.0),
                times=spec.get("times"),
            )
        except ProfileError as exc:
            raise ProfileError(f"profile {source}: fault {key!r}: {exc}") from None
    return faults
