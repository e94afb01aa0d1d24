"""vfio-user: a VFIO device over a UNIX socket (layer 1).

* :mod:`mpvfio.devices.vfio_user.client`: the client backend
  (:class:`~mpvfio.devices.vfio_user.client.VFIOUserDevice`).
* :mod:`mpvfio.devices.vfio_user.server`: the device server that exports an
  emulated device.

The message layouts both share live in :mod:`mpvfio.uapi.vfio_user`.
"""
