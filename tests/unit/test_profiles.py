"""Tests of mpvfio.devices.profiles: built-ins, JSON loading, validation.

Expectations come from the module's documented contract (its docstring,
README "Device profiles") and VFIO_UAPI.md / VFIO_FSM.md (flag sets: STOP_COPY
is mandatory, only the bits STOP_COPY, P2P and PRE_COPY are defined).
"""

from __future__ import annotations

import errno
import itertools
import json
import math
from pathlib import Path
from typing import Any

import pytest

from mpvfio.devices.profiles import (
    BUILTIN_PROFILES,
    Fault,
    Profile,
    arc_key,
    get_profile,
    load_profile,
    profile_from_dict,
)
from mpvfio.errors import ProfileError, UsageError
from mpvfio.uapi.vfio import MigFlag, MigState

MiB = 1024 * 1024
ALL_FLAGS = MigFlag.STOP_COPY | MigFlag.P2P | MigFlag.PRE_COPY
ARCS = list(itertools.permutations(MigState, 2))


def _write(tmp_path: Path, name: str, data: Any) -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


# ------------------------------------------------------------------ built-ins
def test_builtins_exist() -> None:
    assert {"instant", "fixed50", "cx7"} <= set(BUILTIN_PROFILES)
    for name, prof in BUILTIN_PROFILES.items():
        assert get_profile(name) is prof
        assert prof.name == name
        assert prof.flags & MigFlag.STOP_COPY


def test_instant_has_no_latency() -> None:
    prof = get_profile("instant")
    assert prof.jitter_ms == 0
    for src, dst in ARCS:
        assert prof.latency_ms(src, dst) == 0.0
    assert prof.state_size == 64 * 1024
    assert prof.faults == {}


def test_fixed50_every_arc_takes_50ms() -> None:
    prof = get_profile("fixed50")
    assert prof.jitter_ms == 0
    for src, dst in ARCS:
        assert prof.latency_ms(src, dst) == 50.0, arc_key(src, dst)
    assert prof.pf_concurrency == 0  # no PF limit
    assert prof.state_size == 64 * 1024


def test_cx7_is_the_calibrated_seed_model() -> None:
    """The numbers mpvfio.jobs.seedtable's docstring derives from the seed's table."""
    prof = get_profile("cx7")
    assert prof.flags == ALL_FLAGS
    assert prof.pf_concurrency == 4  # the least limit the seed's 4-VF row allows
    # T: the five arcs inside the downtime, 118 ms, plus 0-2 ms jitter each
    downtime_arcs = [
        (MigState.PRE_COPY, MigState.PRE_COPY_P2P),
        (MigState.PRE_COPY_P2P, MigState.STOP_COPY),
        (MigState.RESUMING, MigState.STOP),
        (MigState.STOP, MigState.RUNNING_P2P),
        (MigState.RUNNING_P2P, MigState.RUNNING),
    ]
    assert sum(prof.latency_ms(a, b) for a, b in downtime_arcs) == 118.0
    assert prof.jitter_ms == 2.0
    # every arc costs something, none more than the quiesce-and-save arc
    for src, dst in ARCS:
        assert 10.0 <= prof.latency_ms(src, dst) <= 42.0, arc_key(src, dst)
    # D: a scaled-down payload read at the device's save rate (~142 ms)
    assert prof.state_size == 4 * MiB
    assert 0 < prof.precopy_initial < prof.state_size
    stop_copy = prof.state_size - prof.precopy_initial + prof.precopy_dirty
    assert stop_copy / prof.stopcopy_rate * 1000 == pytest.approx(142.0, abs=1.0)
    # pre-copy is fast (the data fd) and fits one 1 MiB read with its headers,
    # so the STOP_COPY size barely depends on when pre-copy converges
    assert prof.bandwidth >= 40 * prof.stopcopy_rate
    records = (prof.precopy_initial // 4096) * 16 + 32
    assert prof.precopy_initial + records <= 1 * MiB


def test_stopcopy_rate_defaults_to_off_and_round_trips() -> None:
    assert Profile(name="p").stopcopy_rate == 0.0
    prof = profile_from_dict({"base": "instant", "stopcopy_rate": 5e6})
    assert prof.stopcopy_rate == 5e6
    assert prof.to_dict()["stopcopy_rate"] == 5e6


def test_get_profile_unknown_names_the_valid_ones() -> None:
    with pytest.raises(ProfileError) as info:
        get_profile("nosuch")
    msg = str(info.value)
    assert "nosuch" in msg
    for name in ("instant", "fixed50", "cx7"):
        assert name in msg
    assert isinstance(info.value, UsageError)  # the caller's fault


def test_arc_key_and_lookups() -> None:
    assert arc_key(MigState.RUNNING, MigState.RUNNING_P2P) == "RUNNING>RUNNING_P2P"
    fault = Fault("errno", err=errno.EBUSY)
    prof = Profile(
        name="p",
        default_arc_ms=3.0,
        arc_ms={"STOP>STOP_COPY": 7.5},
        faults={"RUNNING_P2P>STOP": fault},
    )
    assert prof.latency_ms(MigState.STOP, MigState.STOP_COPY) == 7.5
    assert prof.latency_ms(MigState.STOP_COPY, MigState.STOP) == 3.0
    assert prof.fault(MigState.RUNNING_P2P, MigState.STOP) is fault
    assert prof.fault(MigState.STOP, MigState.RUNNING_P2P) is None


# --------------------------------------------------------------- JSON files
def test_load_json_with_base_star_and_faults(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "slowstop.json",
        {
            "name": "slowstop",
            "base": "fixed50",
            "arc_ms": {"*": 5, "PRE_COPY_P2P>STOP_COPY": 120},
            "faults": {
                "RUNNING_P2P>STOP": {"kind": "errno", "errno": "EBUSY", "times": 1},
                "STOP>STOP_COPY": {"kind": "error-state"},
                "STOP>RESUMING": {"kind": "slow", "ms": 2},
            },
        },
    )
    for prof in (load_profile(path), load_profile(str(path)), get_profile(str(path))):
        assert prof.name == "slowstop"
        assert prof.default_arc_ms == 5
        assert prof.latency_ms(MigState.PRE_COPY_P2P, MigState.STOP_COPY) == 120
        assert prof.latency_ms(MigState.RUNNING, MigState.RUNNING_P2P) == 5
        # the rest comes from the base
        base = BUILTIN_PROFILES["fixed50"]
        assert prof.state_size == base.state_size
        assert prof.flags == base.flags
        f = prof.fault(MigState.RUNNING_P2P, MigState.STOP)
        assert f is not None
        assert (f.kind, f.err, f.times) == ("errno", errno.EBUSY, 1)
        f = prof.fault(MigState.STOP, MigState.STOP_COPY)
        assert f is not None
        assert (f.kind, f.err, f.times) == ("error-state", errno.EIO, None)
        f = prof.fault(MigState.STOP, MigState.RESUMING)
        assert f is not None
        assert (f.kind, f.ms) == ("slow", 2)


def test_base_arcs_are_merged(tmp_path: Path) -> None:
    prof = profile_from_dict({"base": "cx7", "arc_ms": {"STOP>STOP_COPY": 1}})
    cx7 = BUILTIN_PROFILES["cx7"]
    assert prof.latency_ms(MigState.STOP, MigState.STOP_COPY) == 1
    assert prof.latency_ms(MigState.RESUMING, MigState.STOP) == cx7.latency_ms(
        MigState.RESUMING, MigState.STOP
    )
    assert prof.state_size == cx7.state_size
    assert cx7.latency_ms(MigState.STOP, MigState.STOP_COPY) != 1  # untouched


def test_derived_profile_without_name_is_not_named_after_its_base(
    tmp_path: Path,
) -> None:
    path = _write(tmp_path, "mine.json", {"base": "fixed50", "arc_ms": {"*": 1}})
    assert load_profile(path).name == "mine"
    assert load_profile(_write(tmp_path, "plain.json", {})).name == "plain"
    assert profile_from_dict({"base": "instant"}).name != ""


def test_flags_forms() -> None:
    p2p = MigFlag.STOP_COPY | MigFlag.P2P
    assert profile_from_dict({"flags": ["STOP_COPY", "P2P"]}).flags == p2p
    assert profile_from_dict({"flags": "stop_copy|p2p"}).flags == p2p
    assert profile_from_dict({"flags": "STOP_COPY, PRE_COPY"}).flags == (
        MigFlag.STOP_COPY | MigFlag.PRE_COPY
    )
    assert profile_from_dict({"flags": 7}).flags == ALL_FLAGS
    assert profile_from_dict({"flags": 1}).flags == MigFlag.STOP_COPY


# -------------------------------------------------------------- bad profiles
def _err(data: Any, source: str = "<dict>") -> str:
    with pytest.raises(ProfileError) as info:
        profile_from_dict(data, source=source)
    return str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="cannot read"):
        load_profile(tmp_path / "absent.json")


def test_malformed_json(tmp_path: Path) -> None:
    path = _write(tmp_path, "bad.json", '{"name": "x", ')
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    assert "not valid JSON" in str(info.value)
    assert "bad.json" in str(info.value)


def test_not_an_object(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="object"):
        load_profile(_write(tmp_path, "list.json", "[1, 2]"))


def test_unknown_field_is_named() -> None:
    msg = _err({"name": "x", "state_sise": 10, "colour": "red"})
    assert "state_sise" in msg
    assert "colour" in msg
    assert "state_size" in msg  # the valid ones are listed


def test_unknown_base_is_named() -> None:
    msg = _err({"base": "cx8"})
    assert "cx8" in msg
    assert "cx7" in msg


@pytest.mark.parametrize(
    ("data", "named"),
    [
        ({"arc_ms": {"RUNNING>STOP": -1}}, "RUNNING>STOP"),
        ({"arc_ms": {"*": -0.5}}, "default_arc_ms"),
        ({"default_arc_ms": -3}, "default_arc_ms"),
        ({"jitter_ms": -1}, "jitter_ms"),
        ({"arc_ms": {"STOP>RUNNING_P2P": "fast"}}, "STOP>RUNNING_P2P"),
    ],
)
def test_negative_or_non_number_latency(data: dict[str, Any], named: str) -> None:
    msg = _err(data)
    assert named in msg
    assert "latency" in msg


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_latency(value: float) -> None:
    assert "RUNNING>RUNNING_P2P" in _err({"arc_ms": {"RUNNING>RUNNING_P2P": value}})
    assert "default_arc_ms" in _err({"default_arc_ms": value})
    assert "jitter_ms" in _err({"jitter_ms": value})


def test_nan_from_json_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "nan.json", '{"arc_ms": {"STOP>STOP_COPY": NaN}}')
    with pytest.raises(ProfileError, match="STOP>STOP_COPY"):
        load_profile(path)


@pytest.mark.parametrize(
    "key",
    ["RUNNING-STOP", "RUNNING>", ">STOP", "RUNNING>FOO", "running>stop", "STOP"],
)
def test_bad_arc_key(key: str) -> None:
    msg = _err({"arc_ms": {key: 1}})
    assert repr(key) in msg
    msg = _err({"faults": {key: {"kind": "errno"}}})
    assert repr(key) in msg


def test_bad_fault_kind() -> None:
    msg = _err({"faults": {"STOP>STOP_COPY": {"kind": "explode"}}})
    assert "explode" in msg
    for kind in ("errno", "hang", "slow", "error-state"):
        assert kind in msg


@pytest.mark.parametrize(
    ("spec", "named"),
    [
        ({"kind": "errno", "errno": "ENOTANERRNO"}, "ENOTANERRNO"),
        ({"kind": "errno", "errno": "errorcode"}, "errorcode"),
        ({"kind": "errno", "errno": 0}, "errno"),
        ({"kind": "errno", "errno": [5]}, "errno"),
        ({"kind": "slow", "ms": -1}, "ms"),
        ({"kind": "slow", "ms": "long"}, "ms"),
        ({"kind": "slow", "ms": None}, "ms"),
        ({"kind": "errno", "times": -1}, "times"),
        ({"kind": "errno", "times": "once"}, "times"),
        ({"kind": "errno", "when": "always"}, "when"),
        ({"errno": "EIO"}, "kind"),
        ("errno", "kind"),
    ],
)
def test_bad_fault_fields(spec: Any, named: str) -> None:
    msg = _err({"faults": {"STOP>STOP_COPY": spec}})
    assert named in msg
    assert "STOP>STOP_COPY" in msg


def test_fault_errno_by_number_and_name() -> None:
    prof = profile_from_dict(
        {
            "faults": {
                "STOP>STOP_COPY": {"kind": "errno", "errno": errno.ENOSPC},
                "STOP>RESUMING": {"kind": "errno", "errno": "EAGAIN"},
                "RESUMING>STOP": {"kind": "errno", "errno": "ENOTSUP"},
            }
        }
    )
    f3 = prof.fault(MigState.RESUMING, MigState.STOP)
    assert f3 is not None and f3.err == errno.ENOTSUP  # an alias name
    f1 = prof.fault(MigState.STOP, MigState.STOP_COPY)
    f2 = prof.fault(MigState.STOP, MigState.RESUMING)
    assert f1 is not None and f1.err == errno.ENOSPC
    assert f2 is not None and f2.err == errno.EAGAIN


@pytest.mark.parametrize("flags", [["P2P"], ["PRE_COPY", "P2P"], 2, 6, "P2P"])
def test_flags_without_stop_copy(flags: Any) -> None:
    assert "STOP_COPY" in _err({"flags": flags})


def test_flags_without_stop_copy_direct() -> None:
    with pytest.raises(ProfileError, match="STOP_COPY"):
        Profile(name="x", flags=MigFlag.P2P)


def test_unknown_flag_name() -> None:
    msg = _err({"flags": ["STOP_COPY", "POST_COPY"]})
    assert "POST_COPY" in msg


@pytest.mark.parametrize("flags", [8, 9, 0xF, -1, 1 << 40])
def test_flags_with_undefined_bits(flags: int) -> None:
    assert "undefined" in _err({"flags": flags})


def test_flags_not_a_list() -> None:
    assert "flags" in _err({"flags": {"STOP_COPY": True}})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("state_size", 0),
        ("state_size", -4096),
        ("state_size", 1.5),
        ("state_size", "64K"),
        ("state_size", True),
        ("precopy_initial", -1),
        ("precopy_dirty", -1),
        ("pf_concurrency", -2),
        ("pf_concurrency", 1.0),
    ],
)
def test_bad_sizes_name_the_field(field: str, value: Any) -> None:
    msg = _err({field: value})
    assert field in msg


@pytest.mark.parametrize("value", [-1.0, math.nan, math.inf, "fast"])
def test_bad_bandwidth(value: Any) -> None:
    assert "bandwidth" in _err({"bandwidth": value})


@pytest.mark.parametrize("value", [-1.0, math.nan, math.inf, "fast", True])
def test_bad_stopcopy_rate(value: Any) -> None:
    assert "stopcopy_rate" in _err({"stopcopy_rate": value})


def test_empty_name() -> None:
    with pytest.raises(ProfileError, match="name"):
        Profile(name="")


def test_replace_validates_again() -> None:
    prof = get_profile("instant")
    assert prof.replace(state_size=100).state_size == 100
    assert prof.state_size == 64 * 1024  # frozen original untouched
    with pytest.raises(ProfileError, match="state_size"):
        prof.replace(state_size=0)


def test_direct_fault_validation() -> None:
    with pytest.raises(ProfileError, match="kind"):
        Fault("boom")
    with pytest.raises(ProfileError, match="ms"):
        Fault("slow", ms=-1.0)
    with pytest.raises(ProfileError, match="times"):
        Fault("errno", times=-1)
    assert Fault("errno", times=0).times == 0


# ---------------------------------------------------------------- round trip
CUSTOM = Profile(
    name="custom-rt",
    flags=MigFlag.STOP_COPY | MigFlag.PRE_COPY,
    default_arc_ms=1.5,
    arc_ms={"STOP>STOP_COPY": 3.0, "RUNNING>PRE_COPY": 0.0},
    jitter_ms=0.25,
    state_size=12345,
    bandwidth=1e6,
    stopcopy_rate=2.5e5,
    precopy_initial=4000,
    precopy_dirty=100,
    pf_concurrency=3,
    faults={
        "RUNNING>STOP": Fault("errno", err=errno.EBUSY, times=2),
        "STOP>RESUMING": Fault("slow", ms=4.0),
        "RESUMING>STOP": Fault("error-state", err=errno.EPROTO),
        "STOP>STOP_COPY": Fault("hang", ms=10.0, times=0),
    },
)


@pytest.mark.parametrize(
    "prof", [*BUILTIN_PROFILES.values(), CUSTOM], ids=lambda p: p.name
)
def test_to_dict_round_trips(prof: Profile, tmp_path: Path) -> None:
    data = prof.to_dict()
    assert profile_from_dict(data) == prof
    # and through real JSON text and a file
    text = json.dumps(data)
    assert profile_from_dict(json.loads(text)) == prof
    path = _write(tmp_path, "rt.json", text)
    assert load_profile(path) == prof
