"""What the receiver, the workers and the operations commands share: the facts both sides of a queue
must agree on.

The job contract (:mod:`core.contract`, :mod:`core.queueing`, :mod:`core.retry`), the delivery log
and its history and metrics, the Redis key schema (:mod:`core.keys`), the settings every process
reads, the errors, the redaction of secrets, and CVAT's events as this service knows them
(:mod:`core.cvat_events`, :mod:`core.events`, :mod:`core.state`). This package imports neither
``receiver`` nor ``workers`` nor ``operations`` (``tests/test_package_lines.py``), so either side
can change without the other noticing anything but the contract.
"""
