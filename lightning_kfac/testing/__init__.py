"""Helpers shared by the test suite and the benchmarks: independent K-FAC math (``oracles``) and a
forked gloo process runner (``distributed``). Not imported by the engine."""
