"""Device worker processes (installed as ``mpvfio.workers``; layer 2).

``device``  the child side: :func:`~mpvfio.workers.device.worker_main` opens
            one device and serves commands (phase 1, barrier, phase 2).
``pool``    the parent side: :class:`~mpvfio.workers.pool.WorkerHandle`
            forks, handshakes, waits on replies and sentinels, reaps.
``slots``   the hot path: per-worker shared-memory command/result slots and
            start/done semaphores (PERF_LIMITS design P1), so a transition
            costs no pipe message and no pickle.
``migration``  the worker side of the data path: a device's multifd sender.

The directory is ``workers/`` at the top of the source tree and is mapped to
the ``mpvfio.workers`` package by ``setup.cfg`` (``package_dir``), so there is
one import name, never a top-level ``workers`` module in site-packages.
"""
