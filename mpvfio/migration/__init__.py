"""Live migration of a machine's devices (layer 4).

* :mod:`mpvfio.migration.engine`: the source (:func:`migrate`) and the target
  (:func:`incoming`), their parameters, records and rollback.
* :mod:`mpvfio.migration.local`: a source and a target machine on one host,
  for ``mpvfio migrate --local`` and the comparisons.

The bytes they exchange are laid out by :mod:`mpvfio.wire`; the sockets that
carry them are :mod:`mpvfio.net`.
"""
