"""Auto-annotation functions for the tests: deterministic, no model, named by rules as ``tests.functions.<module>``."""
