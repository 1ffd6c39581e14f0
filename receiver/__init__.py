"""cvat-hooks receiver: verify, parse, match and durably queue CVAT webhook deliveries."""
