"""mpvfio: take VFIO devices through the live-migration switchover in parallel."""

__version__ = "0.1.0"
