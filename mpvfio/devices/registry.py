"""Pick a device backend from a device spec string (layer 1).

This is the one place that maps a spec to a backend:

=====================================  ===========================================
``emulated:PROFILE``                   :class:`~mpvfio.devices.emulated.EmulatedDevice`
                                       (a built-in profile name or a .json path)
``vfio-user:SOCKET_PATH``              :mod:`~mpvfio.devices.vfio_user` client
``vfio:/dev/vfio/devices/vfioN``       :class:`~mpvfio.devices.kernel.KernelVFIODevice`
=====================================  ===========================================

Keyword arguments go to the backend's constructor (``name=`` for all of
them; e.g. ``key=``, ``gate=``, ``backing=`` for emulated, ``timeout=`` for
vfio-user, ``fd=``/``iommufd=`` for the kernel).  Anything else raises
:class:`~mpvfio.errors.UsageError` listing the valid schemes.
"""

from __future__ import annotations

import os
import re
from typing import Any

from mpvfio.devices.base import DeviceBackend
from mpvfio.errors import UsageError

__all__ = ["SCHEMES", "device_identity", "open_backend", "parse_spec"]

#: scheme -> what follows the colon
SCHEMES: dict[str, str] = {
    "emulated": "PROFILE (a built-in profile name or a .json file)",
    "vfio-user": "SOCKET_PATH (a vfio-user server's UNIX socket)",
    "vfio": "/dev/vfio/devices/vfioN (a VFIO cdev)",
}
_GROUP = re.compile(r"^/dev/vfio/(\d+|noiommu-\d+)$")


def _valid() -> str:
    return "; ".join(f"{k}:{v}" for k, v in SCHEMES.items())


def parse_spec(spec: str) -> tuple[str, str]:
    """Split ``"scheme:rest"``; :class:`UsageError` for anything else."""
    scheme, sep, rest = spec.partition(":")
    if not sep or scheme not in SCHEMES:
        raise UsageError(f"bad device spec {spec!r}; valid: {_valid()}")
    if not rest:
        raise UsageError(
            f"device spec {spec!r} names nothing after {scheme!r}; "
            f"expected {scheme}:{SCHEMES[scheme]}"
        )
    if scheme == "vfio" and _GROUP.match(rest):
        raise UsageError(
            f"{rest} is a VFIO group: the legacy group/container interface is not "
            "supported; use the device's cdev, vfio:/dev/vfio/devices/vfioN"
        )
    return scheme, rest


def device_identity(spec: str) -> str | None:
    """What two specs of one real device have in common (``None``: emulated).

    ``vfio-user:./pf/vf0.sock`` and ``vfio-user:/abs/pf/vf0.sock`` name the
    same device; an emulated spec names a fresh device every time.
    """
    scheme, rest = parse_spec(spec)
    if scheme == "emulated":
        return None
    return f"{scheme}:{os.path.realpath(rest)}"


def open_backend(spec: str, **kw: Any) -> DeviceBackend:
    """Open the backend named by ``spec`` (module docstring)."""
    scheme, rest = parse_spec(spec)
    if scheme == "emulated":
        from mpvfio.devices.emulated import EmulatedDevice
        from mpvfio.devices.profiles import get_profile

        profile = get_profile(rest)
        name = kw.pop("name", None) or f"emulated-{profile.name}"
        return EmulatedDevice(name, profile, **kw)
    if scheme == "vfio-user":
        from mpvfio.devices.vfio_user.client import VFIOUserDevice

        return VFIOUserDevice(rest, **kw)
    from mpvfio.devices.kernel import KernelVFIODevice

    return KernelVFIODevice(rest, **kw)
