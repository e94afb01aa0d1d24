"""Byte layouts on the wire (layer 1): no sockets, no processes.

* :mod:`mpvfio.wire.stream`: the main migration channel: mpvfio's stream
  header and hello, QEMU's savevm section framing and the VFIO tags,
  :class:`~mpvfio.wire.stream.StreamWriter` (source) and
  :class:`~mpvfio.wire.stream.StreamReader` (target).
* :mod:`mpvfio.wire.multifd`: multifd device-state packets, their frames and
  the target-side reassembly of a device's buffers in order.

These modules import only the standard library and :mod:`mpvfio.errors`.
"""
