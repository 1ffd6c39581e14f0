"""The benchmark suite: intake against peers, dispatch, exports (``python -m bench.run``)."""
