"""The machine (layer 3): a VM with VFIO devices and its switchover engine.

* :mod:`mpvfio.machine.facade`: :class:`Machine` (build, start/close,
  vm_stop/vm_start, reports), :class:`VFIODevice` (one device's handle),
  :class:`Mode` and :class:`NotifyReport`.

The names below are the public surface; everything else is private to the
package.
"""

from mpvfio.machine.facade import Machine, Mode, NotifyReport, VFIODevice

__all__ = ["Machine", "Mode", "NotifyReport", "VFIODevice"]
