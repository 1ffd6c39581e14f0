"""cvat-hooks workers: run the actions matched by the receiver against CVAT.

This package never imports Flask or ``receiver``; the receiver imports its light modules
(``contract``, ``delivery_log``, ``actions`` registry) to enqueue work and record deliveries.
"""
