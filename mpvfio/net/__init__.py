"""Sockets for migration (layer 1): URIs, cancellation, deadline socket I/O,
listen/connect, the channel preamble and fd inheritance for the workers.

* :mod:`mpvfio.net.transport`: everything above, over ``tcp:``, ``unix:`` and
  inherited-fd channels.
"""
