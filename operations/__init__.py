"""The ``cvat-hooks`` command and what operators run with it: ``serve``, ``worker``, ``doctor``,
``register``, ``reconcile``, ``send``, and the jobs the workers run for operations rather than for
a rule (the periodic reconcile, learning CVAT's current state when a worker starts).

It may import everything; nothing imports it but itself (``tests/test_package_lines.py``).
"""
