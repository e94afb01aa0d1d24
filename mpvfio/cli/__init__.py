"""The ``mpvfio`` command line (layer 5).

* :mod:`mpvfio.cli.main`: the parser, the subcommands and :func:`main`
  (console script ``mpvfio = mpvfio.cli.main:main``).
"""
