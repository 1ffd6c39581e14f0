"""cvat-hooks receiver: the HTTP intake. Verify, parse, match and durably queue CVAT's deliveries,
and the admin UI over the delivery log; what it shares with the workers lives in ``core``."""
