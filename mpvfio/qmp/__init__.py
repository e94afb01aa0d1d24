"""QMP, the QEMU Machine Protocol, served for a Machine (layer 5).

* :mod:`mpvfio.qmp.message`: input framing (a JSON stream, not lines) and
  output encoding (one compact object per CRLF-terminated line);
* :mod:`mpvfio.qmp.protocol`: the asyncio server: sockets, sessions, the
  greeting, capabilities negotiation, request checks, dispatch, events;
* :mod:`mpvfio.qmp.server`: the command table of a Machine and the
  migration engine, and the forwarding of the Machine's events;
* :mod:`mpvfio.qmp.run`: ``mpvfio run``, the long-running VM process.

Reference: ../shared/spec/QMP.md (what ``qemu.qmp`` 0.0.6, ``qmp-shell``
and ``qmp-tui`` need from a server).
"""

from __future__ import annotations

__all__ = ["message", "protocol", "run", "server"]
