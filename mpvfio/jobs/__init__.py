"""Whole jobs built on a machine (layer 4): each one runs to the end and
returns a result a CLI, QMP or an embedding program prints or inspects.

* :mod:`mpvfio.jobs.switchover`: one stop + start switchover on a machine.
* :mod:`mpvfio.jobs.bench`: serial / threads / workers benchmarks.
* :mod:`mpvfio.jobs.stress`: many rounds over many VFs with checks.
* :mod:`mpvfio.jobs.seedtable`: the seed threads' downtime table, re-measured.
"""
