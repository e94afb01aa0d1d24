"""Reports on finished work (layer 4): the per-arc report and timelines.

* :mod:`mpvfio.report.arcreport`: arc records to tables, timelines and JSON.
"""
