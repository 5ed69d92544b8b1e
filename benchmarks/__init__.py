"""DMAT benchmarks: speed and memory figures, run by `make bench` (never part of the timed tests)."""
