"""cvat-hooks workers: the RQ worker processes and the actions they run against CVAT.

Imports ``core`` only (``tests/test_package_lines.py``). The receiver knows the workers through the
job contract in ``core`` and the action registry ``workers.actions`` alone.
"""
