"""The real-CVAT suite (see conftest.py: skipped unless a CVAT is configured)."""
